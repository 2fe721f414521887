"""Backward Pallas kernels of the interleaved splash attention: dq, and dk/dv fused.

With p = exp(s - lse) (s = scale * q k^T, lse saved by the forward pass),
delta = rowsum(dO * O):

  dv = p^T dO,   dp = dO v^T,   ds = p * (dp - delta),   dq = scale * ds k,   dk = scale * ds^T q

Two kernels, because on TPU a kernel can only accumulate into the output block it
owns (there are no atomics): the dq kernel walks, per q-block, the forward's kv
list; the dk/dv kernel walks, per kv-block, the transposed list (the q-blocks
that visit it) and reduces over the G query heads of its kv head inside the
kernel (grid axis 3), so GQA needs no [B, H, L, dh] dk/dv temporary and no XLA
reduction. dk and dv share s, p and ds, so they are fused. A fully fused kernel
(dq too) would need per-kv-block dq partials ([nk, L, dh] per head) written to HBM
and summed afterwards; for TV2TV's ~35% block density that costs more memory
traffic than recomputing s in a second kernel, so dq stays separate.

Layouts as in `kernel_forward`; lse and delta are f32[B, H, Lq, 1]. Masked
entries get p = 0 explicitly, and rows that see nothing have lse = LSE_EMPTY, so
every gradient of such a row is exactly zero.

Cost estimates (what XLA's cost analysis sees of these calls), like the forward's: dense
over the padded [Lq, Lk], with the matmuls each kernel does per visited block
(`flops.FLASH_MATMULS`: 3 for dq, 4 for dk/dv, each recomputing s), so the backward
counts 3.5x the forward kernel rather than the textbook 2x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tv2tv_jax import flops
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.attention.kernel_forward import (META_WORDS, NN, NT, TN, block_visible,
                                                flat_lists)


def _probs(q, k, lse, qm_ref, km_ref, scale, masked):
  """p f32[bq, bk] of one block from the saved log-sum-exp."""
  s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32) * scale
  p = jnp.exp(s - lse)
  if masked:
    p = jnp.where(block_visible(qm_ref[...], km_ref[...]), p, 0.0)
  return p


def _dq_kernel(kv_index, kv_class, kv_count, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               qm_ref, km_ref, dq_ref, dq_sc, *, scale: float, nq: int, nk: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros_like(dq_sc)

  row = b * nq + i
  cls = kv_class[row * nk + j]
  live = j < kv_count[row]

  def visit(masked: bool):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    p = _probs(q_ref[...], k, lse_ref[...], qm_ref, km_ref, scale, masked)
    dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dq_sc[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                  preferred_element_type=jnp.float32) * scale

  pl.when(live & (cls == bt.FULL))(lambda: visit(False))
  pl.when(live & (cls == bt.PARTIAL))(lambda: visit(True))

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def dq_call(q, k, v, do, lse, delta, q_meta, k_meta_t, table: bt.BlockTable, *,
            interpret: bool, scale: float):
  """dq [B, H, Lq, dh] in q's dtype (inputs as `kernel_forward.forward_call`, do like q)."""
  bsz, h, lq, dh = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bq, bk = table.block_q, table.block_kv
  nq, nk = lq // bq, lk // bk
  groups = h // hkv

  def kv_block(b, i, j, kv_index):
    return kv_index[(b * nq + i) * nk + j]

  q_spec = pl.BlockSpec((None, None, bq, dh), lambda b, hh, i, j, *_: (b, hh, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, dh), lambda b, hh, i, j, kvi, *_: (
      b, lax.div(hh, groups), kv_block(b, i, j, kvi), 0))
  row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, hh, i, j, *_: (b, hh, i, 0))
  qm_spec = pl.BlockSpec((None, bq, META_WORDS), lambda b, hh, i, j, *_: (b, i, 0))
  km_spec = pl.BlockSpec((None, META_WORDS, bk),
                         lambda b, hh, i, j, kvi, *_: (b, 0, kv_block(b, i, j, kvi)))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(bsz, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qm_spec, km_spec],
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((bq, dh), jnp.float32)])
  kernel = functools.partial(_dq_kernel, scale=scale, nq=nq, nk=nk)
  # Dense upper bound, as the forward's (module docstring). q, dO, lse, delta and dq once
  # per q-block; k and v once per (q-block, query head).
  cost = pl.CostEstimate(
      flops=flops.attention_flops(bsz, h, lq, lk, dh, flops.FLASH_MATMULS["dq"]),
      transcendentals=int(bsz * h * lq * lk),  # exp(s - lse)
      bytes_accessed=int(3 * q.size * q.dtype.itemsize + 2 * lse.size * 4
                         + (k.size + v.size) * k.dtype.itemsize * nq * groups))
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="tv2tv_splash_dq",
  )(*flat_lists(table), q, k, v, do, lse, delta, q_meta, k_meta_t)


def _dkv_kernel(q_index, q_class, q_count, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                qm_ref, km_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale: float, nq: int,
                nk: int, groups: int):
  b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (t == 0))
  def _init():
    dk_sc[...] = jnp.zeros_like(dk_sc)
    dv_sc[...] = jnp.zeros_like(dv_sc)

  col = b * nk + j
  cls = q_class[col * nq + t]
  live = t < q_count[col]

  def visit(masked: bool):
    q, v, do = q_ref[...], v_ref[...], do_ref[...]
    p = _probs(q, k_ref[...], lse_ref[...], qm_ref, km_ref, scale, masked)
    dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, TN,
                                  preferred_element_type=jnp.float32) * scale

  pl.when(live & (cls == bt.FULL))(lambda: visit(False))
  pl.when(live & (cls == bt.PARTIAL))(lambda: visit(True))

  @pl.when((g == groups - 1) & (t == nq - 1))
  def _finish():
    dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def dkv_call(q, k, v, do, lse, delta, q_meta, k_meta_t, table: bt.BlockTable, *,
             interpret: bool, scale: float):
  """(dk, dv), each [B, Hkv, Lk, dh] in k's / v's dtype; walks the table's transposed lists."""
  bsz, h, lq, dh = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bq, bk = table.block_q, table.block_kv
  nq, nk = lq // bq, lk // bk
  groups = h // hkv

  def q_block(b, j, t, q_index):
    return q_index[(b * nk + j) * nq + t]

  def q_rows(b, hk, j, g, t, qi, *_):  # query head hk*G + g, the t-th listed q-block
    return b, hk * groups + g, q_block(b, j, t, qi), 0

  q_spec = pl.BlockSpec((None, None, bq, dh), q_rows)
  row_spec = pl.BlockSpec((None, None, bq, 1), q_rows)
  kv_spec = pl.BlockSpec((None, None, bk, dh), lambda b, hk, j, g, t, *_: (b, hk, j, 0))
  qm_spec = pl.BlockSpec((None, bq, META_WORDS),
                         lambda b, hk, j, g, t, qi, *_: (b, q_block(b, j, t, qi), 0))
  km_spec = pl.BlockSpec((None, META_WORDS, bk), lambda b, hk, j, g, t, *_: (b, 0, j))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(bsz, hkv, nk, groups, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qm_spec, km_spec],
      out_specs=[kv_spec, kv_spec],
      scratch_shapes=[pltpu.VMEM((bk, dh), jnp.float32), pltpu.VMEM((bk, dh), jnp.float32)])
  kernel = functools.partial(_dkv_kernel, scale=scale, nq=nq, nk=nk, groups=groups)
  # Dense upper bound, as the forward's (module docstring). k, v, dk and dv once per
  # kv-block; q, dO, lse and delta once per kv-block they are visited from.
  cost = pl.CostEstimate(
      flops=flops.attention_flops(bsz, h, lq, lk, dh, flops.FLASH_MATMULS["dkv"]),
      transcendentals=int(bsz * h * lq * lk),  # exp(s - lse)
      bytes_accessed=int(2 * (k.size + v.size) * k.dtype.itemsize
                         + (2 * q.size * q.dtype.itemsize + 2 * lse.size * 4) * nk))
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="tv2tv_splash_dkv",
  )(*flat_lists(table, transposed=True), q, k, v, do, lse, delta, q_meta, k_meta_t)
