"""TFDS builder for generic captioned video: a folder of video files plus timestamped captions.

Build (from the repo root; see docs/data.md)::

    python -m data_pipelines.captioned_video_tfds --config=r64 --manual_dir=path/to/videos \
        --data_dir=$HOME/tensorflow_datasets [--beam_pipeline_options=runner=DirectRunner,...]

With --beam_pipeline_options (the `beam` extra) the videos are spread over Apache Beam
workers, one work item per video (`tfds_common.SourceBuilder`; docs/data.md).

`manual_dir` holds the videos and `captions.json` (config.captions_file):

    {"videos": [
      {"file": "match_01.mp4",            # path relative to manual_dir (required)
       "captions": [                      # required, may be empty
         {"time": 0.8, "text": "The keeper kicks the ball upfield."},
         {"time": 2.4, "text": "A midfielder heads it on."}],
       "prompt": "A football match.",      # optional meta-prompt, default ""
       "split": "train"}                   # optional, "train" (default) or "validation"
    ]}

`time` is in seconds from the video's first decoded frame. `file` must stay inside
manual_dir (no absolute path, no "../" leaving it) and name a video at most once
(compared after normalising "a/./b.mp4" to "a/b.mp4"): `read_captions` raises
`CaptionsError` naming the entry index and path otherwise, since a second entry for one
video would store its clips twice under the same names with conflicting captions.

Decoding (PyAV, ffmpeg inside its wheel): the first video stream is decoded and resampled
to `fps` (16) by sample-and-hold: output frame j shows the source frame on screen at
time j / fps (the latest source frame starting at or before it), for j / fps before the
video's end (last frame start + its duration). Output frames are converted to RGB and
scaled to height x width by swscale (`interpolation`, default AREA) in the same call.

Clips and captions. A video of N resampled frames gives floor((N - 1) / 4k) clips of
1 + 4k frames (k = num_chunks), starting every 4k frames (consecutive clips share one
frame, the next clip's given first frame); the tail is dropped. A caption at time t lies
on output frame f = floor(t * fps); it belongs to the chunk holding frame f (chunk i of
clip c holds frames 4kc + 4(i-1) + 1 .. 4kc + 4i), and a caption on frame 0 goes to the
first chunk, since the first frame has no text slot. Captions sharing a chunk are joined
with " " in time order. Captions in the dropped tail are counted in the metadata
(captions_in_dropped_tail[split]), not stored.

Features, one example per clip (T = 1 + 4k):
  name        Text     "<file>/clip_0003"
  file        Text     the video file, as in the JSON
  clip_index  int32    c, the clip's index in its video
  start_time  float32  seconds of the clip's first frame (c * 4k / fps)
  prompt      Text     the video's meta-prompt
  frames      uint8[T, height, width, 3]  RGB
  texts       Text[k]  the joined captions per chunk ("" where none)

Bad records (`tfds_common.BadRecords`, the same policy as CS:GO): an entry that is not an
object or lacks "file"/"captions" (missing_key), a malformed caption or split
(bad_entry), a missing or undecodable file or one without a video stream (unreadable),
a file that decodes to less than its declared duration (truncated: an MP4 cut short
after its index decodes without any error, just shorter), a video too short for one clip
(too_short), and a caption time outside [0, duration) (caption_time) each skip the whole
video, are logged by name with the reason, and are counted into metadata.json
(bad_records[split] = {count, by_kind, records}). Skipping, not stopping: one bad file
among thousands should not cost the build; a split whose every video is bad does stop it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import posixpath
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.csgo_tfds import FRAMES_PER_CHUNK
from data_pipelines.tfds_common import BadRecords, SourceBuilder, build_main, source_file

SPLITS = ("train", "validation")
_EPS = 1e-6  # seconds: float slack when comparing frame times


@dataclasses.dataclass(eq=False)
class CaptionedVideoBuilderConfig(tfds.core.BuilderConfig):
  """Output frame size and rate, clip length, and the captions file name."""
  height: int = 64
  width: int = 64
  fps: int = 16
  num_chunks: int = 16
  captions_file: str = "captions.json"
  interpolation: str = "AREA"

  def __post_init__(self):
    if min(self.height, self.width, self.fps, self.num_chunks) < 1:
      raise ValueError("height, width, fps and num_chunks must be >= 1")

  @property
  def clip_frames(self) -> int:
    return 1 + FRAMES_PER_CHUNK * self.num_chunks


class CaptionsError(ValueError):
  """The captions JSON is unusable as a whole: unreadable, of the wrong schema, a video
  path leaving the input folder, or one video listed twice."""


class DecodeError(RuntimeError):
  """A video cannot be decoded (no file, no video stream, or a codec error: kind
  "unreadable"), or it decodes to less than the duration its container declares (kind
  "truncated": a file cut short after its index, which ffmpeg decodes without an error)."""

  def __init__(self, message: str, kind: str = "unreadable"):
    super().__init__(message)
    self.kind = kind


def truncation_tolerance(frame_duration: float | None) -> float:
  """Seconds the decoded video may fall short of its declared duration: two frames or
  0.5 s, whichever is more (containers round durations; edit lists shift the start)."""
  return max(2 * (frame_duration or 0.0), 0.5)


def decode_video(path: epath.PathLike, fps: int, height: int, width: int,
                 interpolation: str = "AREA") -> tuple[np.ndarray, float]:
  """Decodes and resamples a video.

  Returns:
    frames: uint8[N, height, width, 3] RGB at `fps` (sample-and-hold, module doc).
    duration: seconds from the first frame's start to the last frame's end.
  Raises:
    DecodeError: naming the file.
  """
  import av  # local: only this builder needs PyAV

  path = epath.Path(path)
  if not path.exists():
    raise DecodeError(f"{path.name}: file not found")
  out: list[np.ndarray] = []
  try:
    with source_file(path) as source, av.open(source) as container:
      if not container.streams.video:
        raise DecodeError(f"{path.name}: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      rate = stream.average_rate or stream.guessed_rate
      default_dur = 1.0 / float(rate) if rate else None
      t0 = prev = prev_rgb = None
      last_start = last_dur = None
      for index, frame in enumerate(container.decode(stream)):
        start = frame.time if frame.time is not None else (
            index * default_dur if default_dur else None)
        if start is None:
          raise DecodeError(f"{path.name}: frame {index} has no timestamp and no frame rate")
        t0 = start if t0 is None else t0
        start -= t0
        # Every output time before this frame starts shows the previous frame.
        while prev is not None and len(out) / fps < start - _EPS:
          if prev_rgb is None:
            prev_rgb = prev.to_ndarray(format="rgb24", width=width, height=height,
                                       interpolation=interpolation)
          out.append(prev_rgb)
        prev, prev_rgb = frame, None
        last_start = start
        last_dur = (float(frame.duration * frame.time_base)
                    if frame.duration and frame.time_base else default_dur)
      if prev is None:
        raise DecodeError(f"{path.name}: the video stream holds no frames")
      duration = last_start + (last_dur or 0.0)
      declared = (float(stream.duration * stream.time_base) if stream.duration
                  else container.duration / 1e6 if container.duration else None)
      if declared is not None and declared - duration > truncation_tolerance(default_dur):
        raise DecodeError(f"{path.name}: truncated: {index + 1} frames decode to "
                          f"{duration:.3f} s of the {declared:.3f} s the container declares",
                          kind="truncated")
      while len(out) / fps < duration - _EPS:
        if prev_rgb is None:
          prev_rgb = prev.to_ndarray(format="rgb24", width=width, height=height,
                                     interpolation=interpolation)
        out.append(prev_rgb)
  except DecodeError:
    raise
  except Exception as e:  # av.error.* (InvalidDataError, ...) for corrupt or non-video files
    raise DecodeError(f"{path.name}: {type(e).__name__}: {e} (after {len(out) / fps:.3f} s "
                      "decoded)") from e
  return np.stack(out).astype(np.uint8), duration


def caption_slot(time: float, fps: int, num_chunks: int) -> tuple[int, int]:
  """Caption time (s) -> (clip index c, chunk index i in 0..k-1) per the module doc."""
  f = int(math.floor(time * fps + _EPS))
  if f == 0:
    return 0, 0
  span = FRAMES_PER_CHUNK * num_chunks
  return (f - 1) // span, ((f - 1) % span) // FRAMES_PER_CHUNK


def _check_entry(entry: Any, index: int) -> tuple[str, str, str] | None:
  """(name, kind, reason) of what is wrong with a JSON entry, or None if it is well formed."""
  if not isinstance(entry, dict):
    return f"videos[{index}]", "missing_key", f"entry is a {type(entry).__name__}, not an object"
  name = entry.get("file") if isinstance(entry.get("file"), str) else f"videos[{index}]"
  for key in ("file", "captions"):
    if key not in entry:
      return name, "missing_key", f"entry has no {key!r} key"
  if not isinstance(entry["file"], str) or not isinstance(entry["captions"], list):
    return name, "bad_entry", "'file' must be a string and 'captions' a list"
  if entry.get("split", "train") not in SPLITS:
    return name, "bad_entry", f"split {entry.get('split')!r} is not one of {SPLITS}"
  if not isinstance(entry.get("prompt", ""), str):
    return name, "bad_entry", "'prompt' must be a string"
  for j, cap in enumerate(entry["captions"]):
    if (not isinstance(cap, dict) or not isinstance(cap.get("text"), str)
        or not isinstance(cap.get("time"), (int, float)) or isinstance(cap.get("time"), bool)
        or not math.isfinite(cap["time"])):
      return name, "bad_entry", (f"captions[{j}] = {cap!r} is not "
                                 "{'time': <finite seconds>, 'text': <string>}")
  return None


def _normalized_file(file: str) -> str | None:
  """`file` as a normalised path relative to the input folder, or None if it leaves it
  (absolute, or "../" above the folder after normalising)."""
  if posixpath.isabs(file) or epath.Path(file).is_absolute():
    return None
  norm = posixpath.normpath(file)
  return None if norm == ".." or norm.startswith("../") else norm


def check_files(entries: list, path: epath.PathLike) -> None:
  """Raises CaptionsError naming the entry index and path of a video path that leaves the
  input folder, or of the second entry naming an already listed video.

  Entries without a string "file" are left to `_check_entry` (a per-video bad record).
  """
  first: dict[str, int] = {}
  for index, entry in enumerate(entries):
    file = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(file, str):
      continue
    norm = _normalized_file(file)
    if norm is None:
      raise CaptionsError(f"{path}: videos[{index}] file {file!r} leaves the input folder; "
                          "paths must be relative to it, without '../' above it")
    if norm in first:
      j = first[norm]
      raise CaptionsError(f"{path}: videos[{j}] and videos[{index}] both list the video "
                          f"{norm!r} (as {entries[j]['file']!r} and {file!r}); each video "
                          "must be listed once, else its clips are stored twice under the "
                          "same names")
    first[norm] = index


def video_examples(entry: dict, root: epath.PathLike, cfg: CaptionedVideoBuilderConfig,
                   bad: BadRecords, split: str, stats: dict | None = None
                   ) -> Iterator[tuple[str, dict]]:
  """Yields (key, example) per clip of one well-formed JSON entry; reports bad videos.

  `stats`, if given, accumulates "captions_in_dropped_tail".
  """
  name = entry["file"]
  if _normalized_file(name) is None:  # read_captions refuses these; direct callers too
    raise CaptionsError(f"{name!r}: the video path leaves the input folder {root}")
  try:
    frames, duration = decode_video(epath.Path(root) / name, cfg.fps, cfg.height, cfg.width,
                                    cfg.interpolation)
  except DecodeError as e:
    bad.add(split, name, e.kind, str(e))
    return
  for j, cap in enumerate(entry["captions"]):
    if not 0.0 <= cap["time"] < duration:
      bad.add(split, name, "caption_time", f"captions[{j}] at t={cap['time']} s is outside "
              f"the video [0, {duration:.3f}) s")
      return
  span = FRAMES_PER_CHUNK * cfg.num_chunks
  num_clips = (len(frames) - 1) // span
  if num_clips < 1:
    bad.add(split, name, "too_short", f"{len(frames)} frames at {cfg.fps} fps < "
            f"{cfg.clip_frames} for one clip of {cfg.num_chunks} chunks")
    return
  texts = [[[] for _ in range(cfg.num_chunks)] for _ in range(num_clips)]
  for cap in sorted(entry["captions"], key=lambda c: c["time"]):  # stable: ties keep order
    c, i = caption_slot(cap["time"], cfg.fps, cfg.num_chunks)
    if c < num_clips:
      texts[c][i].append(cap["text"])
    elif stats is not None:
      stats["captions_in_dropped_tail"] = stats.get("captions_in_dropped_tail", 0) + 1
  for c in range(num_clips):
    key = f"{name}/clip_{c:04d}"
    yield key, {
        "name": key, "file": name, "clip_index": np.int32(c),
        "start_time": np.float32(c * span / cfg.fps),
        "prompt": entry.get("prompt", ""),
        "frames": frames[c * span:c * span + cfg.clip_frames],
        "texts": [" ".join(t) for t in texts[c]],
    }


def read_captions(root: epath.PathLike, cfg: CaptionedVideoBuilderConfig) -> list:
  """The "videos" list of the captions JSON.

  Raises:
    CaptionsError: naming the file: missing, not JSON, not {"videos": [...]}, a video path
      leaving `root`, or a video listed twice (`check_files`).
  """
  path = epath.Path(root) / cfg.captions_file
  try:
    spec = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CaptionsError(f"{path}: cannot read the captions JSON: {e}") from e
  if not isinstance(spec, dict) or not isinstance(spec.get("videos"), list):
    raise CaptionsError(f"{path}: expected {{\"videos\": [...]}} (see captioned_video_tfds)")
  check_files(spec["videos"], path)
  return spec["videos"]


class CaptionedVideo(SourceBuilder):
  """Clips of captioned videos at 16 fps (registered as 'captioned_video')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the videos and captions.json (schema in data_pipelines/captioned_video_tfds.py) "
      "in one folder and pass it as manual_dir.")
  BUILDER_CONFIGS = [
      CaptionedVideoBuilderConfig(name="r64", description="64x64, 16 fps, 16-chunk clips",
                                  height=64, width=64, num_chunks=16),
      CaptionedVideoBuilderConfig(name="r128", description="128x128, 16 fps, 16-chunk clips",
                                  height=128, width=128, num_chunks=16),
      CaptionedVideoBuilderConfig(name="r64_long", description="64x64, 16 fps, 64-chunk clips",
                                  height=64, width=64, num_chunks=64),
  ]
  DEFAULT_CONFIG_NAME = "r64"
  SPLIT_STATS = ("captions_in_dropped_tail",)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: CaptionedVideoBuilderConfig = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="Captioned video clips resampled to a fixed rate and size.",
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "file": tfds.features.Text(),
            "clip_index": tfds.features.Scalar(dtype=np.int32),
            "start_time": tfds.features.Scalar(dtype=np.float32),
            "prompt": tfds.features.Text(),
            "frames": tfds.features.Tensor(shape=(cfg.clip_frames, cfg.height, cfg.width, 3),
                                           dtype=np.uint8, encoding="zlib"),
            "texts": tfds.features.Sequence(tfds.features.Text(), length=cfg.num_chunks),
        }),
        disable_shuffling=True,  # JSON then clip order; Grain shuffles
        metadata=tfds.core.MetadataDict(fps=cfg.fps, frames_per_chunk=FRAMES_PER_CHUNK,
                                        bad_records={}, captions_in_dropped_tail={}),
    )

  def _split_items(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list]:
    entries = read_captions(dl_manager.manual_dir, self.builder_config)
    by_split = {s: [] for s in SPLITS}
    for index, entry in enumerate(entries):
      problem = _check_entry(entry, index)
      split = entry.get("split", "train") if isinstance(entry, dict) else "train"
      split = split if split in SPLITS else "train"
      by_split[split].append((entry, problem))
    return by_split

  def _item_fn(self, dl_manager):
    # A string root: Beam ships the function to its workers.
    return functools.partial(_video_item, root=str(dl_manager.manual_dir),
                             cfg=self.builder_config)


def _video_item(item: tuple[Any, tuple | None], bad: BadRecords, split: str, stats, *,
                root: str, cfg: CaptionedVideoBuilderConfig) -> Iterator[tuple[str, dict]]:
  """The SourceBuilder work item of a split: one JSON entry and what `_check_entry` found
  wrong with it (reported here, so both build modes count it the same way)."""
  entry, problem = item
  if problem is not None:
    bad.add(split, *problem)
    return
  yield from video_examples(entry, root, cfg, bad, split, stats)


def main(argv=None):
  return build_main(CaptionedVideo, argv, manual_help="folder with the videos and captions.json")


if __name__ == "__main__":
  main()
