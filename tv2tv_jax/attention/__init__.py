"""Attention over the interleaved sequence: one dispatch, several implementations.

`attend` is the only entry the model calls. Implementations:
  'xla'    -- `reference.reference_attention`: dense mask from metadata (default on
              CPU/GPU, and the oracle the kernel is tested against).
  'pallas' -- the interleaved splash-attention kernel (TPU; interpret mode on CPU).

Every layer attends under the same mask, so what an implementation derives from the
metadata alone can be built once per step: `prepare(meta, impl)` returns that plan
(None when the implementation has none) and `attend(..., plan=plan)` uses it.
'pallas' plans its block tables and packed metadata (`kernel_plan.KernelPlan`);
'xla' has no plan: its dense mask, recomputed per layer, fuses into the logits,
whereas a precomputed bool[B, L, L] would be materialised and kept live all step.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from tv2tv_jax import masks
from tv2tv_jax.attention.reference import masked_attention, reference_attention

_IMPLS = {"xla": reference_attention}
_PLANNERS: dict[str, Callable[[masks.SeqMeta], Any]] = {}


def register(name: str, fn, prepare=None) -> None:
  """Registers an implementation under `name`.

  fn(q, k, v, meta) -> out, and also fn(q, k, v, meta, plan=plan) when `prepare` is
  given: prepare(meta) -> plan, a pytree of what fn needs from `meta` alone.
  """
  _IMPLS[name] = fn
  if prepare is None:
    _PLANNERS.pop(name, None)
  else:
    _PLANNERS[name] = prepare


def _impl(name: str):
  if name == "pallas" and "pallas" not in _IMPLS:
    # Imported lazily: the kernel module pulls in Pallas/Mosaic.
    from tv2tv_jax.attention import kernel  # noqa: F401  (registers itself)
  if name not in _IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; known: {sorted(_IMPLS)}")
  return _IMPLS[name]


def prepare(meta: masks.SeqMeta, impl: str = "xla") -> Any:
  """The plan `attend(..., impl=impl)` can reuse for every layer of a step, or None.

  meta: per-slot metadata, [B, L] each. The plan is a pytree of batch-leading arrays
  ([B, ...]), so it can be broadcast through `nn.scan` and shards like `meta`.
  """
  _impl(impl)
  planner = _PLANNERS.get(impl)
  return None if planner is None else planner(meta)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta,
           impl: str = "xla", plan: Any = None) -> jax.Array:
  """TV2TV self-attention over packed rows.

  Args:
    q: [B, L, H, dh], k: [B, L, Hkv, dh], v: [B, L, Hkv, dh] (RoPE already applied;
      q is not pre-scaled).
    meta: per-slot metadata, [B, L] each.
    impl: 'xla' or 'pallas'.
    plan: `prepare(meta, impl)`, built once and shared by the layers; None builds
      whatever the implementation needs here.
  Returns:
    [B, L, H, dh] in q's dtype.
  """
  fn = _impl(impl)
  if plan is None:
    return fn(q, k, v, meta)
  if impl not in _PLANNERS:
    raise ValueError(f"attention implementation {impl!r} takes no plan")
  return fn(q, k, v, meta, plan=plan)


__all__ = ["attend", "masked_attention", "prepare", "reference_attention", "register"]
