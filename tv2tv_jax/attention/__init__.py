"""Attention over the interleaved sequence: one dispatch, several implementations.

`attend` is the only entry the model calls. Implementations:
  'xla'    -- `reference.reference_attention`: dense mask from metadata (the oracle
              the other paths are tested against), or, given the row's storage
              regions, `reference.region_attention`: the same result without the key
              blocks the layout makes invisible (default on CPU/GPU in the model).
  'pallas' -- the interleaved splash-attention kernel (TPU; interpret mode on CPU).

Every layer attends under the same mask, so what an implementation derives from the
metadata alone can be built once per step: `prepare(meta, impl)` returns that plan
(None when the implementation has none) and `attend(..., plan=plan)` uses it.
'pallas' plans its block tables and packed metadata (`kernel_plan.KernelPlan`).
'xla' plans no arrays: its mask, recomputed per layer, fuses into the logits, whereas
a precomputed bool[B, L, L] would be materialised and kept live all step. Given
`regions` (`masks.Regions`, static sizes from the model's input shapes) its plan is
`RegionPlan`, which holds only those sizes; 'pallas' ignores regions (its block
tables skip the same blocks from the metadata).

Decoding runs the same layers on a few new slots against a KV cache:
`prepare(meta, impl, cached=cache_meta)` plans the new slots' queries against the keys
[cache | new] (`masks.against_cache`), and `attend` is then called with those keys.
Both implementations have a cached plan: 'pallas' a forward-only `KernelPlan` of the
two slot sets (cache blocks a query cannot see are never loaded), 'xla' the small
dense mask bool[B, Lq, C + Lq] (`CachedMask`), built once for every layer.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax

from tv2tv_jax import masks
from tv2tv_jax.attention.reference import (masked_attention, reference_attention,
                                           region_attention)


@flax.struct.dataclass
class CachedMask:
  """The 'xla' plan of queries against a KV cache: mask bool[B, Lq, C + Lq]."""
  mask: jax.Array


@flax.struct.dataclass
class RegionPlan:
  """The 'xla' plan of self-attention over rows in the storage layout: `region_attention`.

  Static sizes only (no array leaves), so it broadcasts through `nn.scan` and `nn.remat`
  as a constant and every layer recomputes its (fused) mask pieces from the metadata.
  """
  regions: masks.Regions = flax.struct.field(pytree_node=False)


def _xla_attention(q, k, v, meta, plan: CachedMask | RegionPlan | None = None):
  if plan is None:
    return reference_attention(q, k, v, meta)
  if isinstance(plan, RegionPlan):
    return region_attention(q, k, v, meta, plan.regions)
  if not isinstance(plan, CachedMask):
    raise ValueError(f"attention implementation 'xla' takes no plan but the CachedMask of "
                     f"`prepare(..., cached=...)` or the RegionPlan of "
                     f"`prepare(..., regions=...)`; got {type(plan).__name__}")
  return masked_attention(q, k, v, plan.mask)


def _xla_cached_plan(meta: masks.SeqMeta, cached: masks.SeqMeta) -> CachedMask:
  return CachedMask(masks.cross_mask(meta, *masks.against_cache(cached, meta)))


def _xla_region_plan(meta: masks.SeqMeta, regions: masks.Regions) -> RegionPlan:
  regions.check(meta.segment_ids.shape[-1])
  return RegionPlan(regions)


_IMPLS = {"xla": _xla_attention}
_PLANNERS: dict[str, Callable[[masks.SeqMeta], Any]] = {}
_CACHED_PLANNERS: dict[str, Callable[[masks.SeqMeta, masks.SeqMeta], Any]] = {
    "xla": _xla_cached_plan}
_REGION_PLANNERS: dict[str, Callable[[masks.SeqMeta, masks.Regions], Any]] = {
    "xla": _xla_region_plan}


def register(name: str, fn, prepare=None, prepare_cached=None, prepare_regions=None) -> None:
  """Registers an implementation under `name`.

  fn(q, k, v, meta) -> out, and also fn(q, k, v, meta, plan=plan) when a planner is
  given: prepare(meta) -> plan, a pytree of what fn needs from `meta` alone, for
  self-attention; prepare_cached(meta, cached) -> plan for queries `meta` against
  keys [cached | meta] (decoding against a KV cache; see the module docstring);
  prepare_regions(meta, regions) -> plan for self-attention over rows in the storage
  layout `regions` (without it, `prepare` ignores regions and uses `prepare`).
  """
  _IMPLS[name] = fn
  for table, planner in ((_PLANNERS, prepare), (_CACHED_PLANNERS, prepare_cached),
                         (_REGION_PLANNERS, prepare_regions)):
    if planner is None:
      table.pop(name, None)
    else:
      table[name] = planner


def _impl(name: str):
  if name == "pallas" and "pallas" not in _IMPLS:
    # Imported lazily: the kernel module pulls in Pallas/Mosaic.
    from tv2tv_jax.attention import kernel  # noqa: F401  (registers itself)
  if name not in _IMPLS:
    raise ValueError(f"unknown attention implementation {name!r}; known: {sorted(_IMPLS)}")
  return _IMPLS[name]


def prepare(meta: masks.SeqMeta, impl: str = "xla", cached: masks.SeqMeta | None = None,
            regions: masks.Regions | None = None) -> Any:
  """The plan `attend(..., impl=impl)` can reuse for every layer of a step, or None.

  meta: per-slot metadata of the queries, [B, L] each.
  cached: None for self-attention over `meta`'s slots; for decoding, the metadata
    of the KV cache's slots ([B, C]) that precede the queries: keys are then
    [cached | meta] (`masks.against_cache`). Every implementation plans this case.
  regions: self-attention only: the rows' storage layout (`masks.Regions`, static),
    which lets 'xla' skip the key blocks the layout makes invisible (`RegionPlan`);
    implementations without a region planner ('pallas') ignore it.
  The plan is a pytree of batch-leading arrays ([B, ...]) and static fields, so it
  can be broadcast through `nn.scan` and shards like `meta`.
  """
  _impl(impl)
  if cached is not None:
    if regions is not None:
      raise ValueError("regions describe a row attending to itself; decoding against a "
                       "KV cache takes cached= only")
    if impl not in _CACHED_PLANNERS:
      raise ValueError(f"attention implementation {impl!r} cannot attend to a KV cache")
    return _CACHED_PLANNERS[impl](meta, cached)
  if regions is not None and impl in _REGION_PLANNERS:
    return _REGION_PLANNERS[impl](meta, regions)
  planner = _PLANNERS.get(impl)
  return None if planner is None else planner(meta)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta,
           impl: str = "xla", plan: Any = None) -> jax.Array:
  """TV2TV attention over packed rows, or of new slots against a KV cache.

  Args:
    q: [B, L, H, dh], k: [B, Lk, Hkv, dh], v: [B, Lk, Hkv, dh] (RoPE already applied;
      q is not pre-scaled). Lk = L for self-attention; C + L against a cache of C
      slots (k, v then hold the cache's keys followed by the queries' own).
    meta: per-slot metadata of the queries, [B, L] each.
    impl: 'xla' or 'pallas'.
    plan: `prepare(meta, impl[, cached=... | regions=...])`, built once and shared by
      the layers; None builds whatever the implementation needs here (self-attention
      only, dense for 'xla': attending to a cache needs `prepare(meta, impl, cached=...)`).
  Returns:
    [B, L, H, dh] in q's dtype.
  """
  fn = _impl(impl)
  if plan is None:
    if k.shape[1] != q.shape[1]:
      raise ValueError(f"{k.shape[1]} keys for {q.shape[1]} queries: attending to a KV "
                       f"cache needs the plan of `prepare(meta, impl, cached=...)`")
    return fn(q, k, v, meta)
  if impl not in _PLANNERS and impl not in _CACHED_PLANNERS and impl not in _REGION_PLANNERS:
    raise ValueError(f"attention implementation {impl!r} takes no plan")
  return fn(q, k, v, meta, plan=plan)


__all__ = ["CachedMask", "RegionPlan", "attend", "masked_attention", "prepare",
           "reference_attention", "region_attention", "register"]
