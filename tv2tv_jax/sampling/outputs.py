"""Files of a finished generation: animated GIF, MP4, contact sheet, JSON transcript.

Frame layout (the VAE's): frame 0 is the first frame alone, then `frames_per_chunk`
frames per chunk, so chunk i (0-based) covers frames 1 + 4i .. 4 + 4i and, at `fps`
frames per second, the times [(1 + 4i) / fps, (5 + 4i) / fps) seconds.

Inputs everywhere: `frames` uint8[T, H, W, 3] with T = 1 + frames_per_chunk * N, and
`texts`: N strings, the text of each chunk (shown under that chunk's frames).
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FPS = 16
FRAMES_PER_CHUNK = 4
_CAPTION_LINES = 3


def chunk_frame_range(i: int, frames_per_chunk: int = FRAMES_PER_CHUNK) -> tuple[int, int]:
  """[start, stop) frame indices of chunk i (frame 0 is the first frame alone)."""
  return 1 + frames_per_chunk * i, 1 + frames_per_chunk * (i + 1)


def chunk_of_frame(t: int, frames_per_chunk: int = FRAMES_PER_CHUNK) -> int | None:
  """The chunk frame t belongs to, None for the first frame."""
  return None if t == 0 else (t - 1) // frames_per_chunk


def chunk_at_time(seconds: float, fps: int = FPS,
                  frames_per_chunk: int = FRAMES_PER_CHUNK) -> int:
  """The chunk whose frames span time `seconds` (>= 0); the first frame's own 1/fps
  seconds map to chunk 0, the first chunk that can still be steered."""
  frame = int(np.floor(seconds * fps + 1e-6))  # tolerance: 0.3125 s * 16 is frame 5
  return chunk_of_frame(frame, frames_per_chunk) or 0


def _check(frames: np.ndarray, texts: Sequence[str], frames_per_chunk: int) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"frames must be uint8[T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
  if frames.shape[0] != 1 + frames_per_chunk * len(texts):
    raise ValueError(f"{frames.shape[0]} frames for {len(texts)} chunk texts; expected "
                     f"1 + {frames_per_chunk} * {len(texts)}")
  return frames


def _font() -> ImageFont.ImageFont:
  return ImageFont.load_default()


def _wrap(text: str, width_px: int) -> list[str]:
  chars = max(8, width_px // 6)  # the default bitmap font is 6 px per character
  lines = textwrap.wrap(text, chars) or [""]
  if len(lines) > _CAPTION_LINES:
    lines = lines[:_CAPTION_LINES]
    lines[-1] = lines[-1][:max(0, chars - 3)] + "..."
  return lines


def captioned_frame(frame: np.ndarray, caption: str, scale: int = 4) -> Image.Image:
  """uint8[H, W, 3] -> RGB image [scale*H + caption band, max(scale*W, 256)], `caption` under
  the (nearest-neighbour upscaled) frame."""
  img = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale),
                                      Image.NEAREST)
  band = 6 + 12 * _CAPTION_LINES
  out = Image.new("RGB", (max(img.width, 256), img.height + band), (0, 0, 0))
  out.paste(img, (0, 0))
  draw = ImageDraw.Draw(out)
  for k, line in enumerate(_wrap(caption, out.width - 8)):
    draw.text((4, img.height + 3 + 12 * k), line, fill=(255, 255, 255), font=_font())
  return out


def _frame_captions(texts: Sequence[str], frames_per_chunk: int, fps: int) -> list[str]:
  # The time stamp makes every captioned frame distinct, so GIF writers cannot merge
  # identical consecutive frames and the GIF keeps exactly T frames.
  caps = [f"{0:.3f}s first frame"]
  for i, text in enumerate(texts):
    lo, hi = chunk_frame_range(i, frames_per_chunk)
    caps += [f"{t / fps:.3f}s [{i}] {text}" for t in range(lo, hi)]
  return caps


def write_gif(path: str, frames: np.ndarray, texts: Sequence[str], *, fps: int = FPS,
              scale: int = 4, frames_per_chunk: int = FRAMES_PER_CHUNK) -> str:
  """Animated GIF, one image per frame (T of them), each chunk's text under its frames."""
  frames = _check(frames, texts, frames_per_chunk)
  imgs = [captioned_frame(f, c, scale)
          for f, c in zip(frames, _frame_captions(texts, frames_per_chunk, fps))]
  imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
               loop=0, optimize=False, disposal=1)
  return path


def write_mp4(path: str, frames: np.ndarray, texts: Sequence[str], *, fps: int = FPS,
              scale: int = 4, frames_per_chunk: int = FRAMES_PER_CHUNK) -> str | None:
  """H.264 MP4 (PyAV) of the captioned frames; None (nothing written) if PyAV is missing."""
  try:
    import av  # optional
  except ImportError:
    return None
  frames = _check(frames, texts, frames_per_chunk)
  imgs = [np.asarray(captioned_frame(f, c, scale))
          for f, c in zip(frames, _frame_captions(texts, frames_per_chunk, fps))]
  h, w = imgs[0].shape[:2]
  h2, w2 = h + h % 2, w + w % 2  # yuv420p needs even sizes
  with av.open(path, mode="w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
    for img in imgs:
      padded = np.zeros((h2, w2, 3), np.uint8)
      padded[:h, :w] = img
      for packet in stream.encode(av.VideoFrame.from_ndarray(padded, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def write_contact_sheet(path: str, frames: np.ndarray, texts: Sequence[str], *,
                        scale: int = 2, frames_per_chunk: int = FRAMES_PER_CHUNK) -> str:
  """PNG: row 0 the first frame; row 1 + i chunk i's frames side by side, its text to the right.

  Size: (1 + N) rows of scale*H (+ 4 px gaps), width frames_per_chunk*scale*W + a text column.
  """
  frames = _check(frames, texts, frames_per_chunk)
  t, h, w, _ = frames.shape
  th, tw, gap, text_w = h * scale, w * scale, 4, 360
  rows = 1 + len(texts)
  sheet = Image.new("RGB", (frames_per_chunk * (tw + gap) + text_w, rows * (th + gap)),
                    (255, 255, 255))
  draw = ImageDraw.Draw(sheet)

  def thumb(frame):
    return Image.fromarray(frame).resize((tw, th), Image.NEAREST)

  sheet.paste(thumb(frames[0]), (0, 0))
  draw.text((frames_per_chunk * (tw + gap) + 4, 4), "first frame", fill=(0, 0, 0), font=_font())
  for i, text in enumerate(texts):
    y = (1 + i) * (th + gap)
    lo, hi = chunk_frame_range(i, frames_per_chunk)
    for k, frame in enumerate(frames[lo:hi]):
      sheet.paste(thumb(frame), (k * (tw + gap), y))
    s0, s1 = lo / FPS, hi / FPS
    lines = [f"[{i}] {s0:.3f}-{s1:.3f} s"] + _wrap(text, text_w - 8)
    for k, line in enumerate(lines):
      draw.text((frames_per_chunk * (tw + gap) + 4, y + 4 + 12 * k), line, fill=(0, 0, 0),
                font=_font())
  sheet.save(path)
  return path


def transcript(gen_json: dict, texts: Sequence[str], *, prompt: str, settings: dict[str, Any],
               seed: int, checkpoint_step: int | None, trailing_text: str = "",
               fps: int = FPS, frames_per_chunk: int = FRAMES_PER_CHUNK) -> dict:
  """The JSON transcript: prompt, then per chunk its text (decoded), token ids, forced /
  replaced flags and time span in seconds, interleaved with the video (`events`).

  gen_json: `Generation.to_json()`; texts: decoded text per chunk (same order).
  """
  events = [{"type": "text", "source": "prompt", "text": prompt},
            {"type": "video", "source": "first_frame", "frames": [0, 1], "start_s": 0.0,
             "end_s": 1 / fps}]
  chunks = []
  for entry, text in zip(gen_json["transcript"], texts):
    i = int(entry["chunk"])
    lo, hi = chunk_frame_range(i, frames_per_chunk)
    c = {"chunk": i, "text": text, "tokens": list(entry["text"]),
         "forced": bool(entry["forced"]), "replaced": bool(entry.get("replaced", False)),
         "frames": [lo, hi], "start_s": lo / fps, "end_s": hi / fps}
    chunks.append(c)
    events.append({"type": "text", "source": "forced" if c["forced"] else "sampled",
                   "chunk": i, "text": text})
    events.append({"type": "video", "source": "replaced" if c["replaced"] else "generated",
                   "chunk": i, "frames": [lo, hi], "start_s": c["start_s"],
                   "end_s": c["end_s"]})
  if trailing_text:
    events.append({"type": "text", "source": "trailing", "text": trailing_text})
  return {"prompt": prompt, "seed": int(seed), "checkpoint_step": checkpoint_step,
          "settings": settings, "fps": fps, "frames_per_chunk": frames_per_chunk,
          "num_frames": 1 + frames_per_chunk * len(chunks), "stop_reason": gen_json["stop_reason"],
          "trailing_text": trailing_text, "chunks": chunks, "events": events}


def write_json(path: str, obj: dict) -> str:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
  return path


def write_all(out_dir: str, frames: np.ndarray, texts: Sequence[str], transcript_obj: dict,
              *, stem: str = "sample", mp4: bool = True) -> list[str]:
  """Writes <stem>.gif, <stem>_sheet.png, <stem>.json (and <stem>.mp4 if PyAV is there) into
  out_dir; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, stem)
  paths = [write_gif(base + ".gif", frames, texts),
           write_contact_sheet(base + "_sheet.png", frames, texts),
           write_json(base + ".json", transcript_obj)]
  if mp4:
    written = write_mp4(base + ".mp4", frames, texts)
    if written:
      paths.append(written)
  return paths
