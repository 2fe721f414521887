"""The sliding window (`SamplerConfig.sliding_window`): a one-row cached backend that makes room.

`SlidingWindow` wraps a one-row `cached_backend.CachedBackend` and remembers every piece
written to it. A write that does not fit slides the window: the prompt and first frame stay,
the oldest whole chunks (text_i · BOF · clean_i · EOF) go, and a fresh backend is rebuilt by
re-running the kept pieces from scratch. Every kept key depends on its context, so dropped
context means new keys; orders and positions restart contiguously, which RoPE does not see
(it only sees offsets). A window too small for the prompt, first frame and the current
write raises `CacheFullError`.

One row only: rebuilding replays one row's pieces (batched requests run one at a time).
With Think2V the plan block comes before chunk 0's BOF, so it counts as part of chunk 0's
unit and the first slide drops it with chunk 0.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from tv2tv_jax.sampling.cached_backend import CacheFullError, CachedBackend
from tv2tv_jax.sampling.decoding import SamplerConfig


class SlidingWindow:
  """The sampler backend (`sampler` module docstring) of one row, over a rebuildable cache.

  make: returns a fresh, empty one-row `CachedBackend` (called now and at every slide).
  eof_id: the EOF token (`SequenceConfig.eof_id`), which closes a chunk's unit.
  slides: how many chunks each slide dropped, in order.
  """

  def __init__(self, make: Callable[[], CachedBackend], eof_id: int):
    self.make, self.eof_id = make, int(eof_id)
    self.inner = make()
    if self.inner.batch != 1:
      raise ValueError("the sliding window rebuilds one row's cache: it needs batch=1, "
                       f"got {self.inner.batch}")
    # What was written, in order: ("text", i32[N], plan) or ("clean", f32[h,w,c], chunk).
    self.pieces: list[tuple] = []
    self.slides: list[int] = []

  # The inner backend's state, read by callers and tests (it changes object at a slide).
  batch = property(lambda self: self.inner.batch)
  capacity = property(lambda self: self.inner.capacity)
  cache = property(lambda self: self.inner.cache)
  used = property(lambda self: self.inner.used)

  def _size(self, piece) -> int:
    return len(piece[1]) if piece[0] == "text" else self.inner.n

  def _write(self, piece) -> None:
    if piece[0] == "text":
      self.inner.append_text([piece[1]], [piece[2]])
    else:
      self.inner.append_chunk([piece[1]], piece[2])

  def _put(self, piece) -> None:
    """Writes `piece`, sliding first when it does not fit, and remembers it."""
    if self.inner.used[0] + self._size(piece) > self.inner.capacity:
      self._slide(self._size(piece))
    self.pieces.append(piece)
    self._write(piece)

  def _units(self):
    """Splits the written pieces into (prefix, complete chunk units, open tail).

    prefix: the prompt, and the first frame with its EOF; a unit: text_i, BOF, clean_i, EOF.
    """
    pieces = list(self.pieces)
    k = 3 if len(pieces) > 1 and pieces[1][0] == "clean" and pieces[1][2] is None else 1
    prefix, units, cur = pieces[:k], [], []
    for piece in pieces[k:]:
      cur.append(piece)
      if (piece[0] == "text" and piece[1].tolist() == [self.eof_id] and len(cur) > 1
          and cur[-2][0] == "clean"):
        units.append(cur)
        cur = []
    return prefix, units, cur

  def _slide(self, count: int) -> None:
    """Drops the oldest whole chunk units until `count` more slots fit, then rebuilds."""
    prefix, units, tail = self._units()
    size = lambda ps: sum(self._size(p) for p in ps)
    capacity = self.inner.capacity
    dropped = 0
    while units and size(prefix + [p for u in units for p in u] + tail) + count > capacity:
      units.pop(0)
      dropped += 1
    kept = prefix + [p for u in units for p in u] + tail
    if size(kept) + count > capacity:
      raise CacheFullError(f"KV cache full: the prompt, first frame and current chunk need "
                           f"{size(kept)} + {count} slots, more than the capacity "
                           f"{capacity}, even after dropping every earlier chunk")
    self.slides.append(dropped)
    self.inner = self.make()
    for piece in kept:
      self._write(piece)
    self.pieces = kept

  def append_text(self, tokens, plans) -> None:
    """tokens: [i32[N] | None]; plans: [int] (one row)."""
    if tokens[0] is not None and len(tokens[0]):
      self._put(("text", np.asarray(tokens[0], np.int32), plans[0]))

  def append_chunk(self, latents, chunk: int | None) -> None:
    """latents: [f32[h, w, c] | None]; chunk: its index, None for a first frame."""
    if latents[0] is not None:
      self._put(("clean", latents[0], chunk))

  def logits(self, rows=None) -> jax.Array:
    return self.inner.logits(rows)

  def velocities(self, x: jax.Array, t: float, chunk: int, reps: int) -> jax.Array:
    return self.inner.velocities(x, t, chunk, reps)

  def denoise(self, x: jax.Array, chunk: int, rows, sc: SamplerConfig, grid) -> jax.Array:
    return self.inner.denoise(x, chunk, rows, sc, grid)
