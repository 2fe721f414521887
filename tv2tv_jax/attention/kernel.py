"""The interleaved splash-attention kernel: public API, custom VJP, sharding, registration.

Block-sparse flash attention whose mask is the TV2TV rule read from per-slot
metadata (`masks.visible`), not a static mask:

1. `block_table.block_table` classifies every (q-block, kv-block) pair of every
   row as EMPTY / PARTIAL / FULL from per-block summaries of the metadata and
   lists, per q-block, the kv-blocks to visit (and the transpose for dk/dv);
   `kernel_plan.make_plan` bundles the tables with the packed metadata, once per
   step when the model asks for it (`attention.prepare`), for every layer;
2. the forward kernel (`kernel_forward`) runs an online softmax over the listed
   kv-blocks only (scalar prefetch drives the DMAs); PARTIAL blocks evaluate
   `masks.visible` on the two blocks' metadata tiles, FULL blocks skip the mask;
3. the backward kernels (`kernel_backward`) recompute p from the saved
   log-sum-exp: dq per q-block, dk/dv fused per kv-block.

Importing this module registers it as `attention.attend(..., impl='pallas')`.
On CPU the kernels run in Pallas interpret mode (the only mode there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tv2tv_jax import masks
from tv2tv_jax.attention import register
from tv2tv_jax.attention.kernel_backward import dkv_call, dq_call
from tv2tv_jax.attention.kernel_forward import (DEFAULT_BLOCK_SIZES, BlockSizes,
                                                default_block_sizes, default_interpret,
                                                forward_call)
from tv2tv_jax.attention.kernel_plan import KernelPlan, cached_plan, make_plan, self_plan


@dataclasses.dataclass(frozen=True)
class _Static:
  interpret: Any  # bool, or pltpu.InterpretParams (TPU-semantics simulation on CPU)
  scale: float


def _core_fwd(q, k, v, q_meta, k_meta_t, tables, static):
  out, lse = forward_call(q, k, v, q_meta, k_meta_t, tables[0], interpret=static.interpret,
                          scale=static.scale)
  return out, (q, k, v, q_meta, k_meta_t, tables, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, q_meta, k_meta_t, tables, static):
  """out [B, H, Lq, dh] on kernel layouts; `tables` = (forward/dq table, dk/dv table)."""
  return _core_fwd(q, k, v, q_meta, k_meta_t, tables, static)[0]


def _core_bwd(static, res, d_out):
  q, k, v, q_meta, k_meta_t, tables, out, lse = res
  # delta_i = sum_d dO_id O_id: the softmax-Jacobian term, once per row, in f32.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  kw = dict(interpret=static.interpret, scale=static.scale)
  dq = dq_call(q, k, v, d_out, lse, delta, q_meta, k_meta_t, tables[0], **kw)
  dk, dv = dkv_call(q, k, v, d_out, lse, delta, q_meta, k_meta_t, tables[1], **kw)
  # Metadata and block tables are integer inputs: no cotangent.
  return dq, dk, dv, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _to_kernel_layout(x, length):
  """[B, L, H, dh] -> [B, H, length, dh], zero-padded along L."""
  x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  return jnp.swapaxes(x, 1, 2)


def plan_attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: KernelPlan, *,
                   interpret: bool | None = None, scale: float | None = None) -> jax.Array:
  """Attention of queries to keys under a prebuilt `KernelPlan`, differentiable.

  Args:
    q: [B, Lq, H, dh]; k, v: [B, Lk, Hkv, dh], f32 or bf16 (Hkv divides H); q not pre-scaled;
      Lq, Lk the plan's `lq`, `lk`.
    plan: from `kernel_plan.make_plan` (or `self_plan`) on these queries' and keys' slots.
    interpret: Pallas interpret mode (default: True on CPU); a `pltpu.InterpretParams`
      simulates TPU semantics (DMA, races, NaN-filled uninitialised memory) on CPU.
    scale: logit scale (default 1/sqrt(dh)).
  Returns:
    [B, Lq, H, dh] in q's dtype; a query that sees no key gets exact zeros.
  """
  b, lq, h, dh = q.shape
  lk, hkv = k.shape[1], k.shape[2]
  if h % hkv:
    raise ValueError(f"{hkv} kv heads do not divide {h} query heads")
  if (lq, lk) != (plan.lq, plan.lk):
    raise ValueError(f"q/k lengths {(lq, lk)} differ from the plan's {(plan.lq, plan.lk)}")
  interpret = default_interpret() if interpret is None else interpret
  if isinstance(interpret, (bool, int)):
    interpret = bool(interpret)
  static = _Static(interpret=interpret, scale=float(dh ** -0.5 if scale is None else scale))
  lq_pad, lk_pad = plan.q_meta.shape[1], plan.k_meta_t.shape[2]
  out = _core(_to_kernel_layout(q, lq_pad), _to_kernel_layout(k, lk_pad),
              _to_kernel_layout(v, lk_pad), plan.q_meta, plan.k_meta_t, plan.tables, static)
  return jnp.swapaxes(out, 1, 2)[:, :lq]


def attention_from_fields(q: jax.Array, k: jax.Array, v: jax.Array, q_fields: masks.SlotFields,
                          k_fields: masks.SlotFields, *, block_sizes: BlockSizes | None = None,
                          interpret: bool | None = None, scale: float | None = None) -> jax.Array:
  """Attention of queries to keys under `masks.visible(q_fields, k_fields)`, differentiable.

  Args:
    q: [B, Lq, H, dh]; k, v: [B, Lk, Hkv, dh], f32 or bf16 (Hkv divides H); q not pre-scaled.
    q_fields, k_fields: SlotFields of [B, Lq] / [B, Lk] (slot indices must be distinct
      between distinct slots; they only matter for padding self-edges).
    block_sizes: kernel tiles (default: `default_block_sizes()` for device 0), clamped
      to the sequence; lengths are padded to a multiple of the blocks with padding slots.
    interpret, scale: as in `plan_attention`.
  Returns:
    [B, Lq, H, dh] in q's dtype; a query that sees no key gets exact zeros.
  """
  plan = make_plan(q_fields, k_fields, block_sizes)
  return plan_attention(q, k, v, plan, interpret=interpret, scale=scale)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta, *,
                     block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                     plan: KernelPlan | None = None) -> jax.Array:
  """TV2TV self-attention over packed rows; same contract as `reference_attention`.

  q: [B, L, H, dh], k/v: [B, L, Hkv, dh] (f32 or bf16), meta: SeqMeta of [B, L].
  plan: `kernel_plan.self_plan(meta, block_sizes)` built once by the caller (then
    `block_sizes` is unused); built here when None.
  Returns [B, L, H, dh] in q's dtype. Differentiable in q, k, v (custom VJP).
  """
  plan = self_plan(meta, block_sizes) if plan is None else plan
  return plan_attention(q, k, v, plan, interpret=interpret)


def _usable(mesh, names: Sequence[str], size: int) -> tuple[str, ...]:
  """The mesh axes among `names` whose product divides `size` (greedy, in order)."""
  used, prod = [], 1
  for name in names:
    if name in mesh.axis_names and size % (prod * mesh.shape[name]) == 0:
      used.append(name)
      prod *= mesh.shape[name]
  return tuple(used)


def _batch_spec(mesh, batch_axes: Sequence[str], rows: int):
  """The mesh axes (or None) that split `rows` rows, as a PartitionSpec entry."""
  return _usable(mesh, batch_axes, rows) or None


def sharded_splash_attention(mesh, batch_axes: Sequence[str] = ("data", "fsdp"),
                             head_axis: str | None = "tensor", *,
                             block_sizes: BlockSizes | None = None,
                             interpret: bool | None = None):
  """`fn(q, k, v, meta, plan=None) -> out` running the kernel inside `jax.shard_map`.

  Rows are split over `batch_axes` and heads over `head_axis` (query and kv heads
  alike, so each shard keeps whole GQA groups). Without a plan every shard builds its
  own from its rows' metadata (`splash_attention`); a plan (`sharded_self_plan`, or
  any `self_plan` of the whole batch) is split over the same batch axes, its arrays
  being batch-leading. No collective is needed. Axes that are not in the mesh, or do
  not divide the batch / both head counts, are left replicated.
  mesh: a `jax.sharding.Mesh` or `AbstractMesh`.
  """
  def fn(q, k, v, meta, plan=None):
    batch = _batch_spec(mesh, batch_axes, q.shape[0])
    h_axes = _usable(mesh, [head_axis] if head_axis else [], math.gcd(q.shape[2], k.shape[2]))
    head = h_axes[0] if h_axes else None
    x_spec = P(batch, None, head, None)
    if plan is None:
      inner = functools.partial(splash_attention, block_sizes=block_sizes, interpret=interpret)
      return jax.shard_map(inner, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, P(batch, None)),
                           out_specs=x_spec, check_vma=False)(q, k, v, meta)
    inner = functools.partial(plan_attention, interpret=interpret)
    # P(batch) is a prefix of the whole plan: every array split by rows, the rest replicated.
    return jax.shard_map(inner, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, P(batch)),
                         out_specs=x_spec, check_vma=False)(q, k, v, plan)
  return fn


def sharded_self_plan(mesh, batch_axes: Sequence[str] = ("data", "fsdp"), *,
                      block_sizes: BlockSizes | None = None):
  """`fn(meta) -> KernelPlan`: `self_plan` built per shard inside `jax.shard_map`.

  Each shard summarises and classifies only its own rows (as the kernel call did when
  it built its table itself), so the SPMD partitioner never sees the table's sorts and
  reductions; the plan comes back split over `batch_axes`, ready for
  `sharded_splash_attention(mesh, batch_axes)`.
  """
  def fn(meta):
    batch = _batch_spec(mesh, batch_axes, meta.segment_ids.shape[0])
    build = functools.partial(self_plan, block_sizes=block_sizes)
    return jax.shard_map(build, mesh=mesh, in_specs=(P(batch, None),), out_specs=P(batch),
                         check_vma=False)(meta)
  return fn


def _ambient_mesh():
  """The mesh being traced under (`jax.set_mesh`), or None when absent or one device."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def registered_plan(meta: masks.SeqMeta) -> KernelPlan:
  """The 'pallas' implementation of `attention.prepare`: the step's `self_plan`.

  Under a mesh with more than one device it is built per shard (`sharded_self_plan`).
  """
  mesh = _ambient_mesh()
  return self_plan(meta) if mesh is None else sharded_self_plan(mesh)(meta)


def registered_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta,
                         plan: KernelPlan | None = None) -> jax.Array:
  """The 'pallas' implementation of `attention.attend`.

  Under a mesh (`jax.set_mesh`) with more than one device it runs inside
  `shard_map` over the ('data', 'fsdp') batch axes and the 'tensor' head axis
  (those present), since a bare Pallas call would be replicated by the SPMD
  partitioner; otherwise it calls `splash_attention` directly. `plan`
  (`registered_plan(meta)`) skips building the block tables here.
  """
  mesh = _ambient_mesh()
  if mesh is None:
    return splash_attention(q, k, v, meta, plan=plan)
  return sharded_splash_attention(mesh)(q, k, v, meta, plan=plan)


register("pallas", registered_attention, prepare=registered_plan,
         prepare_cached=cached_plan)

__all__ = ["BlockSizes", "DEFAULT_BLOCK_SIZES", "KernelPlan", "attention_from_fields",
           "cached_plan", "default_block_sizes", "make_plan", "plan_attention", "registered_attention",
           "registered_plan", "self_plan", "sharded_self_plan", "sharded_splash_attention",
           "splash_attention"]
