"""TFDS builder for CS:GO deathmatch play (Pearce & Zhu's "dataset_dm_scraped_dust2" HDF5 files).

Build (from the repo root; the .hdf5 files sit in one folder, see docs/data.md)::

    python -m data_pipelines.csgo_tfds --config=r64 --manual_dir=path/to/dataset_dm_scraped_dust2 \
        --data_dir=$HOME/tensorflow_datasets [--beam_pipeline_options=runner=DirectRunner,...]

With --beam_pipeline_options (the `beam` extra) the files are spread over Apache Beam
workers, one work item per file (`tfds_common.SourceBuilder`); docs/data.md has the
Dataflow command for the 5,500 files of the real set.

Source layout assumed (from the dataset's own code, TeaPearce/Counter-Strike_Behavioural_Cloning
`config.py` and `tools_dataset_inspect.py`): each `*.hdf5` holds consecutive 16 Hz frames
(1000 per file in the original) as datasets
  frame_{i}_x          uint8[150, 280, 3]  the screen, **BGR** (it was grabbed with OpenCV;
                                           their viewer flips the last axis), flipped to RGB here
  frame_{i}_y          float[51]           the action taken while frame i was shown:
                       [0:11]   keys w, a, s, d, space, ctrl, shift, 1, 2, 3, r (1 = held)
                       [11]     left click, [12] right click
                       [13:36]  one-hot mouse dx bin, MOUSE_X_BINS (pixels per frame)
                       [36:51]  one-hot mouse dy bin, MOUSE_Y_BINS (positive = down)
  frame_{i}_xaux, frame_{i}_helperarr      ignored (previous actions, kill/death flags)
Files are read with h5py; nothing is downloaded.

Clips. A clip is 1 + 4k consecutive frames (k = config.num_chunks); clips start every 4k
frames, so consecutive clips share one frame (the last of one is the given first frame of
the next). The tail that cannot fill a clip is dropped. Chunk i (1..k) is frames
4(i-1)+1 .. 4i; its text describes the actions that *produce* those frames, i.e. the
action vectors of frames 4(i-1) .. 4i-1 (an action recorded with frame t shows from
frame t+1 on).

Action-to-text template (`chunk_text`), words in this order, "idle" if none:
  forward back left right   keys w s a d held in >= key_min_frames of the chunk's 4 frames
  jump crouch walk          space ctrl shift, same rule
  fire scope                left / right click in any of the 4 frames
  aim-left(-fast) aim-right(-fast)   summed mouse dx over the chunk: |dx| >= aim_threshold
                                     gives the word, >= aim_fast_threshold adds "-fast"
  aim-up(-fast) aim-down(-fast)      the same for dy (negative dy = up)
  reload weapon1 weapon2 weapon3     r 1 2 3, same rule as keys
e.g. "forward left jump fire aim-left".

Features, one example per clip (T = 1 + 4k):
  name         Text   "<file name>/frames_000064-000129"
  file         Text   the source file name
  start_frame  int32  index of the clip's first frame in the file
  frames       uint8[T, height, width, 3]  RGB, resized with `resize_frames`
  texts        Text[k]  the template text per chunk
  actions      float32[T, 51]  the raw action vectors of the clip's frames

Splits: files in sorted name order; every `validation_every`-th file (index % n ==
n - 1) is validation, the rest train. Clips of one file never span splits.

Bad records (`BadRecords`): an unreadable file, a file without frame keys, a file too
short for one clip, a clip with a missing frame_{i}_x / frame_{i}_y key, a frame of the
wrong shape or dtype, an action vector of the wrong length, or an action vector with bad
values (kind bad_entry, `action_problem`) is logged with its name and reason, skipped, and
counted into the dataset's metadata (`metadata.json` beside the data: bad_records[split] =
{count, by_kind, records}). Nothing is dropped silently.

A valid action vector is what `chunk_text` can read without guessing: every value finite
and 0 or 1 (within ACTION_ATOL), and at most one hot bin in each mouse group (no hot bin
is "no movement", which `_mouse_total` counts as 0). Through the 0.5 thresholds and the
argmax, a NaN vector would otherwise read as "idle" and a 1e30 one as every key held plus
"aim-left-fast aim-up-fast": plausible texts for values that mean nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.tfds_common import BadRecords, SourceBuilder, build_main, source_file

KEY_NAMES = ("w", "a", "s", "d", "space", "ctrl", "shift", "1", "2", "3", "r")
MOUSE_X_BINS = (-1000.0, -500.0, -300.0, -200.0, -100.0, -60.0, -30.0, -20.0, -10.0, -4.0,
                -2.0, 0.0, 2.0, 4.0, 10.0, 20.0, 30.0, 60.0, 100.0, 200.0, 300.0, 500.0, 1000.0)
MOUSE_Y_BINS = (-200.0, -100.0, -50.0, -20.0, -10.0, -4.0, -2.0, 0.0, 2.0, 4.0, 10.0, 20.0,
                50.0, 100.0, 200.0)
N_KEYS, N_CLICKS = len(KEY_NAMES), 2
X_SLICE = slice(N_KEYS + N_CLICKS, N_KEYS + N_CLICKS + len(MOUSE_X_BINS))
Y_SLICE = slice(X_SLICE.stop, X_SLICE.stop + len(MOUSE_Y_BINS))
ACTION_DIM = Y_SLICE.stop  # 51
SOURCE_SHAPE = (150, 280, 3)
FRAMES_PER_CHUNK = 4
# How far a stored action value may be from 0 or 1 (the source writes exact 0.0 / 1.0).
ACTION_ATOL = 1e-3
# Template words for held keys, in KEY_NAMES order, and the order words appear in a text.
KEY_WORDS = dict(zip(KEY_NAMES, ("forward", "left", "back", "right", "jump", "crouch", "walk",
                                 "weapon1", "weapon2", "weapon3", "reload")))
_HEAD_WORDS = ("forward", "back", "left", "right", "jump", "crouch", "walk")
_TAIL_WORDS = ("reload", "weapon1", "weapon2", "weapon3")
_FRAME_KEY = re.compile(r"^frame_(\d+)_(x|y|xaux|helperarr)$")


# --------------------------------------------------------------------------- frames

def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """f32[n_out, n_in] rows of a triangle (bilinear) filter, widened when downsampling.

  Widening the filter by the scale factor averages every input pixel a output pixel
  covers (antialiasing, like PIL's bilinear); n_in == n_out gives the identity.
  """
  scale = n_in / n_out
  support = max(scale, 1.0)
  centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
  x = np.arange(n_in, dtype=np.float64) + 0.5
  w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / support)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8[T, H, W, C] -> uint8[T, height, width, C], antialiased bilinear, deterministic."""
  frames = np.asarray(frames)
  t, h, w, _ = frames.shape
  if (h, w) == (height, width):
    return frames.astype(np.uint8, copy=True)
  wh, ww = _resize_weights(h, height), _resize_weights(w, width)
  x = np.einsum("oh,thwc->towc", wh, frames.astype(np.float32))
  x = np.einsum("pw,towc->topc", ww, x)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- actions

@dataclasses.dataclass(eq=False)
class CsgoBuilderConfig(tfds.core.BuilderConfig):
  """Frame size, clip length, source format and text-template thresholds."""
  height: int = 64
  width: int = 120
  num_chunks: int = 16
  source_shape: tuple[int, int, int] = SOURCE_SHAPE
  bgr: bool = True
  validation_every: int = 20
  file_glob: str = "*.hdf5"
  key_min_frames: int = 2
  aim_threshold: float = 8.0
  aim_fast_threshold: float = 200.0

  def __post_init__(self):
    if self.height < 1 or self.width < 1 or self.num_chunks < 1:
      raise ValueError("height, width and num_chunks must be >= 1")
    if self.validation_every < 2:
      raise ValueError("validation_every must be >= 2 (else train is empty)")
    if not 1 <= self.key_min_frames <= FRAMES_PER_CHUNK:
      raise ValueError(f"key_min_frames must be in 1..{FRAMES_PER_CHUNK}")

  @property
  def clip_frames(self) -> int:
    return 1 + FRAMES_PER_CHUNK * self.num_chunks


def _aim_word(total: float, negative: str, positive: str, cfg: CsgoBuilderConfig) -> list[str]:
  if abs(total) < cfg.aim_threshold:
    return []
  word = negative if total < 0 else positive
  return [word + "-fast" if abs(total) >= cfg.aim_fast_threshold else word]


def _mouse_total(onehots: np.ndarray, bins: Sequence[float]) -> float:
  """Summed movement of float[n, len(bins)] one-hot rows; a row with no hot bin counts 0."""
  hot = onehots.max(axis=1) > 0.5
  return float(np.where(hot, np.take(bins, onehots.argmax(axis=1)), 0.0).sum())


def chunk_text(actions: np.ndarray, cfg: CsgoBuilderConfig) -> str:
  """float[n, 51] action vectors of one chunk's frames -> the template text (see module doc)."""
  actions = np.asarray(actions, np.float32)
  held = (actions[:, :N_KEYS] > 0.5).sum(axis=0) >= min(cfg.key_min_frames, len(actions))
  keys = {KEY_WORDS[k] for k, h in zip(KEY_NAMES, held) if h}
  words = [w for w in _HEAD_WORDS if w in keys]
  if (actions[:, N_KEYS] > 0.5).any():
    words.append("fire")
  if (actions[:, N_KEYS + 1] > 0.5).any():
    words.append("scope")
  dx = _mouse_total(actions[:, X_SLICE], MOUSE_X_BINS)
  dy = _mouse_total(actions[:, Y_SLICE], MOUSE_Y_BINS)
  words += _aim_word(dx, "aim-left", "aim-right", cfg)
  words += _aim_word(dy, "aim-up", "aim-down", cfg)
  words += [w for w in _TAIL_WORDS if w in keys]
  return " ".join(words) or "idle"


def _format_value(v: float) -> str:
  return "NaN" if np.isnan(v) else f"{v:.6g}"


def action_problem(y: np.ndarray) -> str | None:
  """What makes one float[51] action vector unreadable for `chunk_text`, or None.

  Checks exactly what the text template assumes (module doc): finite values, each 0 or 1
  within ACTION_ATOL (keys and clicks are thresholded at 0.5, so 0.7 or 1e30 would be
  read as "held"), and at most one hot bin per mouse group (`_mouse_total` takes the
  argmax, so two hot bins would silently pick one).
  """
  y = np.asarray(y, np.float64)
  bad = np.flatnonzero(~np.isfinite(y))
  if bad.size:
    return (f"holds {bad.size} NaN/inf value(s), first at index {bad[0]}: "
            f"{_format_value(y[bad[0]])}")
  off = np.flatnonzero(np.minimum(np.abs(y), np.abs(y - 1.0)) > ACTION_ATOL)
  if off.size:
    return (f"is not 0/1-valued: {off.size} value(s) outside {{0, 1}}, first at index "
            f"{off[0]}: {_format_value(y[off[0]])}")
  for group, sl in (("mouse dx", X_SLICE), ("mouse dy", Y_SLICE)):
    hot = int(np.sum(y[sl] > 0.5))
    if hot > 1:
      return f"is not one-hot in its {group} bins [{sl.start}:{sl.stop}]: {hot} bins are 1"
  return None


def clip_texts(actions: np.ndarray, cfg: CsgoBuilderConfig) -> list[str]:
  """float[1+4k, 51] -> k texts; chunk i reads the actions of frames 4(i-1) .. 4i-1."""
  f = FRAMES_PER_CHUNK
  return [chunk_text(actions[f * i:f * (i + 1)], cfg) for i in range(cfg.num_chunks)]


# --------------------------------------------------------------------------- reading

def split_files(files: Sequence[epath.PathLike], cfg: CsgoBuilderConfig) -> dict[str, list]:
  """Sorted files -> {"train": [...], "validation": [...]} (every validation_every-th)."""
  files = sorted(files, key=lambda p: epath.Path(p).name)
  n = cfg.validation_every
  return {"train": [p for i, p in enumerate(files) if i % n != n - 1],
          "validation": [p for i, p in enumerate(files) if i % n == n - 1]}


def file_examples(path: epath.PathLike, cfg: CsgoBuilderConfig, bad: BadRecords,
                  split: str = "train") -> Iterator[tuple[str, dict]]:
  """Yields (key, example) for every good clip of one HDF5 file (local or gs://);
  reports the bad ones."""
  path = epath.Path(path)
  with source_file(path) as source:
    yield from _h5_examples(source, path.name, cfg, bad, split)


def _h5_examples(source, fname: str, cfg: CsgoBuilderConfig, bad: BadRecords, split: str
                 ) -> Iterator[tuple[str, dict]]:
  import h5py  # local: only this builder needs it

  try:
    h5 = h5py.File(source, "r")
  except Exception as e:  # h5py raises OSError for non-HDF5 files, others for truncation
    bad.add(split, fname, "unreadable", f"cannot open as HDF5: {type(e).__name__}: {e}")
    return
  with h5:
    try:
      keys = set(h5.keys())
    except Exception as e:
      bad.add(split, fname, "unreadable", f"cannot list keys: {type(e).__name__}: {e}")
      return
    indices = [int(m.group(1)) for m in map(_FRAME_KEY.match, keys) if m and m.group(2) == "x"]
    if not indices:
      bad.add(split, fname, "no_frames", "no frame_{i}_x keys")
      return
    num_frames, t = max(indices) + 1, cfg.clip_frames
    if num_frames < t:
      bad.add(split, fname, "too_short", f"{num_frames} frames < {t} for one clip of "
              f"{cfg.num_chunks} chunks")
      return
    for start in range(0, num_frames - t + 1, t - 1):
      name = f"{fname}/frames_{start:06d}-{start + t - 1:06d}"
      clip = _read_clip(h5, keys, start, t, cfg, name, bad, split)
      if clip is None:
        continue
      frames, actions = clip
      yield name, {
          "name": name, "file": fname, "start_frame": np.int32(start),
          "frames": resize_frames(frames, cfg.height, cfg.width),
          "texts": clip_texts(actions, cfg), "actions": actions,
      }


def _read_clip(h5, keys: set, start: int, t: int, cfg: CsgoBuilderConfig, name: str,
               bad: BadRecords, split: str) -> tuple[np.ndarray, np.ndarray] | None:
  """uint8[t, *source_shape] RGB frames and float32[t, 51] actions, or None (reported)."""
  frames = np.empty((t, *cfg.source_shape), np.uint8)
  actions = np.empty((t, ACTION_DIM), np.float32)
  for j, i in enumerate(range(start, start + t)):
    for suffix in ("x", "y"):
      if f"frame_{i}_{suffix}" not in keys:
        bad.add(split, name, "missing_key", f"key frame_{i}_{suffix} is missing")
        return None
    try:
      x, y = h5[f"frame_{i}_x"][()], h5[f"frame_{i}_y"][()]
    except Exception as e:
      bad.add(split, name, "unreadable", f"reading frame {i}: {type(e).__name__}: {e}")
      return None
    if x.shape != tuple(cfg.source_shape) or x.dtype != np.uint8:
      bad.add(split, name, "wrong_shape", f"frame_{i}_x is {x.dtype}{list(x.shape)}, "
              f"expected uint8{list(cfg.source_shape)}")
      return None
    if np.shape(y) != (ACTION_DIM,):
      bad.add(split, name, "wrong_shape", f"frame_{i}_y has shape {np.shape(y)}, "
              f"expected ({ACTION_DIM},)")
      return None
    problem = action_problem(y)
    if problem is not None:
      # A bad action would still make a plausible text; skip the clip instead.
      bad.add(split, name, "bad_entry", f"frame_{i}_y (actions[{j}] of the clip) {problem}")
      return None
    frames[j] = x[..., ::-1] if cfg.bgr else x
    actions[j] = y
  return frames, actions


class CsgoDust2(SourceBuilder):
  """CS:GO deathmatch clips with per-chunk action texts (registered as 'csgo_dust2')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the 'dataset_dm_scraped_dust2' HDF5 files of Pearce & Zhu, 'Counter-Strike "
      "Deathmatch with Large-Scale Behavioural Cloning', and pass their folder as manual_dir.")
  BUILDER_CONFIGS = [
      CsgoBuilderConfig(name="r64", description="64x120 frames, 16-chunk clips",
                        height=64, width=120, num_chunks=16),
      CsgoBuilderConfig(name="r128", description="128x240 frames, 16-chunk clips",
                        height=128, width=240, num_chunks=16),
      CsgoBuilderConfig(name="square64", description="64x64 frames (squashed), 16-chunk clips",
                        height=64, width=64, num_chunks=16),
  ]
  DEFAULT_CONFIG_NAME = "r64"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: CsgoBuilderConfig = self.builder_config
    t, k = cfg.clip_frames, cfg.num_chunks
    return tfds.core.DatasetInfo(
        builder=self,
        description="CS:GO deathmatch (dust2) clips, 16 fps, with per-chunk action texts.",
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "file": tfds.features.Text(),
            "start_frame": tfds.features.Scalar(dtype=np.int32),
            "frames": tfds.features.Tensor(shape=(t, cfg.height, cfg.width, 3), dtype=np.uint8,
                                           encoding="zlib"),
            "texts": tfds.features.Sequence(tfds.features.Text(), length=k),
            "actions": tfds.features.Tensor(shape=(t, ACTION_DIM), dtype=np.float32,
                                            encoding="zlib"),
        }),
        disable_shuffling=True,  # file then frame order; Grain shuffles
        metadata=tfds.core.MetadataDict(fps=16, frames_per_chunk=FRAMES_PER_CHUNK,
                                        key_names=list(KEY_NAMES), bad_records={}),
        homepage="https://github.com/TeaPearce/Counter-Strike_Behavioural_Cloning",
    )

  def _split_items(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[str]]:
    root = epath.Path(dl_manager.manual_dir)
    # A name pattern over iterdir, not glob: etils' glob on a gs:// folder read through
    # fsspec returns mangled paths ("gs://gs:/bucket/...") in the tests' fake bucket.
    pattern = self.builder_config.file_glob
    files = sorted(p for p in root.iterdir() if fnmatch.fnmatch(p.name, pattern))
    if not files:
      raise FileNotFoundError(f"no {self.builder_config.file_glob} files in {root}; "
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    # Strings, not epath objects: Beam ships the items to its workers.
    return {split: [str(p) for p in paths]
            for split, paths in split_files(files, self.builder_config).items()}

  def _item_fn(self, dl_manager):
    del dl_manager  # items are full paths
    return functools.partial(_file_item, cfg=self.builder_config)


def _file_item(path: str, bad: BadRecords, split: str, stats, *, cfg: CsgoBuilderConfig):
  """The SourceBuilder work item of a split: one HDF5 file (`file_examples`)."""
  del stats  # no per-split counters besides the bad records
  return file_examples(path, cfg, bad, split)


def main(argv=None):
  return build_main(CsgoDust2, argv, manual_help="folder holding the .hdf5 files")


if __name__ == "__main__":
  main()
