"""The TV2TV generation loop and its KV-cached backend.

Loop (DESIGN.md section 6), per chunk i < num_chunks:
  text_i: forced (intervention) or sampled token by token from the logits of the
          last text slot until BOF, EOS (stop) or `max_text_tokens` (BOF forced);
  BOF;    x ~ N(0, I) from (seed, i); `steps` Euler (or Heun) steps on
          `flow.time_grid(steps, shift)`, each one velocity evaluation of only the
          chunk's n noisy tokens against the cache; with CFG scale s != 1 the
          conditional and the text-dropped branch run in one batched pass and
          v = v_u + s·(v_c − v_u);
  then the clean chunk (t = 1) is appended in one pass, then EOF.
Before the loop: the prompt, then the optional first frame as a clean chunk.

The loop talks to a *backend* (`CachedBackend` here; `recompute.RecomputeBackend`,
the from-scratch oracle) through four calls, so that both make identical
decisions from identical randomness and differ only in how outputs are computed:

  append_text(tokens i32[N], plan)        write text slots (plan: chunk number or 0)
  logits() -> f32[V]                      next-token logits at the last text slot
  velocities(x f32[h,w,c], t, chunk, r)   f32[r, h, w, c]: row 0 conditional, row 1
                                          (r = 2) with chunk's plan text dropped
  append_chunk(latent f32[h,w,c], chunk)  write a clean chunk (chunk None: first frame)

Note on first frames: nothing in training predicts the first token after a
clean chunk (a text target needs a text predecessor), so after the first frame
the first token of text_0 comes from the logits of the last prompt token, which
do not see the frame. Both backends do the same; see docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow, masks, sequence
from tv2tv_jax.config import Experiment
from tv2tv_jax.sampling import kv_cache
from tv2tv_jax.sampling.decoding import (Request, RequestError, SamplerConfig, check_config,
                                         check_request, chunk_noise, next_token, text_key)


class CacheFullError(RuntimeError):
  """The KV cache has no room for the next write (sliding window not implemented)."""


@dataclasses.dataclass
class Generation:
  """A finished generation.

  chunks: f32[N, h, w, c] generated chunk latents (N <= num_chunks; no first frame);
  texts: per generated chunk, its text i32[*]; transcript: JSON-able list of
  {'chunk', 'text', 'forced', 'replaced'}; trailing_text: text sampled after the last chunk
  before EOS; stop_reason: 'eos' or 'chunk_budget'.
  """
  chunks: np.ndarray
  texts: list[np.ndarray]
  transcript: list[dict]
  trailing_text: np.ndarray
  stop_reason: str

  def to_json(self) -> dict:
    return {"transcript": self.transcript, "trailing_text": self.trailing_text.tolist(),
            "stop_reason": self.stop_reason, "num_chunks": int(len(self.chunks))}


_NEXT_TOKEN = jax.jit(next_token, static_argnums=(2, 3))  # SamplerConfig is hashable


def combine_cfg(v: jax.Array, scale: float) -> jax.Array:
  """v: f32[r, ...] (row 0 conditional, row 1 unconditional when r = 2) -> f32[...]."""
  if v.shape[0] == 1:
    return v[0]
  return v[1] + scale * (v[0] - v[1])


def generate(backend, request: Request, exp: Experiment, sc: SamplerConfig) -> Generation:
  """Runs the loop of the module docstring on `backend`. Raises RequestError on bad input."""
  seq, model = exp.seq, exp.model
  check_config(sc, model)
  req = check_request(request, seq, model, sc)
  # Never sample pad or EOF (EOF is appended after each chunk), nor ids the tokenizer lacks.
  banned = (seq.pad_id, seq.eof_id) + tuple(range(sc.text_vocab or model.vocab_size,
                                                  model.vocab_size))
  backend.append_text(req.prompt, 0)
  if req.first_frame is not None:
    backend.append_chunk(jnp.asarray(req.first_frame), None)
  grid = [float(t) for t in np.asarray(flow.time_grid(sc.steps, sc.shift))]
  r = 1 if sc.cfg_scale == 1.0 else 2

  def vel(x, t, i):
    return combine_cfg(backend.velocities(x, t, i, r), sc.cfg_scale)

  chunks, texts, transcript = [], [], []
  sampled = 0  # text-key counter: the k-th sampled token uses text_key(seed, k)
  stop = "chunk_budget"
  trailing = np.zeros((0,), np.int32)
  if sc.layout == "think2v":
    # The whole plan first (every chunk's text is given: `check_request`), then chunks.
    for i in range(req.num_chunks):
      if len(req.interventions[i]):
        backend.append_text(req.interventions[i], i + 1)
  for i in range(req.num_chunks):
    text, forced = [], False
    if sc.layout == "think2v":
      text, forced = req.interventions[i].tolist(), True
    elif sc.layout == "tv2tv":
      if i in req.interventions:
        text, forced = req.interventions[i].tolist(), True
        if text:
          backend.append_text(np.asarray(text, np.int32), i + 1)
      else:
        eos = False
        while len(text) < sc.max_text_tokens:
          tok = int(_NEXT_TOKEN(backend.logits(), text_key(req.seed, sampled), sc, banned))
          sampled += 1
          if tok == seq.bof_id:
            break
          if tok == seq.eos_id:
            eos = True
            break
          text.append(tok)
          backend.append_text(np.asarray([tok], np.int32), i + 1)
        if eos:
          stop, trailing = "eos", np.asarray(text, np.int32)
          break
    backend.append_text(np.asarray([seq.bof_id], np.int32), 0)
    x = chunk_noise(req.seed, i, tuple(model.latent_shape))
    # A replaced chunk skips the ODE (its noise is still drawn: nothing else shifts).
    steps = [] if i in req.replacements else list(zip(grid[:-1], grid[1:]))
    if i in req.replacements:
      x = jnp.asarray(req.replacements[i])
    for t0, t1 in steps:
      v0 = vel(x, t0, i)
      if sc.solver == "heun":
        v1 = vel(x + (t1 - t0) * v0, t1, i)
        x = x + (t1 - t0) * 0.5 * (v0 + v1)
      else:
        x = x + (t1 - t0) * v0
    backend.append_chunk(x, i)
    backend.append_text(np.asarray([seq.eof_id], np.int32), 0)
    chunks.append(np.asarray(x))
    texts.append(np.asarray(text, np.int32))
    transcript.append({"chunk": i, "text": [int(t) for t in text], "forced": forced,
                       "replaced": i in req.replacements})
  shape = (0, *model.latent_shape)
  return Generation(chunks=np.stack(chunks) if chunks else np.zeros(shape, np.float32),
                    texts=texts, transcript=transcript, trailing_text=trailing,
                    stop_reason=stop)


# Module-level jits with the (hashable, compared by value) model static, so every
# backend of the same model shares the compiled steps.
_APPEND_TEXT = jax.jit(kv_cache.append_text, static_argnums=0)
_APPEND_CLEAN = jax.jit(kv_cache.append_clean, static_argnums=0)
_VELOCITY = jax.jit(kv_cache.noisy_velocity, static_argnums=0)


class CachedBackend:
  """Backend over a `kv_cache.KVCache` (one row; CFG tiles it to two).

  It keeps the logical-order and RoPE-position cursors of the example being
  written, mirroring `sequence.layout_example`: a generated chunk's noisy copy
  takes n orders and its clean copy the next n, both at the same positions.
  With `record=True` it keeps every attention mask it used (`records`), for tests.
  With `window=True` a write that does not fit slides the window (`_slide`): the
  prompt and first frame stay, the oldest whole chunks go, the cache is rebuilt.
  """

  def __init__(self, model, params, exp: Experiment, capacity: int | None = None,
               record: bool = False, window: bool = False):
    self.model, self.params, self.exp = model, params, exp
    n = exp.model.tokens_per_chunk
    self.n = n
    self.capacity = capacity or exp.seq.text_len + exp.seq.max_chunks * n
    self.cache = kv_cache.init_cache(exp.model, 1, self.capacity)
    self.order = self.pos = 0
    self.used = 0  # python mirror of cache.length (no device sync to check room)
    self._logits = None
    self.record = record
    self.records: list[dict[str, Any]] = []
    self.window = window
    self.pieces: list[tuple] = []  # what was written, for rebuilding after a slide
    self.slides: list[int] = []  # chunks dropped by each slide
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

  def _meta(self, count, modality, chunk_id, order0, plan, drops=(False,)):
    """SeqMeta of [len(drops), count] for `count` consecutive slots of this example."""
    b = len(drops)
    ar = np.arange(count, dtype=np.int32)
    pos = self.pos + ar  # noisy and clean copies of a chunk share positions
    row = lambda v: jnp.asarray(np.broadcast_to(np.asarray(v, np.int32), (b, count)))
    return masks.SeqMeta(
        segment_ids=row(1), modality=row(modality), chunk_ids=row(chunk_id),
        positions=row(pos), order=row(order0 + ar), plan_ids=row(plan),
        cfg_drop=jnp.asarray(np.repeat(np.asarray(drops, bool)[:, None], count, axis=1)))

  def _size(self, piece) -> int:
    return len(piece[1]) if piece[0] == "text" else self.n

  def _room(self, count: int):
    """Makes room for `count` more slots: slides the window, or raises CacheFullError."""
    if self.used + count <= self.capacity:
      return
    if not self.window:
      raise CacheFullError(f"KV cache full: {self.used} of {self.capacity} slots used, "
                           f"{count} more needed (raise SamplerConfig.capacity or set "
                           f"SamplerConfig.sliding_window)")
    self._slide(count)

  def _units(self):
    """Splits the written pieces into (prefix, complete chunk units, open tail).

    prefix: the prompt and the first frame; a unit: text_i, BOF, clean_i, EOF.
    """
    pieces = list(self.pieces)
    k = 2 if len(pieces) > 1 and pieces[1][0] == "clean" and pieces[1][2] is None else 1
    prefix, units, cur = pieces[:k], [], []
    eof = self.exp.seq.eof_id
    for piece in pieces[k:]:
      cur.append(piece)
      if (piece[0] == "text" and piece[1].tolist() == [eof] and len(cur) > 1
          and cur[-2][0] == "clean"):
        units.append(cur)
        cur = []
    return prefix, units, cur

  def _slide(self, count: int):
    """Drops the oldest whole chunks (text_i · BOF · clean_i · EOF), keeping the prompt
    and first frame, and rebuilds the cache by re-running what is kept from scratch:
    every kept key depends on its context, so dropped context means new keys, and
    positions / orders restart contiguously (RoPE only sees offsets)."""
    prefix, units, tail = self._units()
    size = lambda ps: sum(self._size(p) for p in ps)
    dropped = 0
    while units and size(prefix + [p for u in units for p in u] + tail) + count > self.capacity:
      units.pop(0)
      dropped += 1
    kept = prefix + [p for u in units for p in u] + tail
    if size(kept) + count > self.capacity:
      raise CacheFullError(f"KV cache full: the prompt, first frame and current chunk need "
                           f"{size(kept)} + {count} slots, more than the capacity "
                           f"{self.capacity}, even after dropping every earlier chunk")
    self.slides.append(dropped)
    self.cache = kv_cache.init_cache(self.exp.model, 1, self.capacity)
    self.order = self.pos = self.used = 0
    for piece in kept:
      if piece[0] == "text":
        self._write_text(piece[1], piece[2])
      else:
        self._write_clean(piece[1], piece[2])
    self.pieces = kept

  def _keep(self, kind: str, q_meta: masks.SeqMeta, cache: kv_cache.KVCache):
    if self.record:
      reps = q_meta.segment_ids.shape[0] // cache.batch
      m = np.asarray(kv_cache.attention_mask(cache.tile(reps) if reps > 1 else cache, q_meta))
      used = int(np.asarray(cache.length)[0])
      self.records.append({
          "kind": kind, "drop": np.asarray(q_meta.cfg_drop[:, 0]),
          "q_order": np.asarray(q_meta.order[0]),
          "k_order": np.concatenate([np.asarray(cache.meta.order[0, :used]),
                                     np.asarray(q_meta.order[0])]),
          "k_modality": np.asarray(cache.meta.modality[0, :used]),
          "mask": np.concatenate([m[:, :, :used], m[:, :, self.capacity:]], axis=2),
          "unused_visible": bool(m[:, :, used:self.capacity].any())})

  def append_text(self, tokens: np.ndarray, plan: int) -> None:
    tokens = np.asarray(tokens, np.int32)
    self._room(len(tokens))
    self.pieces.append(("text", tokens, plan))
    self._write_text(tokens, plan)

  def _write_text(self, tokens: np.ndarray, plan: int) -> None:
    meta = self._meta(len(tokens), sequence.TEXT, 0, self.order, plan)
    self._keep("text", meta, self.cache)
    self.cache, logits = self._append_text(self.params, self.cache,
                                           jnp.asarray(tokens)[None], meta)
    self._logits = logits[0, -1]
    self.order += len(tokens)
    self.pos += len(tokens)
    self.used += len(tokens)

  def logits(self) -> jax.Array:
    return self._logits

  def velocities(self, x: jax.Array, t: float, chunk: int, reps: int) -> jax.Array:
    drops = (False, True)[:reps]
    meta = self._meta(self.n, sequence.NOISY, self._noisy_id(chunk), self.order, chunk + 1,
                      drops)
    self._keep("noisy", meta, self.cache)
    xs = jnp.broadcast_to(jnp.asarray(x, jnp.float32), (reps, *x.shape))
    return self._velocity(self.params, self.cache, xs, jnp.full((reps,), t, jnp.float32), meta)

  def append_chunk(self, latent: jax.Array, chunk: int | None) -> None:
    self._room(self.n)
    self.pieces.append(("clean", latent, chunk))
    self._write_clean(latent, chunk)

  def _write_clean(self, latent: jax.Array, chunk: int | None) -> None:
    # A generated chunk's clean copy follows its noisy copy in logical order.
    order0 = self.order + (0 if chunk is None else self.n)
    meta = self._meta(self.n, sequence.CLEAN, self._clean_id(chunk), order0, 0)
    self._keep("clean", meta, self.cache)
    self.cache = self._append_clean(self.params, self.cache,
                                    jnp.asarray(latent, jnp.float32)[None], meta)
    self.order = order0 + self.n
    self.pos += self.n
    self.used += self.n


def sample(model, params, exp: Experiment, request: Request,
           sc: SamplerConfig = SamplerConfig()) -> Generation:
  """Generates with the KV cache (the entry point): see `generate`."""
  check_config(sc, exp.model)
  backend = CachedBackend(model, params, exp, sc.capacity, window=sc.sliding_window)
  return generate(backend, request, exp, sc)


__all__ = ["CacheFullError", "CachedBackend", "Generation", "Request", "RequestError",
           "SamplerConfig", "combine_cfg", "generate", "sample"]
