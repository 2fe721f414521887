"""The TV2TV generation loop (batched over requests) and its KV-cached backend.

Loop (docs/design.md, section 6), per chunk i, for every request still running:
  text_i: forced (intervention) or sampled token by token from the logits of the
          last text slot until BOF, EOS (that request stops) or `max_text_tokens`
          (BOF forced);
  BOF;    x ~ N(0, I) from (seed, i); `steps` Euler (or Heun) steps on
          `flow.time_grid(steps, shift)`, each one velocity evaluation of only the
          chunk's n noisy tokens against the cache; with CFG scale s != 1 the
          conditional and the text-dropped branch run in one batched pass and
          v = v_u + s·(v_c − v_u) (`flow.guided_velocity`, `flow.ode_step`);
  then the clean chunk (t = 1) is appended in one pass, then EOF.
Before the loop: the prompts, then the optional first frames as clean chunks, each
closed by EOF (`sequence`: EOF's logits give the first token of text_0).
BOF_i carries chunk i's plan id, like text_i, so that the text-dropped CFG branch
sees neither (`masks`).

Layouts (`SamplerConfig.layout`): 'tv2tv' is the loop above; 't2v' writes no text
(BOF at once); 'think2v' first writes the whole plan, item by item: item i is
forced (intervention) or sampled until EOF or `max_text_tokens` (EOF forced), with
BOF and EOS banned (the plan has exactly num_chunks items), then EOF; an item after
a forced one is sampled conditioned on it. Then the chunks (BOF, ODE, clean chunk,
EOF) with no text between them; chunk i's text in the transcript is plan item i.
EOF is sampled nowhere but in the Think2V plan.

Several requests run as the rows of one batch, in lockstep by chunk: at chunk i
every running row writes its text (rows that already hit BOF write nothing while
others still sample), then all rows denoise chunk i together. Think2V plan items
go the same way (rows that ended item i write nothing until all have, then EOF).
What a row generates depends only on its own request and seed (`test_sampler`
checks a batch against each request run alone).

The loop talks to a batched *backend* of B rows (`CachedBackend` here;
`RowwiseBackend` over per-row `recompute.RecomputeBackend`s is the from-scratch
oracle) through these calls, so that both make identical decisions from
identical randomness and differ only in how outputs are computed. A `None` entry
means the row writes nothing.

  append_text(tokens [i32[N_b] | None] * B, plans [int] * B)   plan: chunk number (text_i
                                            and BOF_i: i + 1) or 0
  logits(rows [bool] * B) -> f32[B, V]      next-token logits at each row's last text slot
                                            (rows not asked may hold anything)
  denoise(x f32[B,h,w,c], chunk, rows, sc, grid f32[m+1]) -> f32[B,h,w,c]
                                            the ODE of `sc.steps` guided steps for `rows`
  append_chunk(latents [f32[h,w,c] | None] * B, chunk)   clean chunk (chunk None: first frame)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow, masks, sequence
from tv2tv_jax.config import Experiment
from tv2tv_jax.sampling import kv_cache, plan_free
from tv2tv_jax.sampling.decoding import (Request, RequestError, SamplerConfig, check_config,
                                         check_request, chunk_noise, next_token, text_key)


class CacheFullError(RuntimeError):
  """The KV cache has no room for the next write (and no sliding window)."""


@dataclasses.dataclass
class Generation:
  """A finished generation.

  chunks: f32[N, h, w, c] generated chunk latents (N <= num_chunks; no first frame);
  texts: per generated chunk, its text i32[*] (Think2V: plan item i); transcript: JSON-able
  list of {'chunk', 'text', 'forced', 'replaced'}; trailing_text: text sampled after the last
  chunk before EOS; stop_reason: 'eos' or 'chunk_budget' (Think2V: always 'chunk_budget').
  """
  chunks: np.ndarray
  texts: list[np.ndarray]
  transcript: list[dict]
  trailing_text: np.ndarray
  stop_reason: str

  def to_json(self) -> dict:
    return {"transcript": self.transcript, "trailing_text": self.trailing_text.tolist(),
            "stop_reason": self.stop_reason, "num_chunks": int(len(self.chunks))}


# One draw per row (row b: logits[b], keys[b]); SamplerConfig is hashable.
_NEXT_TOKENS = jax.jit(jax.vmap(next_token, in_axes=(0, 0, None, None)),
                       static_argnums=(2, 3))


def _check_all(requests: Sequence[Request], exp: Experiment, sc: SamplerConfig):
  """check_request for each; with several requests the message starts `requests[b].`."""
  out = []
  for b, req in enumerate(requests):
    try:
      out.append(check_request(req, exp.seq, exp.model, sc))
    except RequestError as e:
      if len(requests) == 1:
        raise
      raise RequestError(f"requests[{b}].{e}") from None
  return out


@dataclasses.dataclass
class _Row:
  """The loop's bookkeeping of one request."""
  req: Request
  chunks: list = dataclasses.field(default_factory=list)
  texts: list = dataclasses.field(default_factory=list)
  transcript: list = dataclasses.field(default_factory=list)
  sampled: int = 0  # text-key counter: the k-th sampled token uses text_key(seed, k)
  stop: str = "chunk_budget"
  trailing: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int32))
  done: bool = False

  def generation(self, latent_shape) -> Generation:
    shape = (0, *latent_shape)
    return Generation(chunks=np.stack(self.chunks) if self.chunks else np.zeros(shape,
                                                                               np.float32),
                      texts=self.texts, transcript=self.transcript,
                      trailing_text=self.trailing, stop_reason=self.stop)


def _write_text(backend, rows, active, item: int, sc: SamplerConfig, banned, stops):
  """Writes text item `item` (text_item, plan id item + 1) of every active row.

  Rows with `item` in their interventions write that text, all in one pass; the
  others sample token by token (one pass per token for every row still sampling)
  from their last text slot's logits until they draw a token of `stops` (not
  written: the caller writes what ends the text) or hold `sc.max_text_tokens`
  tokens. A row that stopped writes nothing while others continue.

  rows: [_Row] * B; active: [bool] * B; banned, stops: tuples of token ids.
  Returns (texts [list[int]] * B, forced [bool] * B, stop [int | None] * B): the stop
  token a row drew, None where its text was forced or cut at the budget.
  """
  nb = len(rows)
  texts = [[] for _ in rows]
  forced = [False] * nb
  stop = [None] * nb
  given = [None] * nb
  sampling = [False] * nb
  for b, r in enumerate(rows):
    if not active[b]:
      continue
    if item in r.req.interventions:
      texts[b], forced[b] = r.req.interventions[item].tolist(), True
      given[b] = r.req.interventions[item] if texts[b] else None
    else:
      sampling[b] = sc.max_text_tokens > 0
  if any(g is not None for g in given):
    backend.append_text(given, [item + 1] * nb)
  while any(sampling):
    keys = jnp.stack([text_key(r.req.seed, r.sampled) for r in rows])
    toks = np.asarray(_NEXT_TOKENS(backend.logits(sampling), keys, sc, banned))
    writes = [None] * nb
    for b, r in enumerate(rows):
      if not sampling[b]:
        continue
      r.sampled += 1
      tok = int(toks[b])
      if tok in stops:
        sampling[b], stop[b] = False, tok
      else:
        texts[b].append(tok)
        writes[b] = np.asarray([tok], np.int32)
        sampling[b] = len(texts[b]) < sc.max_text_tokens
    if any(w is not None for w in writes):
      backend.append_text(writes, [item + 1] * nb)
  return texts, forced, stop


def generate_batch(backend, requests: Sequence[Request], exp: Experiment,
                   sc: SamplerConfig) -> list[Generation]:
  """Runs the loop of the module docstring for len(requests) rows of `backend`.

  Raises RequestError (naming the field, prefixed `requests[b].` in a batch).
  """
  seq, model = exp.seq, exp.model
  check_config(sc, model)
  rows = [_Row(r) for r in _check_all(requests, exp, sc)]
  nb = len(rows)
  # Never sample pad, nor ids the tokenizer lacks. Chunk text: never EOF (the loop
  # writes it after each chunk). Think2V plan items: EOF ends an item; never BOF or
  # EOS (the plan has exactly num_chunks items, and the chunks follow it).
  unknown = tuple(range(sc.text_vocab or model.vocab_size, model.vocab_size))
  banned = (seq.pad_id, seq.eof_id) + unknown
  plan_banned = (seq.pad_id, seq.bof_id, seq.eos_id) + unknown
  marker = lambda tok, active: [np.asarray([tok], np.int32) if a else None for a in active]
  backend.append_text([r.req.prompt for r in rows], [0] * nb)
  if any(r.req.first_frame is not None for r in rows):
    backend.append_chunk([r.req.first_frame for r in rows], None)
    backend.append_text([np.asarray([seq.eof_id], np.int32) if r.req.first_frame is not None
                         else None for r in rows], [0] * nb)
  grid = np.asarray(flow.time_grid(sc.steps, sc.shift), np.float32)
  last = max(r.req.num_chunks for r in rows)
  plans = [[] for _ in rows]  # think2v: (text, forced) of each plan item
  if sc.layout == "think2v":
    # The whole plan first, item by item, each closed by EOF (`sequence`); then chunks.
    for i in range(last):
      active = [i < r.req.num_chunks for r in rows]
      texts, forced, _ = _write_text(backend, rows, active, i, sc, plan_banned,
                                     (seq.eof_id,))
      backend.append_text(marker(seq.eof_id, active), [0] * nb)
      for b in range(nb):
        if active[b]:
          plans[b].append((texts[b], forced[b]))
  for i in range(last):
    active = [not r.done and i < r.req.num_chunks for r in rows]
    if not any(active):
      break
    texts = [[] for _ in rows]
    forced = [False] * nb
    if sc.layout == "think2v":
      for b in range(nb):
        if active[b]:
          texts[b], forced[b] = plans[b][i]
    elif sc.layout == "tv2tv":
      texts, forced, stop = _write_text(backend, rows, active, i, sc, banned,
                                        (seq.bof_id, seq.eos_id))
      for b, r in enumerate(rows):
        if stop[b] == seq.eos_id:
          active[b] = False
          r.done, r.stop, r.trailing = True, "eos", np.asarray(texts[b], np.int32)
    if not any(active):
      break
    # BOF_i carries chunk i's plan id: a CFG-dropped noisy copy must not see it (`masks`).
    backend.append_text(marker(seq.bof_id, active), [i + 1] * nb)
    x = jnp.stack([chunk_noise(r.req.seed, i, tuple(model.latent_shape)) for r in rows])
    # A replaced chunk skips the ODE (its noise is still drawn: nothing else shifts).
    ode = [a and i not in r.req.replacements for a, r in zip(active, rows)]
    if any(ode):
      x = backend.denoise(x, i, ode, sc, grid)
    x = np.array(x, np.float32)
    for b, r in enumerate(rows):
      if active[b] and i in r.req.replacements:
        x[b] = r.req.replacements[i]
    backend.append_chunk([x[b] if a else None for b, a in enumerate(active)], i)
    backend.append_text(marker(seq.eof_id, active), [0] * nb)
    for b, r in enumerate(rows):
      if active[b]:
        r.chunks.append(x[b])
        r.texts.append(np.asarray(texts[b], np.int32))
        r.transcript.append({"chunk": i, "text": [int(t) for t in texts[b]],
                             "forced": forced[b], "replaced": i in r.req.replacements})
  return [r.generation(model.latent_shape) for r in rows]


def generate(backend, request: Request, exp: Experiment, sc: SamplerConfig) -> Generation:
  """One request on a one-row backend (`generate_batch` with a batch of one)."""
  return generate_batch(backend, [request], exp, sc)[0]


class RowwiseBackend:
  """The batched backend calls over independent one-row backends, row by row.

  A one-row backend has append_text(tokens, plan), logits() -> f32[V],
  velocities(x f32[h,w,c], t, chunk, r) -> f32[r,h,w,c] (row 0 conditional, row 1
  with the chunk's plan dropped) and append_chunk(latent, chunk). The recompute
  oracle and test doubles are written this way; `denoise` integrates each row with
  the same `flow.ode_step` and `flow.guided_velocity` as the cached sampler's loop.
  """

  def __init__(self, rows):
    self.rows = list(rows)

  def append_text(self, tokens, plans) -> None:
    for row, tok, plan in zip(self.rows, tokens, plans):
      if tok is not None:
        row.append_text(np.asarray(tok, np.int32), plan)

  def logits(self, asked) -> jax.Array:
    out = {b: row.logits() for b, (row, a) in enumerate(zip(self.rows, asked)) if a}
    zero = jnp.zeros_like(next(iter(out.values())))
    return jnp.stack([out.get(b, zero) for b in range(len(self.rows))])

  def denoise(self, x, chunk: int, rows, sc: SamplerConfig, grid) -> jax.Array:
    reps = 1 if sc.cfg_scale == 1.0 else 2
    out = []
    for b, row in enumerate(self.rows):
      xb = jnp.asarray(x[b])
      if rows[b]:
        guided = lambda y, t, row=row: flow.guided_velocity(row.velocities(y, t, chunk, reps),
                                                            sc.cfg_scale)
        for t0, t1 in zip(grid[:-1], grid[1:]):
          xb = flow.ode_step(guided, xb, float(t0), float(t1), sc.solver)
      out.append(xb)
    return jnp.stack(out)

  def append_chunk(self, latents, chunk) -> None:
    for row, latent in zip(self.rows, latents):
      if latent is not None:
        row.append_chunk(latent, chunk)


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

  Per row it keeps the logical-order and RoPE-position cursors of the example being
  written, mirroring `sequence.layout_example`: a generated chunk's noisy copy
  takes n orders and its clean copy the next n, both at the same positions.
  With `record=True` it keeps every attention mask row 0 used (`records`), for tests.
  With `window=True` (one row only) a write that does not fit slides the window
  (`_slide`): the prompt and first frame stay, the oldest whole chunks go, the
  cache is rebuilt.
  """

  def __init__(self, model, params, exp: Experiment, capacity: int | None = None,
               record: bool = False, window: bool = False, batch: int = 1):
    if window and batch != 1:
      raise ValueError("the sliding window rebuilds one row's cache: it needs batch=1")
    self.model, self.params, self.exp = model, params, exp
    n = exp.model.tokens_per_chunk
    self.n, self.batch = n, batch
    self.capacity = capacity or exp.seq.text_len + exp.seq.max_chunks * n
    self.cache = kv_cache.init_cache(exp.model, batch, self.capacity)
    # Host mirrors of the cursors and of cache.length (no device sync to check room).
    self.order = np.zeros(batch, np.int64)
    self.pos = np.zeros(batch, np.int64)
    self.used = np.zeros(batch, np.int64)
    self._logits = jnp.zeros((batch, exp.model.vocab_size), jnp.float32)
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

  def _meta(self, count: np.ndarray, width: int, modality, chunk_id, order0: np.ndarray,
            plan, drops=(False,)):
    """SeqMeta of [B·r, width] (r = len(drops); row b·r + j is row b with drops[j]):
    count[b] consecutive slots of row b from logical order order0[b], then padding."""
    r = len(drops)
    ar = np.arange(width, dtype=np.int64)[None]
    valid = ar < np.asarray(count)[:, None]
    full = lambda v: np.broadcast_to(np.asarray(v, np.int64).reshape(-1, 1),
                                     (self.batch, width))
    cols = dict(segment_ids=valid, modality=np.where(valid, modality, sequence.PAD),
                chunk_ids=full(chunk_id) * valid, positions=(self.pos[:, None] + ar) * valid,
                order=(np.asarray(order0)[:, None] + ar) * valid,
                plan_ids=full(plan) * valid)
    rep = lambda a: jnp.asarray(np.repeat(np.asarray(a, np.int32), r, axis=0))
    drop = np.tile(np.asarray(drops, bool), self.batch)[:, None] & valid.repeat(r, axis=0)
    return masks.SeqMeta(**{k: rep(v) for k, v in cols.items()}, cfg_drop=jnp.asarray(drop))

  def _size(self, piece) -> int:
    return len(piece[1]) if piece[0] == "text" else self.n

  def _room(self, count: np.ndarray):
    """Makes room for count[b] more slots per row: slides the window, or raises."""
    if np.all(self.used + count <= self.capacity):
      return
    if not self.window:
      b = int(np.argmax(self.used + count - self.capacity))
      raise CacheFullError(f"KV cache full: row {b} has {self.used[b]} of {self.capacity} "
                           f"slots used, {count[b]} more needed (raise "
                           f"SamplerConfig.capacity or set SamplerConfig.sliding_window)")
    self._slide(int(count[0]))

  def _units(self):
    """Splits the written pieces into (prefix, complete chunk units, open tail).

    prefix: the prompt, and the first frame with its EOF; a unit: text_i, BOF, clean_i, EOF.
    """
    pieces = list(self.pieces)
    k = 3 if len(pieces) > 1 and pieces[1][0] == "clean" and pieces[1][2] is None else 1
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
    self.order[:] = self.pos[:] = self.used[:] = 0
    for piece in kept:
      if piece[0] == "text":
        self._write_text([piece[1]], [piece[2]])
      else:
        self._write_clean([piece[1]], piece[2])
    self.pieces = kept

  def _keep(self, kind: str, q_meta: masks.SeqMeta, cache: kv_cache.KVCache):
    """Records row 0's mask (and, for CFG, its unconditional copy) when `record`."""
    if not self.record:
      return
    reps = q_meta.segment_ids.shape[0] // cache.batch
    m = np.asarray(kv_cache.attention_mask(cache.tile(reps) if reps > 1 else cache, q_meta))
    used = int(self.used[0])
    valid = np.asarray(q_meta.segment_ids[0]) > 0
    q_order = np.asarray(q_meta.order[0])[valid]
    self.records.append({
        "kind": kind, "drop": np.asarray(q_meta.cfg_drop[:reps, 0]),
        "q_order": q_order,
        "k_order": np.concatenate([np.asarray(cache.meta.order[0, :used]), q_order]),
        "k_modality": np.asarray(cache.meta.modality[0, :used]),
        "mask": np.concatenate([m[:reps, valid, :used],
                                m[:reps][:, valid][:, :, self.capacity:][:, :, valid]], axis=2),
        "unused_visible": bool(m[:reps, valid, used:self.capacity].any())})

  @staticmethod
  def _counts(items) -> np.ndarray:
    return np.asarray([0 if t is None else len(t) for t in items], np.int64)

  def append_text(self, tokens, plans) -> None:
    tokens = [None if t is None else np.asarray(t, np.int32) for t in tokens]
    count = self._counts(tokens)
    if not count.any():
      return
    self._room(count)
    if self.window:
      self.pieces.append(("text", tokens[0], plans[0]))
    self._write_text(tokens, plans)

  def _write_text(self, tokens, plans) -> None:
    count = self._counts(tokens)
    width = int(count.max())
    block = np.full((self.batch, width), self.exp.seq.pad_id, np.int32)
    for b, t in enumerate(tokens):
      if t is not None:
        block[b, :len(t)] = t
    meta = self._meta(count, width, sequence.TEXT, 0, self.order, plans)
    self._keep("text", meta, self.cache)
    self.cache, self._logits = self._append_text(self.params, self.cache, jnp.asarray(block),
                                                 meta, jnp.asarray(count, jnp.int32),
                                                 self._logits)
    self.order += count
    self.pos += count
    self.used += count

  def logits(self, rows=None) -> jax.Array:
    """f32[B, V]: each row's next-token logits (computed when its text was written)."""
    return self._logits

  def _noisy_meta(self, chunk: int, reps: int) -> masks.SeqMeta:
    drops = (False, True)[:reps]
    count = np.full(self.batch, self.n)
    return self._meta(count, self.n, sequence.NOISY, self._noisy_id(chunk), self.order,
                      chunk + 1, drops)

  def velocities(self, x: jax.Array, t: float, chunk: int, reps: int) -> jax.Array:
    """One velocity evaluation: x f32[B, h, w, c] -> f32[B, reps, h, w, c]."""
    meta = self._noisy_meta(chunk, reps)
    self._keep("noisy", meta, self.cache)
    xs = jnp.repeat(jnp.asarray(x, jnp.float32), reps, axis=0)
    v = self._velocity(self.params, self.cache, xs,
                       jnp.full((reps * self.batch,), t, jnp.float32), meta)
    return v.reshape(self.batch, reps, *v.shape[1:])

  def denoise(self, x: jax.Array, chunk: int, rows, sc: SamplerConfig, grid) -> jax.Array:
    """All rows integrate chunk `chunk` in one jitted loop (rows not asked are ignored)."""
    meta = self._noisy_meta(chunk, 1 if sc.cfg_scale == 1.0 else 2)
    self._keep("noisy", meta, self.cache)
    return _DENOISE(self.model, self.params, self.cache, jnp.asarray(x, jnp.float32),
                    jnp.asarray(grid, jnp.float32), meta,
                    jnp.asarray(sc.cfg_scale, jnp.float32), sc.solver)

  def append_chunk(self, latents, chunk: int | None) -> None:
    count = np.asarray([0 if l is None else self.n for l in latents], np.int64)
    if not count.any():
      return
    self._room(count)
    if self.window:
      self.pieces.append(("clean", latents[0], chunk))
    self._write_clean(latents, chunk)

  def _write_clean(self, latents, chunk: int | None) -> None:
    count = np.asarray([0 if l is None else self.n for l in latents], np.int64)
    shape = tuple(self.exp.model.latent_shape)
    block = np.stack([np.zeros(shape, np.float32) if l is None else np.asarray(l, np.float32)
                      for l in latents])
    # A generated chunk's clean copy follows its noisy copy in logical order.
    order0 = self.order + (0 if chunk is None else self.n)
    meta = self._meta(count, self.n, sequence.CLEAN, self._clean_id(chunk), order0, 0)
    self._keep("clean", meta, self.cache)
    self.cache = self._append_clean(self.params, self.cache, jnp.asarray(block), meta,
                                    jnp.asarray(count, jnp.int32))
    wrote = count > 0
    self.order = np.where(wrote, order0 + self.n, self.order)
    self.pos += count
    self.used += count


def sample(model, params, exp: Experiment, request: Request | Sequence[Request],
           sc: SamplerConfig = SamplerConfig()) -> Generation | list[Generation]:
  """Generates with the KV cache (the entry point): see `generate_batch`.

  request: one Request (returns a Generation) or a list of them, generated together
  as the rows of one batch (returns a list; the sliding window needs a single request).
  With `sc.uncond == 'plan_free'` (and cfg_scale != 1) the CFG branch comes from a second,
  plan-free cache (`plan_free.PlanFreeBackend`).
  """
  check_config(sc, exp.model)
  one = isinstance(request, Request)
  requests = [request] if one else list(request)
  if not requests:
    raise RequestError("requests: at least one request is needed")
  if sc.sliding_window and len(requests) > 1:
    raise RequestError("SamplerConfig.sliding_window rebuilds one request's cache: generate "
                       f"the {len(requests)} requests one at a time")
  make = lambda: CachedBackend(model, params, exp, sc.capacity, window=sc.sliding_window,
                               batch=len(requests))
  backend = make()
  if sc.uncond == "plan_free" and sc.cfg_scale != 1.0:
    backend = plan_free.PlanFreeBackend(backend, make(), exp.seq.bof_id)
  gens = generate_batch(backend, requests, exp, sc)
  return gens[0] if one else gens


__all__ = ["CacheFullError", "CachedBackend", "Generation", "Request", "RequestError",
           "RowwiseBackend", "SamplerConfig", "generate", "generate_batch", "sample"]
