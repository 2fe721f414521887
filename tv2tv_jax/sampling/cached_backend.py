"""The KV-cached sampler backend: writes to one `kv_cache.KVCache` of B rows, nothing else.

`CachedBackend` answers the loop's batched calls (`sampler` module docstring): text and
clean chunks are written into the cache in one forward pass each, logits come from the
last text written, and a noisy chunk is a query only (never written). A write that does
not fit raises `CacheFullError`; making room is `window.SlidingWindow`'s job.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import masks, sequence
from tv2tv_jax.config import Experiment
from tv2tv_jax.sampling import kv_cache
from tv2tv_jax.sampling.decoding import SamplerConfig


class CacheFullError(RuntimeError):
  """The KV cache has no room for the next write (and no sliding window)."""


# Module-level jits with the (hashable, compared by value) model static, so every
# backend of the same model shares the compiled steps.


def _append_text_last(model, params, cache, tokens, meta, count, last):
  """kv_cache.append_text, keeping per row the logits of its last written token
  (`last` f32[B, V] for rows that wrote nothing)."""
  cache, logits = kv_cache.append_text(model, params, cache, tokens, meta, count)
  end = logits[jnp.arange(tokens.shape[0]), jnp.maximum(count - 1, 0)]
  return cache, jnp.where(count[:, None] > 0, end.astype(jnp.float32), last)


_APPEND_TEXT = jax.jit(_append_text_last, static_argnums=0)
_APPEND_CLEAN = jax.jit(kv_cache.append_clean, static_argnums=0)
_VELOCITY = jax.jit(kv_cache.noisy_velocity, static_argnums=0)
_DENOISE = jax.jit(kv_cache.denoise, static_argnums=(0, 7))


class CachedBackend:
  """Backend over a `kv_cache.KVCache` of `batch` rows (CFG tiles each row to two).

  Per row it keeps a `sequence.Cursor`, the one that lays out training examples, for
  the logical order and RoPE position of each write (a generated chunk's noisy copy
  takes n orders and its clean copy the next n, both at the same positions).
  capacity: cache slots per row (default `seq.text_len + seq.max_chunks · n`).

  Every pass builds its query metadata in `_meta`, once, just before it runs against
  the cache as it then is; a subclass may observe the passes there (the tests'
  mask recorder does).
  """

  def __init__(self, model, params, exp: Experiment, capacity: int | None = None,
               batch: int = 1):
    self.model, self.params, self.exp = model, params, exp
    n = exp.model.tokens_per_chunk
    self.n, self.batch = n, batch
    self.capacity = capacity or exp.seq.text_len + exp.seq.max_chunks * n
    self.cache = kv_cache.init_cache(exp.model, batch, self.capacity)
    # Host-side: where each row's next slot goes, and a mirror of cache.length (no
    # device sync to check room).
    self.cursor = sequence.Cursor(batch)
    self.used = np.zeros(batch, np.int64)
    self._logits = jnp.zeros((batch, exp.model.vocab_size), jnp.float32)
    self._append_text = functools.partial(_APPEND_TEXT, model)
    self._append_clean = functools.partial(_APPEND_CLEAN, model)
    self._velocity = functools.partial(_VELOCITY, model)

  # Chunk-copy ids only need to be distinct and non-zero (the mask compares them).
  @staticmethod
  def _noisy_id(chunk: int) -> int:
    return 2 * chunk + 2

  @staticmethod
  def _clean_id(chunk: int | None) -> int:
    return 1 if chunk is None else 2 * chunk + 3

  def _meta(self, count: np.ndarray, width: int, modality, chunk_id, at, plan,
            drops=(False,)):
    """SeqMeta of [B·r, width] (r = len(drops); row b·r + j is row b with drops[j]):
    count[b] consecutive slots of row b from at = (order0, pos0) ([B] each), then
    padding."""
    order0, pos0 = at
    r = len(drops)
    ar = np.arange(width, dtype=np.int64)[None]
    valid = ar < np.asarray(count)[:, None]
    full = lambda v: np.broadcast_to(np.asarray(v, np.int64).reshape(-1, 1),
                                     (self.batch, width))
    cols = dict(segment_ids=valid, modality=np.where(valid, modality, sequence.PAD),
                chunk_ids=full(chunk_id) * valid, positions=(np.asarray(pos0)[:, None] + ar) * valid,
                order=(np.asarray(order0)[:, None] + ar) * valid,
                plan_ids=full(plan) * valid)
    rep = lambda a: jnp.asarray(np.repeat(np.asarray(a, np.int32), r, axis=0))
    drop = np.tile(np.asarray(drops, bool), self.batch)[:, None] & valid.repeat(r, axis=0)
    return masks.SeqMeta(**{k: rep(v) for k, v in cols.items()}, cfg_drop=jnp.asarray(drop))

  def _room(self, count: np.ndarray) -> None:
    """Raises CacheFullError unless every row b has room for count[b] more slots."""
    if np.all(self.used + count <= self.capacity):
      return
    b = int(np.argmax(self.used + count - self.capacity))
    raise CacheFullError(f"KV cache full: row {b} has {self.used[b]} of {self.capacity} "
                         f"slots used, {count[b]} more needed (raise "
                         f"SamplerConfig.capacity or set SamplerConfig.sliding_window)")

  def append_text(self, tokens, plans) -> None:
    """tokens: [i32[N_b] | None] * B (None or empty: the row writes nothing); plans: [int] * B."""
    tokens = [None if t is None else np.asarray(t, np.int32) for t in tokens]
    count = np.asarray([0 if t is None else len(t) for t in tokens], np.int64)
    if not count.any():
      return
    self._room(count)
    width = int(count.max())
    block = np.full((self.batch, width), self.exp.seq.pad_id, np.int32)
    for b, t in enumerate(tokens):
      if t is not None:
        block[b, :len(t)] = t
    meta = self._meta(count, width, sequence.TEXT, 0, self.cursor.text(count), plans)
    self.cache, self._logits = self._append_text(self.params, self.cache, jnp.asarray(block),
                                                 meta, jnp.asarray(count, jnp.int32),
                                                 self._logits)
    self.used += count

  def logits(self, rows=None) -> jax.Array:
    """f32[B, V]: each row's next-token logits (computed when its text was written)."""
    return self._logits

  def _noisy_meta(self, chunk: int, reps: int) -> masks.SeqMeta:
    drops = (False, True)[:reps]
    count = np.full(self.batch, self.n)
    return self._meta(count, self.n, sequence.NOISY, self._noisy_id(chunk),
                      self.cursor.noisy(), chunk + 1, drops)

  def velocities(self, x: jax.Array, t: float, chunk: int, reps: int) -> jax.Array:
    """One velocity evaluation: x f32[B, h, w, c] -> f32[B, reps, h, w, c]."""
    meta = self._noisy_meta(chunk, reps)
    xs = jnp.repeat(jnp.asarray(x, jnp.float32), reps, axis=0)
    v = self._velocity(self.params, self.cache, xs,
                       jnp.full((reps * self.batch,), t, jnp.float32), meta)
    return v.reshape(self.batch, reps, *v.shape[1:])

  def denoise(self, x: jax.Array, chunk: int, rows, sc: SamplerConfig, grid) -> jax.Array:
    """All rows integrate chunk `chunk` in one jitted loop (rows not asked are ignored)."""
    meta = self._noisy_meta(chunk, 1 if sc.cfg_scale == 1.0 else 2)
    return _DENOISE(self.model, self.params, self.cache, jnp.asarray(x, jnp.float32),
                    jnp.asarray(grid, jnp.float32), meta,
                    jnp.asarray(sc.cfg_scale, jnp.float32), sc.solver)

  def append_chunk(self, latents, chunk: int | None) -> None:
    """latents: [f32[h, w, c] | None] * B; chunk: its index, None for a first frame."""
    count = np.asarray([0 if l is None else self.n for l in latents], np.int64)
    if not count.any():
      return
    self._room(count)
    shape = tuple(self.exp.model.latent_shape)
    block = np.stack([np.zeros(shape, np.float32) if l is None else np.asarray(l, np.float32)
                      for l in latents])
    _, clean_order, pos = self.cursor.chunk(self.n, with_noisy=chunk is not None,
                                            where=count > 0)
    meta = self._meta(count, self.n, sequence.CLEAN, self._clean_id(chunk),
                      (clean_order, pos), 0)
    self.cache = self._append_clean(self.params, self.cache, jnp.asarray(block), meta,
                                    jnp.asarray(count, jnp.int32))
    self.used += count
