"""Requests, sampler settings, their validation, and the next-token rule.

Kept apart from the generation loop so that the cached sampler and the
recompute oracle (`recompute.py`) share exactly the same decisions: the same
token from the same logits and key, the same noise for the same chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import sequence
from tv2tv_jax.config import LAYOUTS, UNCOND_BRANCHES, ModelConfig, SequenceConfig

SOLVERS = ("euler", "heun")


class RequestError(ValueError):
  """A generation request or sampler setting is malformed; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Request:
  """What to generate.

  Attributes:
    prompt: i32[P] meta-prompt tokens (no special tokens), P >= 1.
    num_chunks: chunk budget (generated chunks, not counting the first frame).
    first_frame: optional f32[h, w, c] latent, cached as a clean chunk after the prompt.
    interventions: chunk index i (0-based, < num_chunks) -> i32[*] text forced as
      text_i instead of sampling it (then BOF is forced; think2v: plan item i, then
      EOF, and the items after it are sampled conditioned on it).
    replacements: chunk index i -> f32[h, w, c] latent used as chunk i instead of
      generating it (its text is still sampled or forced; it is cached as usual).
    seed: all randomness (text sampling, chunk noise) derives from it.
  """
  prompt: Sequence[int]
  num_chunks: int
  first_frame: np.ndarray | None = None
  interventions: Mapping[int, Sequence[int]] = dataclasses.field(default_factory=dict)
  replacements: Mapping[int, np.ndarray] = dataclasses.field(default_factory=dict)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampler settings.

  Text: `greedy`, else softmax sampling at `temperature`, restricted to the `top_k`
  most likely tokens (0: off) and to the smallest set with mass >= `top_p` (1: off).
  `max_text_tokens` caps one chunk's text (Think2V: one plan item); at the cap BOF
  (Think2V: EOF) is forced.
  Video: `steps` ODE steps of `solver` on `flow.time_grid(steps, shift)`, CFG scale
  `cfg_scale` (1: conditional only, no second branch).
  `capacity`: KV-cache slots (default: seq.text_len + seq.max_chunks · n).
  `sliding_window`: when the cache is full, drop the oldest chunks (keeping the
  prompt and first frame) and rebuild it, instead of raising CacheFullError.
  `layout`: 'tv2tv' (text before every chunk), 't2v' (no chunk text) or 'think2v'
  (the whole plan, one item per chunk, sampled or forced item by item, then all
  chunks).
  `text_vocab`: ids at or above it are never sampled (a model vocabulary padded
  beyond its tokenizer's; None: the whole model vocabulary).
  `uncond`: what CFG's second branch is (with cfg_scale != 1): 'mask' (default) the same
  cache queried with the chunk's plan and BOF hidden (`masks.visible`; exactly
  unconditional on that plan in TV2TV, leaky in Think2V), or 'plan_free' a second cache
  in which no plan text was written (`plan_free`; exactly unconditional on the whole plan
  in every layout; wants a model trained with `data.plan_drop_rate` > 0).
  """
  steps: int = 16
  shift: float = 1.0
  solver: str = "euler"
  cfg_scale: float = 1.0
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_text_tokens: int = 16
  capacity: int | None = None
  sliding_window: bool = False
  layout: str = "tv2tv"
  text_vocab: int | None = None
  uncond: str = UNCOND_BRANCHES[0]


def check_config(sc: SamplerConfig, model: ModelConfig) -> None:
  """Raises RequestError naming the first bad SamplerConfig field."""
  checks = [
      (sc.steps >= 1, "steps", f"must be >= 1, got {sc.steps}"),
      (sc.shift > 0, "shift", f"must be > 0, got {sc.shift}"),
      (sc.solver in SOLVERS, "solver", f"must be one of {SOLVERS}, got {sc.solver!r}"),
      (np.isfinite(sc.cfg_scale), "cfg_scale", f"must be finite, got {sc.cfg_scale}"),
      (sc.greedy or sc.temperature > 0, "temperature", f"must be > 0, got {sc.temperature}"),
      (0 <= sc.top_k <= model.vocab_size, "top_k",
       f"must be in [0, {model.vocab_size}], got {sc.top_k}"),
      (0 < sc.top_p <= 1, "top_p", f"must be in (0, 1], got {sc.top_p}"),
      (sc.max_text_tokens >= 0, "max_text_tokens", f"must be >= 0, got {sc.max_text_tokens}"),
      (sc.capacity is None or sc.capacity >= 1, "capacity", f"must be >= 1, got {sc.capacity}"),
      (sc.layout in LAYOUTS, "layout",
       f"must be one of {LAYOUTS}, got {sc.layout!r}"),
      (sc.text_vocab is None or 0 < sc.text_vocab <= model.vocab_size, "text_vocab",
       f"must be in (0, {model.vocab_size}], got {sc.text_vocab}"),
      (sc.uncond in UNCOND_BRANCHES, "uncond",
       f"must be one of {UNCOND_BRANCHES}, got {sc.uncond!r}"),
      (not (sc.uncond == "plan_free" and sc.sliding_window), "uncond",
       "'plan_free' keeps a second cache that the sliding window does not rebuild: use "
       "sliding_window=False"),
  ]
  for ok, field, msg in checks:
    if not ok:
      raise RequestError(f"SamplerConfig.{field} {msg}")


def _check_tokens(tokens, field: str, seq: SequenceConfig, vocab: int,
                  allow_empty: bool) -> np.ndarray:
  problem = sequence.text_token_error(tokens, field, seq, vocab)
  if problem:
    raise RequestError(problem)
  arr = np.asarray(tokens)
  if not arr.size and not allow_empty:
    raise RequestError(f"{field} is empty; at least one token is needed")
  return arr.astype(np.int32)


def check_request(req: Request, seq: SequenceConfig, model: ModelConfig,
                  sc: SamplerConfig) -> Request:
  """Validates a request; returns it with numpy arrays. Raises RequestError naming the field."""
  if not isinstance(req.num_chunks, (int, np.integer)) or req.num_chunks < 1:
    raise RequestError(f"num_chunks must be a positive integer, got {req.num_chunks!r}")
  prompt = _check_tokens(req.prompt, "prompt", seq, model.vocab_size, allow_empty=False)
  first = None
  if req.first_frame is not None:
    first = np.asarray(req.first_frame, np.float32)
    if first.shape != tuple(model.latent_shape):
      raise RequestError(f"first_frame has shape {first.shape}, expected the latent shape "
                         f"{tuple(model.latent_shape)}")
    if not np.isfinite(first).all():
      raise RequestError("first_frame contains NaN or inf")
  forced = {}
  for i, text in dict(req.interventions).items():
    if not isinstance(i, (int, np.integer)) or not 0 <= i < req.num_chunks:
      raise RequestError(f"interventions[{i!r}]: chunk index must be in [0, num_chunks="
                         f"{req.num_chunks}), i.e. within the chunk budget")
    if sc.layout == "t2v":
      raise RequestError(f"interventions[{i}]: the t2v layout has no chunk text to force")
    forced[int(i)] = _check_tokens(text, f"interventions[{i}]", seq, model.vocab_size,
                                   allow_empty=True)
  replaced = {}
  for i, latent in dict(req.replacements).items():
    if not isinstance(i, (int, np.integer)) or not 0 <= i < req.num_chunks:
      raise RequestError(f"replacements[{i!r}]: chunk index must be in [0, num_chunks="
                         f"{req.num_chunks}), i.e. within the chunk budget")
    latent = np.asarray(latent, np.float32)
    if latent.shape != tuple(model.latent_shape) or not np.isfinite(latent).all():
      raise RequestError(f"replacements[{i}] must be a finite latent of shape "
                         f"{tuple(model.latent_shape)}, got shape {latent.shape}")
    replaced[int(i)] = latent
  return dataclasses.replace(req, prompt=prompt, first_frame=first, interventions=forced,
                             replacements=replaced, num_chunks=int(req.num_chunks))


def filter_logits(logits: jax.Array, sc: SamplerConfig, banned: Sequence[int]) -> jax.Array:
  """f32[V] -> f32[V] with -inf outside the allowed set (banned ids, top-k, top-p).

  Banned ids are tokens that cannot come next in text (pad; EOF in chunk text, where
  only the sampler writes it after a chunk; BOF and EOS in a Think2V plan item).
  """
  logits = logits.astype(jnp.float32)
  logits = logits.at[jnp.asarray(banned, jnp.int32)].set(-jnp.inf)
  if sc.greedy:
    return logits
  logits = logits / sc.temperature
  if sc.top_k:
    kth = jax.lax.top_k(logits, sc.top_k)[0][-1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sc.top_p < 1.0:
    sorted_logits = jnp.sort(logits)[::-1]
    probs = jax.nn.softmax(sorted_logits)
    # Keep a token while the mass strictly before it is < top_p (the first always stays).
    before = jnp.cumsum(probs) - probs
    keep = before < sc.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf))
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def next_token(logits: jax.Array, key: jax.Array, sc: SamplerConfig,
               banned: Sequence[int]) -> jax.Array:
  """One next-token draw from f32[V] logits: i32[] (argmax when greedy)."""
  filtered = filter_logits(logits, sc, banned)
  if sc.greedy:
    return jnp.argmax(filtered).astype(jnp.int32)
  return jax.random.categorical(key, filtered).astype(jnp.int32)


def text_key(seed: int, step: int) -> jax.Array:
  """The key of the `step`-th sampled text token (forced tokens use none)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), step)


def chunk_noise(seed: int, chunk: int, shape) -> jax.Array:
  """x_0 ~ N(0, I) of chunk `chunk`, f32[shape]: a function of (seed, chunk) only, so an
  intervention at a later chunk cannot change it."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), chunk)
  return jax.random.normal(key, shape, jnp.float32)
