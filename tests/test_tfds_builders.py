"""TFDS builders (no TensorFlow): build into a tmp data_dir, read back via data sources,
compare with the generator output exactly, determinism, and named bad-record reports.
Source files are written by tests/tfds_sources.py; Beam builds are in test_tfds_beam.py,
the real MP4 files in test_real_videos.py."""

import json
import logging

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import captioned_video_tfds as cv_lib
from data_pipelines import csgo_tfds as cs_lib
from data_pipelines import toy_world
from data_pipelines import toy_world_tfds as tw_lib
import tfds_sources as src_lib
from tfds_sources import action as _action, as_str as _as_str, write_h5 as _write_h5
from tfds_sources import write_video as _write_video, SRC_SHAPE

_assert_same = src_lib.assert_same_example


def _quiet(builder, **kwargs):
  builder.download_and_prepare(**kwargs)
  return builder


# --------------------------------------------------------------------------- toy world

def test_toy_world_split_seeds_are_disjoint():
  cfg = tw_lib.ToyWorld.builder_configs["small"]
  seeds = tw_lib.split_seeds(cfg)
  assert len(seeds["train"]) == cfg.num_train and len(seeds["validation"]) == cfg.num_validation
  assert not set(seeds["train"]) & set(seeds["validation"])
  with pytest.raises(ValueError, match="caption_mode"):
    tw_lib.ToyWorldBuilderConfig(name="x", caption_mode="noisy")


def test_toy_world_dense_reads_back_exactly(tmp_path):
  _quiet(tw_lib.ToyWorld(config="tiny", data_dir=tmp_path))
  cfg = tw_lib.ToyWorld.builder_configs["tiny"]
  for split, seeds in tw_lib.split_seeds(cfg).items():
    src = tfds.data_source("toy_world/tiny", split=split, data_dir=tmp_path, download=False)
    assert len(src) == len(seeds)
    for i, seed in enumerate(seeds):  # disable_shuffling: index i is seeds[i]
      ex = src[i]
      _assert_same(ex, tw_lib.generate_example(seed, cfg, split))
      clip = toy_world.generate_clip(seed, cfg.num_chunks)
      np.testing.assert_array_equal(ex["frames"], clip.frames)
      assert _as_str(ex["texts"]) == clip.texts == _as_str(ex["action_texts"])
      assert ex["frames"].shape == (1 + 4 * cfg.num_chunks, 64, 64, 3)
      assert not ex["caption_wrong"].any()


def test_toy_world_sports_captions_and_determinism(tmp_path):
  b1 = _quiet(tw_lib.ToyWorld(config="tiny_sports", data_dir=tmp_path / "a"))
  b2 = _quiet(tw_lib.ToyWorld(config="tiny_sports", data_dir=tmp_path / "b"))
  cfg = b1.builder_config
  assert cfg.caption_mode == "sports" and b1.info.metadata["caption_every"] == 4
  s1, s2 = b1.as_data_source(), b2.as_data_source()
  for split, seeds in tw_lib.split_seeds(cfg).items():
    for i, seed in enumerate(seeds):
      _assert_same(s1[split][i], tw_lib.generate_example(seed, cfg, split))
      _assert_same(s2[split][i], tw_lib.generate_example(seed, cfg, split))
      clip = toy_world.generate_clip(seed, cfg.num_chunks)
      caps, wrong = toy_world.caption_clip_with_truth(clip, 4, cfg.wrong_rate, seed)
      texts = _as_str(s1[split][i]["texts"])
      # The plan placement: one caption, before chunk 0, describing chunks 0-3.
      assert texts == caps and texts[0] and texts[1:] == ["", "", ""]
      assert toy_world.parse_summary(texts[0]) == clip.actions or wrong[0]
      np.testing.assert_array_equal(s1[split][i]["caption_wrong"], wrong)
      assert _as_str(s1[split][i]["action_texts"]) == clip.texts


def test_toy_world_feeds_grain(tmp_path):
  import grain
  b = _quiet(tw_lib.ToyWorld(config="tiny", data_dir=tmp_path))
  ds = grain.MapDataset.source(b.as_data_source(split="train")).shuffle(seed=0)
  names = sorted(_as_str(ds[i]["name"]) for i in range(len(ds)))
  assert names == [f"train/seed_{s:09d}" for s in range(8)]


# --------------------------------------------------------------------------- CS:GO

def test_csgo_action_text_template():
  cfg = cs_lib.CsgoBuilderConfig(name="t")
  rows = np.stack([_action(["w", "space"], dx=-30.0), _action(["w", "a", "space"], left=True,
                                                               dx=-30.0),
                   _action(["w"], dx=-30.0), _action(dx=-30.0)])
  # w in 3/4 frames, space in 2/4, a in 1/4 (< key_min_frames); dx = -120 px.
  assert cs_lib.chunk_text(rows, cfg) == "forward jump fire aim-left"
  rows = np.stack([_action(["s", "d", "ctrl", "r"], right=True, dx=300.0, dy=-50.0)] * 4)
  assert cs_lib.chunk_text(rows, cfg) == ("back right crouch scope aim-right-fast "
                                          "aim-up-fast reload")
  assert cs_lib.chunk_text(np.stack([_action(dx=2.0, dy=4.0)] * 4), cfg) == "aim-right aim-down"
  assert cs_lib.chunk_text(np.stack([_action(dx=2.0, dy=-2.0)] * 2), cfg) == "idle"
  # No hot mouse bin is no movement (not bin 0 = -1000 px).
  assert cs_lib.chunk_text(np.zeros((4, cs_lib.ACTION_DIM), np.float32), cfg) == "idle"
  # Chunk i reads the actions of frames 4(i-1) .. 4i-1 (an action shows one frame later).
  acts = np.stack([_action(["w"])] * 4 + [_action(["s"])] * 4 + [_action(["d"])])
  assert cs_lib.clip_texts(acts, cs_lib.CsgoBuilderConfig(name="t", num_chunks=2)) == [
      "forward", "back"]


def test_resize_frames():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 10, 14, 3), dtype=np.uint8)
  np.testing.assert_array_equal(cs_lib.resize_frames(x, 10, 14), x)
  const = np.full((1, 30, 50, 3), 77, np.uint8)
  np.testing.assert_array_equal(cs_lib.resize_frames(const, 7, 11), np.full((1, 7, 11, 3), 77))
  checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[None, :, :, None]
  small = cs_lib.resize_frames(np.repeat(checker, 3, -1), 16, 16)
  # Antialiased: a 1-px checkerboard halves to flat grey away from the borders.
  np.testing.assert_array_equal(small[0, 1:-1, 1:-1], 128)


def _two_hot_dx():
  y = _action(dx=-30.0)
  y[cs_lib.X_SLICE.start] = 1  # a second hot dx bin (-1000 px)
  return y


_CLIPS = ("f.hdf5/frames_000000-000008", "f.hdf5/frames_000008-000016",
          "f.hdf5/frames_000016-000024")


@pytest.mark.parametrize("frame,y,want", [
    (12, np.full(cs_lib.ACTION_DIM, np.nan, np.float32), {
        _CLIPS[1]: "frame_12_y (actions[4] of the clip) holds 51 NaN/inf value(s), first at "
                   "index 0: NaN"}),
    (9, np.full(cs_lib.ACTION_DIM, 1e30, np.float32), {
        _CLIPS[1]: "frame_9_y (actions[1] of the clip) is not 0/1-valued: 51 value(s) outside "
                   "{0, 1}, first at index 0: 1e+30"}),
    (16, _action(["w"]) * 0.7, {  # frame 16 ends one clip and starts the next
        _CLIPS[1]: "frame_16_y (actions[8] of the clip) is not 0/1-valued: 3 value(s) outside "
                   "{0, 1}, first at index 0: 0.7",
        _CLIPS[2]: "frame_16_y (actions[0] of the clip) is not 0/1-valued"}),
    (2, _two_hot_dx(), {
        _CLIPS[0]: "frame_2_y (actions[2] of the clip) is not one-hot in its mouse dx bins "
                   "[13:36]: 2 bins are 1"}),
])
def test_csgo_bad_action_values_skip_the_clip_by_name(tmp_path, frame, y, want):
  """A NaN, 1e30, fractional or two-hot action vector is a named, counted skip of every clip
  holding it (not a plausible text); the file's other clips are kept."""
  _write_h5(tmp_path / "f.hdf5", 25, seed=6, set_y={frame: y})  # 3 clips of 9 frames
  cfg = cs_lib.CsgoBuilderConfig(name="t", height=24, width=40, num_chunks=2,
                                 source_shape=SRC_SHAPE)
  bad = cs_lib.BadRecords("t")
  kept = [name for name, _ in cs_lib.file_examples(tmp_path / "f.hdf5", cfg, bad)]
  assert kept == [c for c in _CLIPS if c not in want]
  assert [(r.name, r.kind) for r in bad.reports] == [(c, "bad_entry") for c in want]
  for report in bad.reports:
    assert report.reason.startswith(want[report.name]), report.reason


def test_csgo_action_problem_accepts_what_chunk_text_reads():
  assert cs_lib.action_problem(_action(["w", "r"], left=True, dx=1000.0, dy=-200.0)) is None
  assert cs_lib.action_problem(np.zeros(cs_lib.ACTION_DIM)) is None  # no hot mouse bin
  assert cs_lib.action_problem(_action(["w"]) + 1e-4) is None  # float slack
  y = _action(dy=2.0)
  y[cs_lib.Y_SLICE.stop - 1] = 1
  assert "mouse dy" in cs_lib.action_problem(y)
  y = _action()
  y[5] = -np.inf
  assert cs_lib.action_problem(y) == "holds 1 NaN/inf value(s), first at index 5: -inf"
  y = _action(["w"])
  y[0] = 2.0  # chunk_text would read it as "held"
  assert cs_lib.action_problem(y).startswith("is not 0/1-valued")


@pytest.fixture(scope="module")
def csgo_dir(tmp_path_factory):
  return src_lib.write_csgo_source(tmp_path_factory.mktemp("csgo_src"))


_csgo_cfg = src_lib.csgo_config


def test_csgo_file_reader_flips_bgr_and_keeps_actions(csgo_dir):
  cfg = cs_lib.CsgoBuilderConfig(name="id", height=24, width=40, num_chunks=2,
                                 source_shape=SRC_SHAPE)
  bad = cs_lib.BadRecords("t")
  examples = dict(cs_lib.file_examples(csgo_dir / "a_good.hdf5", cfg, bad))
  assert list(examples) == ["a_good.hdf5/frames_000000-000008", "a_good.hdf5/frames_000008-000016"]
  with h5py.File(csgo_dir / "a_good.hdf5") as h5:
    for ex in examples.values():
      s = int(ex["start_frame"])
      x = np.stack([h5[f"frame_{i}_x"][()] for i in range(s, s + 9)])
      y = np.stack([h5[f"frame_{i}_y"][()] for i in range(s, s + 9)])
      np.testing.assert_array_equal(ex["frames"], x[..., ::-1])  # BGR -> RGB, identity size
      np.testing.assert_array_equal(ex["actions"], y)
      assert ex["texts"] == cs_lib.clip_texts(y, cfg)
  assert not bad.reports


def test_csgo_builds_reads_back_and_reports_bad_records(csgo_dir, tmp_path, caplog):
  cfg = _csgo_cfg()
  with caplog.at_level(logging.WARNING):
    b = _quiet(cs_lib.CsgoDust2(config=cfg, data_dir=tmp_path),
               download_config=tfds.download.DownloadConfig(manual_dir=csgo_dir))
  src = b.as_data_source()
  expected = {"train": [], "validation": []}
  ref = cs_lib.BadRecords("ref")
  for split, files in cs_lib.split_files(sorted(csgo_dir.glob("*.hdf5")), cfg).items():
    for f in files:
      expected[split].extend(ex for _, ex in cs_lib.file_examples(f, cfg, ref, split))
  # good: 2 clips of a_good, 1 of gap (clip 2 lacks frame_10_y), 1 of nan (clip 1 holds a
  # NaN action vector), 1 of wrongsize (clip 1 bad).
  assert [len(expected[s]) for s in ("train", "validation")] == [5, 1]
  for split in ("train", "validation"):
    assert len(src[split]) == len(expected[split])
    for i, want in enumerate(expected[split]):
      _assert_same(src[split][i], want)
      assert src[split][i]["frames"].shape == (9, 12, 20, 3)

  want_bad = {"broken.hdf5": "unreadable", "empty.hdf5": "no_frames", "short.hdf5": "too_short",
              "gap.hdf5/frames_000008-000016": "missing_key",
              "nan.hdf5/frames_000000-000008": "bad_entry",
              "wrongsize.hdf5/frames_000000-000008": "wrong_shape"}
  # Persisted: a fresh builder reads the reports back from metadata.json.
  meta = cs_lib.CsgoDust2(config=cfg, data_dir=tmp_path).info.metadata["bad_records"]
  assert meta["train"]["count"] == 6 and meta["validation"]["count"] == 0
  got = {r["name"]: r["kind"] for r in meta["train"]["records"]}
  assert got == want_bad
  reasons = {r["name"]: r["reason"] for r in meta["train"]["records"]}
  assert "frame_10_y" in reasons["gap.hdf5/frames_000008-000016"]
  assert "frame_3_x" in reasons["wrongsize.hdf5/frames_000000-000008"]
  assert "frame_3_y (actions[3] of the clip) holds 51 NaN" in reasons[
      "nan.hdf5/frames_000000-000008"]
  for name in want_bad:  # each was logged by name
    assert any(name in rec.getMessage() for rec in caplog.records), name


# --------------------------------------------------------------------------- captioned video

def test_decode_video_resamples_to_16fps(tmp_path):
  _write_video(tmp_path / "v8.mkv", 20, 8)
  frames, dur = cv_lib.decode_video(tmp_path / "v8.mkv", 16, 24, 32)
  assert frames.shape == (40, 24, 32, 3) and frames.dtype == np.uint8 and dur == pytest.approx(2.5)
  np.testing.assert_array_equal(frames[:, 5, 5, 0], 7 * (np.arange(40) // 2))  # each frame twice
  np.testing.assert_array_equal(frames[..., 1], 200)
  _write_video(tmp_path / "v24.mkv", 30, 24)
  frames, _ = cv_lib.decode_video(tmp_path / "v24.mkv", 16, 12, 16)  # downscaled too
  assert frames.shape == (20, 12, 16, 3)
  np.testing.assert_array_equal(frames[:, 3, 3, 0], 7 * ((np.arange(20) * 3) // 2))
  _write_video(tmp_path / "h264.mp4", 16, 16, codec="libx264", pix_fmt="yuv420p")
  frames, _ = cv_lib.decode_video(tmp_path / "h264.mp4", 16, 24, 32)  # lossy: colours close
  assert frames.shape[0] == 16
  assert np.abs(frames[:, 12, 16, 0].astype(int) - 7 * np.arange(16)).max() <= 4


def test_caption_slot():
  k = 2  # chunks of 4 frames, clips of 9 frames starting every 8
  slots = {t: cv_lib.caption_slot(t, 16, k) for t in (0.0, 1 / 16, 4 / 16, 5 / 16, 8 / 16,
                                                       9 / 16, 16 / 16, 17 / 16, 1.0624)}
  assert slots == {0.0: (0, 0), 1 / 16: (0, 0), 4 / 16: (0, 0), 5 / 16: (0, 1),
                   8 / 16: (0, 1), 9 / 16: (1, 0), 1.0: (1, 1), 17 / 16: (2, 0),
                   1.0624: (1, 1)}  # frame 16.998 is still frame 16


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  return src_lib.write_video_source(tmp_path_factory.mktemp("videos"))


def test_captioned_video_builds_reads_back_and_reports_bad_records(video_dir, tmp_path, caplog):
  cfg = cv_lib.CaptionedVideoBuilderConfig(name="test", height=12, width=16, num_chunks=2)
  with caplog.at_level(logging.WARNING):
    b = _quiet(cv_lib.CaptionedVideo(config=cfg, data_dir=tmp_path),
               download_config=tfds.download.DownloadConfig(manual_dir=video_dir))
  src = b.as_data_source()
  entries = cv_lib.read_captions(video_dir, cfg)
  ref = cv_lib.BadRecords("ref")
  want_train = [ex for _, ex in cv_lib.video_examples(entries[0], video_dir, cfg, ref, "train")]
  want_val = [ex for _, ex in cv_lib.video_examples(entries[1], video_dir, cfg, ref, "validation")]
  assert len(src["train"]) == 4 and len(src["validation"]) == 1
  for split, want in (("train", want_train), ("validation", want_val)):
    for i, ex in enumerate(want):
      _assert_same(src[split][i], ex)
  # Captions by timestamp: 0.0 and 0.25 s (frames 0, 4) -> clip 0 chunk 1; 1.0 s (frame 16)
  # -> clip 1 chunk 2; 2.45 s (frame 39) lies in the dropped tail.
  assert [_as_str(src["train"][i]["texts"]) for i in range(4)] == [
      ["start go", ""], ["", "mid"], ["", ""], ["", ""]]
  assert _as_str(src["validation"][0]["texts"]) == ["", "v"]  # frame 8 -> chunk 2
  first = src["train"][1]
  assert _as_str(first["prompt"]) == "red ramps up" and first["start_time"] == pytest.approx(0.5)
  np.testing.assert_array_equal(first["frames"][:, 0, 0, 0], 7 * ((np.arange(8, 17)) // 2))

  meta = cv_lib.CaptionedVideo(config=cfg, data_dir=tmp_path).info.metadata
  assert meta["captions_in_dropped_tail"] == {"train": 1, "validation": 0}
  got = {r["name"]: r["kind"] for r in meta["bad_records"]["train"]["records"]}
  assert got == {"missing.mkv": "unreadable", "corrupt.mkv": "unreadable",
                 "short.mkv": "too_short", "late.mkv": "caption_time",
                 "nocaps.mkv": "missing_key", "badcap.mkv": "bad_entry",
                 "videos[8]": "missing_key"}
  assert meta["bad_records"]["train"]["count"] == 7
  assert meta["bad_records"]["train"]["by_kind"]["unreadable"] == 2
  reasons = {r["name"]: r["reason"] for r in meta["bad_records"]["train"]["records"]}
  assert "not found" in reasons["missing.mkv"] and "t=2.5" in reasons["late.mkv"]
  for name in got:
    assert any(name in rec.getMessage() for rec in caplog.records), name


def test_split_of_only_bad_records_is_a_clear_error(tmp_path):
  cfg = src_lib.write_all_bad_source(tmp_path / "src")
  with pytest.raises(Exception, match="every record was bad.*gone.mkv"):
    cv_lib.CaptionedVideo(config=cfg, data_dir=tmp_path / "dd").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "src"))


def _prepare_captioned(tmp_path, entries):
  """Builds a captioned-video dataset from `entries` in tmp_path/src (videos written there)."""
  (tmp_path / "src" / "captions.json").write_text(json.dumps({"videos": entries}))
  cfg = cv_lib.CaptionedVideoBuilderConfig(name="t", height=8, width=8, num_chunks=1)
  return cv_lib.CaptionedVideo(config=cfg, data_dir=tmp_path / "dd").download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=tmp_path / "src"))


def test_captioned_video_listed_twice_is_a_named_error(tmp_path):
  """Two entries for one video (also spelt "./a.mkv") would store its clips twice under the
  same names with conflicting captions: the build refuses, naming both entries."""
  (tmp_path / "src").mkdir()
  _write_video(tmp_path / "src" / "a.mkv", 8, 16)
  _write_video(tmp_path / "src" / "b.mkv", 8, 16)
  entries = [{"file": "a.mkv", "captions": [{"time": 0.1, "text": "one"}]},
             {"file": "b.mkv", "captions": []},
             {"file": "./a.mkv", "captions": [{"time": 0.1, "text": "other"}]}]
  with pytest.raises(cv_lib.CaptionsError,
                     match=r"captions\.json: videos\[0\] and videos\[2\] both list the video "
                           r"'a\.mkv' \(as 'a\.mkv' and '\./a\.mkv'\)"):
    _prepare_captioned(tmp_path, entries)
  assert not list((tmp_path / "dd").rglob("*array_record*"))  # no example was written


@pytest.mark.parametrize("file", ["../outside.mkv", "sub/../../outside.mkv", "ABS"])
def test_captioned_video_path_outside_the_input_folder_is_refused(tmp_path, file,
                                                                   monkeypatch):
  """A "../" or absolute path would read a video outside manual_dir: refused by index/path,
  before any video is opened."""
  (tmp_path / "src" / "sub").mkdir(parents=True)
  _write_video(tmp_path / "outside.mkv", 20, 16)  # a readable video the entry points to
  _write_video(tmp_path / "src" / "in.mkv", 20, 16)
  file = str(tmp_path / "outside.mkv") if file == "ABS" else file
  entries = [{"file": "in.mkv", "captions": []}, {"file": file, "captions": []}]
  opened = []
  decode = cv_lib.decode_video
  monkeypatch.setattr(cv_lib, "decode_video", lambda path, *a: opened.append(path) or decode(
      path, *a))
  with pytest.raises(cv_lib.CaptionsError) as err:
    _prepare_captioned(tmp_path, entries)
  assert f"videos[1] file {file!r} leaves the input folder" in str(err.value)
  assert opened == []
  cfg = cv_lib.CaptionedVideoBuilderConfig(name="t", height=8, width=8, num_chunks=1)
  with pytest.raises(cv_lib.CaptionsError, match="leaves the input folder"):
    next(cv_lib.video_examples(entries[1], tmp_path / "src", cfg, cv_lib.BadRecords("t"),
                               "train"))


# Slow tier: h5py and PyAV read through Python file objects here (minutes on 2 busy cores).
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csgo", "captioned"])
def test_sources_in_a_bucket_build_like_local_ones(tmp_path, fake_gcs, kind):
  """Dataflow workers read gs:// inputs: h5py and PyAV get file objects (tfds_common.
  source_file) and build the same dataset as from a local folder."""
  local_src = tmp_path / "src"
  if kind == "csgo":
    src_lib.write_csgo_source(local_src)
    cls, cfg = cs_lib.CsgoDust2, _csgo_cfg()
  else:
    src_lib.write_video_source(local_src)
    cls, cfg = cv_lib.CaptionedVideo, cv_lib.CaptionedVideoBuilderConfig(
        name="test", height=12, width=16, num_chunks=2)
  bucket = epath.Path("gs://bucket/src")
  for f in local_src.iterdir():
    (bucket / f.name).write_bytes(f.read_bytes())
  builds = []
  for name, manual_dir in (("local", local_src), ("bucket", bucket)):
    builds.append(_quiet(cls(config=cfg, data_dir=tmp_path / name),
                         download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)))
  # Reasons may differ (PyAV names a file object '<none>'); records, examples may not.
  src_lib.assert_same_builds(*builds, reasons=False)
  assert sum(s.num_examples for s in builds[1].info.splits.values()) >= 5
