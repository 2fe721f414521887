"""The TV2TV generation loop (batched over requests) and `sample`, its entry point.

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
EOF is sampled nowhere but in the Think2V plan. The loop is the same for every
layout; a layout is its two text phases (`_LAYOUT_PHASES`): what it writes before
chunk 0, and chunk i's text.

Several requests run as the rows of one batch, in lockstep by chunk: at chunk i
every running row writes its text (rows that already hit BOF write nothing while
others still sample), then all rows denoise chunk i together. Think2V plan items
go the same way (rows that ended item i write nothing until all have, then EOF).
What a row generates depends only on its own request and seed (`test_sampler`
checks a batch against each request run alone).

The loop talks to a batched *backend* of B rows (`cached_backend.CachedBackend`,
wrapped by `window.SlidingWindow` or `plan_free.PlanFreeBackend` when the settings
ask; `RowwiseBackend` over per-row `recompute.RecomputeBackend`s is the from-scratch
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

import collections
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow
from tv2tv_jax.config import LAYOUTS, Experiment, ModelConfig, SequenceConfig
from tv2tv_jax.sampling import plan_free, window
from tv2tv_jax.sampling.cached_backend import CacheFullError, CachedBackend
from tv2tv_jax.sampling.decoding import (Request, RequestError, SamplerConfig, check_config,
                                         check_request, chunk_noise, next_token, text_key)


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
  plan: list = dataclasses.field(default_factory=list)  # think2v: (text, forced) per item

  def generation(self, latent_shape) -> Generation:
    shape = (0, *latent_shape)
    return Generation(chunks=np.stack(self.chunks) if self.chunks else np.zeros(shape,
                                                                               np.float32),
                      texts=self.texts, transcript=self.transcript,
                      trailing_text=self.trailing, stop_reason=self.stop)


@dataclasses.dataclass
class _Loop:
  """What every phase of one `generate_batch` call reads: the backend, the rows, the
  settings, and the tokens never sampled (`banned`: chunk text, `plan_banned`: plan items)."""
  backend: Any
  rows: list[_Row]
  sc: SamplerConfig
  seq: SequenceConfig
  banned: tuple
  plan_banned: tuple

  def write_marker(self, tok: int, active, plan: int) -> None:
    """Writes the one token `tok` (BOF / EOF) with plan id `plan` to the active rows."""
    self.backend.append_text([np.asarray([tok], np.int32) if a else None for a in active],
                             [plan] * len(self.rows))


def _write_text(loop: _Loop, active, item: int, banned, stops):
  """Writes text item `item` (text_item, plan id item + 1) of every active row.

  Rows with `item` in their interventions write that text, all in one pass; the
  others sample token by token (one pass per token for every row still sampling)
  from their last text slot's logits until they draw a token of `stops` (not
  written: the caller writes what ends the text) or hold `sc.max_text_tokens`
  tokens. A row that stopped writes nothing while others continue.

  active: [bool] * B; banned, stops: tuples of token ids.
  Returns (texts [list[int]] * B, forced [bool] * B, stop [int | None] * B): the stop
  token a row drew, None where its text was forced or cut at the budget.
  """
  rows, sc, backend = loop.rows, loop.sc, loop.backend
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


# Each layout's text, in two phases: what it writes after the prompt (and first frame)
# before chunk 0, `before(loop, num_items)`, and chunk i's text, `chunk_text(loop, i,
# active) -> (texts [list[int]] * B, forced [bool] * B)`, written before chunk i's BOF.
# `chunk_text` may end rows (clearing them in `active`; the loop then writes nothing more
# for them).


def _nothing_before(loop: _Loop, num_items: int) -> None:
  """tv2tv, t2v: chunk 0 follows the prompt (and first frame) at once."""


def _write_plan(loop: _Loop, num_items: int) -> None:
  """think2v: the whole plan first, item by item, each closed by EOF (`sequence`): item i is
  forced or sampled until EOF or the budget, with BOF and EOS banned (the plan has exactly
  num_chunks items). Each row keeps its items (`_Row.plan`) as its chunks' texts."""
  for i in range(num_items):
    active = [i < r.req.num_chunks for r in loop.rows]
    texts, forced, _ = _write_text(loop, active, i, loop.plan_banned, (loop.seq.eof_id,))
    loop.write_marker(loop.seq.eof_id, active, 0)
    for b, r in enumerate(loop.rows):
      if active[b]:
        r.plan.append((texts[b], forced[b]))


def _no_chunk_text(loop: _Loop, i: int, active):
  """t2v: no text; BOF follows at once."""
  return [[] for _ in loop.rows], [False] * len(loop.rows)


def _plan_item(loop: _Loop, i: int, active):
  """think2v: nothing is written; chunk i's text in the transcript is plan item i."""
  texts = [list(r.plan[i][0]) if a else [] for r, a in zip(loop.rows, active)]
  return texts, [bool(a and r.plan[i][1]) for r, a in zip(loop.rows, active)]


def _sample_chunk_text(loop: _Loop, i: int, active):
  """tv2tv: text_i forced or sampled until BOF, EOS or the budget. A row that draws EOS
  stops: what it sampled before is its trailing text, and it leaves `active`."""
  texts, forced, stop = _write_text(loop, active, i, loop.banned,
                                    (loop.seq.bof_id, loop.seq.eos_id))
  for b, r in enumerate(loop.rows):
    if stop[b] == loop.seq.eos_id:
      active[b] = False
      r.done, r.stop, r.trailing = True, "eos", np.asarray(texts[b], np.int32)
  return texts, forced


_Phases = collections.namedtuple("_Phases", ["before", "chunk_text"])
_LAYOUT_PHASES = {"tv2tv": _Phases(_nothing_before, _sample_chunk_text),
                  "t2v": _Phases(_nothing_before, _no_chunk_text),
                  "think2v": _Phases(_write_plan, _plan_item)}
if set(_LAYOUT_PHASES) != set(LAYOUTS):
  raise ImportError(f"sampler phases are defined for {sorted(_LAYOUT_PHASES)}, the layouts "
                    f"are {sorted(LAYOUTS)}")


def _write_prompts(loop: _Loop) -> None:
  """The prompts, then the first frames (rows that have one) as clean chunks, each closed
  by EOF (`sequence`: EOF's logits give the first token of text_0)."""
  nb = len(loop.rows)
  loop.backend.append_text([r.req.prompt for r in loop.rows], [0] * nb)
  has_frame = [r.req.first_frame is not None for r in loop.rows]
  if any(has_frame):
    loop.backend.append_chunk([r.req.first_frame for r in loop.rows], None)
    loop.write_marker(loop.seq.eof_id, has_frame, 0)


def _write_chunk(loop: _Loop, i: int, active, model: ModelConfig, grid) -> np.ndarray:
  """BOF_i, the ODE of chunk i, the clean chunk, EOF, for the active rows.

  grid: f32[m + 1], `flow.time_grid`. Returns f32[B, h, w, c] (rows not active: ignore).
  """
  rows = loop.rows
  # BOF_i carries chunk i's plan id: a CFG-dropped noisy copy must not see it (`masks`).
  loop.write_marker(loop.seq.bof_id, active, i + 1)
  x = jnp.stack([chunk_noise(r.req.seed, i, tuple(model.latent_shape)) for r in rows])
  # A replaced chunk skips the ODE (its noise is still drawn: nothing else shifts).
  ode = [a and i not in r.req.replacements for a, r in zip(active, rows)]
  if any(ode):
    x = loop.backend.denoise(x, i, ode, loop.sc, grid)
  x = np.array(x, np.float32)
  for b, r in enumerate(rows):
    if active[b] and i in r.req.replacements:
      x[b] = r.req.replacements[i]
  loop.backend.append_chunk([x[b] if a else None for b, a in enumerate(active)], i)
  loop.write_marker(loop.seq.eof_id, active, 0)
  return x


def generate_batch(backend, requests: Sequence[Request], exp: Experiment,
                   sc: SamplerConfig) -> list[Generation]:
  """Runs the loop of the module docstring for len(requests) rows of `backend`: the
  prompts and first frames, the layout's text before the chunks, then per chunk the
  layout's chunk text, BOF, the ODE, the clean chunk and EOF.

  Raises RequestError (naming the field, prefixed `requests[b].` in a batch).
  """
  seq, model = exp.seq, exp.model
  check_config(sc, model)
  rows = [_Row(r) for r in _check_all(requests, exp, sc)]
  # Never sample pad, nor ids the tokenizer lacks. Chunk text: never EOF (the loop
  # writes it after each chunk). Think2V plan items: EOF ends an item; never BOF or
  # EOS (the plan has exactly num_chunks items, and the chunks follow it).
  unknown = tuple(range(sc.text_vocab or model.vocab_size, model.vocab_size))
  loop = _Loop(backend, rows, sc, seq, banned=(seq.pad_id, seq.eof_id) + unknown,
               plan_banned=(seq.pad_id, seq.bof_id, seq.eos_id) + unknown)
  phases = _LAYOUT_PHASES[sc.layout]
  grid = np.asarray(flow.time_grid(sc.steps, sc.shift), np.float32)
  last = max(r.req.num_chunks for r in rows)
  _write_prompts(loop)
  phases.before(loop, last)
  for i in range(last):
    active = [not r.done and i < r.req.num_chunks for r in rows]
    if not any(active):
      break
    texts, forced = phases.chunk_text(loop, i, active)
    if not any(active):
      break
    x = _write_chunk(loop, i, active, model, grid)
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


def sample(model, params, exp: Experiment, request: Request | Sequence[Request],
           sc: SamplerConfig = SamplerConfig()) -> Generation | list[Generation]:
  """Generates with the KV cache (the entry point): see `generate_batch`.

  request: one Request (returns a Generation) or a list of them, generated together
  as the rows of one batch (returns a list; the sliding window needs a single request).
  With `sc.sliding_window` the cache is a `window.SlidingWindow` (a full cache drops the
  oldest chunks instead of raising CacheFullError).
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
  make = lambda: CachedBackend(model, params, exp, sc.capacity, batch=len(requests))
  # check_config refuses the sliding window with the plan-free branch (it would not
  # rebuild the shadow cache).
  if sc.sliding_window:
    backend = window.SlidingWindow(make, exp.seq.eof_id)
  elif sc.uncond == "plan_free" and sc.cfg_scale != 1.0:
    backend = plan_free.PlanFreeBackend(make(), make(), exp.seq.bof_id)
  else:
    backend = make()
  gens = generate_batch(backend, requests, exp, sc)
  return gens[0] if one else gens


__all__ = ["CacheFullError", "CachedBackend", "Generation", "Request", "RequestError",
           "RowwiseBackend", "SamplerConfig", "generate", "generate_batch", "sample"]
