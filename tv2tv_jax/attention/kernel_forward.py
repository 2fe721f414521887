"""Forward Pallas kernel of the interleaved splash attention, and what all kernels share.

Layouts inside the kernels (the public wrapper in `kernel.py` transposes):

  q: [B, H, Lq, dh], k / v: [B, Hkv, Lk, dh]  (head-major, so a block is (rows, dh))
  q_meta: i32[B, Lq, 8]  per query slot its SlotFields as columns (see `pack_meta`)
  k_meta: i32[B, 8, Lk]  per key slot its SlotFields as rows
  lse:    f32[B, H, Lq, 1]

Metadata is packed into 8 int32 words per slot. A q block reads it as a (bq, 8)
tile and slices columns, a kv block as an (8, bk) tile and slices rows, so
`masks.visible(q_cols, k_rows)` broadcasts to the (bq, bk) mask of the block: the
very expression of the dense oracle, evaluated one block at a time, never [L, L].
The q layout's last dim (8) equals the array's, which Mosaic accepts as a block;
HBM holds 32 bytes per slot per layout.

The grid is (B, H, nq, nk): step j of q-block i visits the j-th listed kv-block
of the block table (scalar prefetch; `block_table.py`). Steps past the count keep
the last listed block index, so no DMA is issued, and do no work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from tv2tv_jax import flops, masks
from tv2tv_jax.attention import block_table as bt

# Finite so that max/exp never see inf - inf; masked logits are also zeroed
# explicitly (p = where(visible, p, 0)), so their value never leaks into a sum.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Log-sum-exp stored for a row that sees nothing: exp(s - LSE_EMPTY) = 0 in the
# backward pass, so such rows get zero gradients (and their output is zero).
LSE_EMPTY = 0.7 * float(jnp.finfo(jnp.float32).max)
META_WORDS = 8  # segment, modality, chunk, order, plan, drop, slot, (unused)
NUM_LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes (slots) of the kernels.

  block_q / block_kv: forward and dq kernel tiles; block_q_dkv / block_kv_dkv: the
  dk/dv kernel's. On TPU every size must be a multiple of 128 (kv tiles are lanes
  of the (bq, bk) logits) -- or the whole padded length. Interpret mode takes any
  multiple of 8. Defaults per TPU generation: `default_block_sizes`.
  """
  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int = 128
  block_kv_dkv: int = 128

  def clamp(self, lq: int, lk: int) -> "BlockSizes":
    """Shrinks blocks longer than the (8-rounded) sequence, so toy shapes need one block."""
    rq, rk = _round_up(lq, 8), _round_up(lk, 8)
    return BlockSizes(min(self.block_q, rq), min(self.block_kv, rk),
                      min(self.block_q_dkv, rq), min(self.block_kv_dkv, rk))


# Chosen from the hardware, not measured on it (no TPU was available to this
# project; see docs/kernel.md): the MXU is 128x128 on v4/v5e/v5p and 256x256 on
# v6e; a TV2TV paper-scale chunk is n = 256 slots, so kv blocks of <= 256 stay
# chunk-aligned (exact sparsity, FULL same-chunk blocks), and bigger q blocks
# amortise kv DMAs. The (bq, bk) f32 logits + double-buffered q/k/v/do tiles stay
# under 4 MiB at head_dim 128, well inside every generation's scoped VMEM.
DEFAULT_BLOCK_SIZES = {
    "v4": BlockSizes(256, 256, 256, 256),
    "v5e": BlockSizes(256, 256, 256, 256),
    "v5p": BlockSizes(512, 256, 256, 256),
    "v6e": BlockSizes(512, 256, 512, 256),
    "cpu": BlockSizes(128, 128, 128, 128),
}


def _target_device():
  """The AbstractDevice (platform, device_kind) of the mesh being traced for, or None.

  Under `jax.set_mesh(<mesh of TPU devices>)` this is the TPU even on a CPU host that
  compiles ahead of time (`tv2tv_jax.aot`), where `jax.devices()` is the CPU."""
  return getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)


def default_block_sizes(device_kind: str | None = None) -> BlockSizes:
  """BlockSizes for a device kind ('TPU v5 lite', 'TPU v6e', ...; default: that of the
  mesh being traced for (`jax.set_mesh`), else device 0's)."""
  target = _target_device()
  kind = device_kind or (target.device_kind if target else jax.devices()[0].device_kind)
  kind = kind.lower()
  if "tpu" not in kind:
    return DEFAULT_BLOCK_SIZES["cpu"]
  if "v6" in kind:
    return DEFAULT_BLOCK_SIZES["v6e"]
  if "v5" in kind and ("lite" in kind or "v5e" in kind):
    return DEFAULT_BLOCK_SIZES["v5e"]
  if "v5" in kind:
    return DEFAULT_BLOCK_SIZES["v5p"]
  return DEFAULT_BLOCK_SIZES["v4"]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def default_interpret() -> bool:
  """Interpret mode on CPU (the only mode Pallas runs there); compiled elsewhere.

  "CPU" is the platform of the mesh being traced for when one is set, else the default
  backend: an ahead-of-time compile for a TPU mesh on a CPU host must lower the Mosaic
  kernel, not the interpreter (which XLA would compile as plain loops, with other memory
  and no cost estimate)."""
  target = _target_device()
  platform = target.platform if target else jax.default_backend()
  return platform == "cpu"


def pack_meta(f: masks.SlotFields) -> jax.Array:
  """i32[B, L, 8]: SlotFields of [B, L] packed per slot (word 7 unused, zero)."""
  words = [f.segment, f.modality, f.chunk, f.order, f.plan, f.drop, f.slot]
  words = [jnp.asarray(w).astype(jnp.int32) for w in words]
  words.append(jnp.zeros_like(words[0]))
  return jnp.stack(words, axis=-1)


def block_visible(q_meta: jax.Array, k_meta: jax.Array) -> jax.Array:
  """bool[bq, bk] = masks.visible for a q tile i32[bq, 8] and a kv tile i32[8, bk]."""
  col = lambda w: q_meta[:, w:w + 1]
  row = lambda w: k_meta[w:w + 1, :]
  fq = masks.SlotFields(col(0), col(1), col(2), col(3), col(4), col(5) != 0, col(6))
  fk = masks.SlotFields(row(0), row(1), row(2), row(3), row(4), row(5) != 0, row(6))
  return masks.visible(fq, fk)


def flat_lists(table: bt.BlockTable, transposed: bool = False):
  """The table's (index, class, count) lists flattened to 1-D int32 (SMEM-friendly)."""
  if transposed:
    return (table.q_index.reshape(-1), table.q_class.reshape(-1), table.q_count.reshape(-1))
  return (table.kv_index.reshape(-1), table.kv_class.reshape(-1), table.kv_count.reshape(-1))


def _fwd_kernel(kv_index, kv_class, kv_count, q_ref, k_ref, v_ref, qm_ref, km_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale: float, nq: int, nk: int):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
    l_sc[...] = jnp.zeros_like(l_sc)
    acc_sc[...] = jnp.zeros_like(acc_sc)

  row = b * nq + i
  cls = kv_class[row * nk + j]
  live = j < kv_count[row]

  def visit(masked: bool):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
    s = s * scale
    if masked:
      vis = block_visible(qm_ref[...], km_ref[...])
      s = jnp.where(vis, s, MASK_VALUE)
    m_prev = m_sc[...]  # (bq, 128): the running max, replicated over lanes
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m_next[:, :1])
    if masked:
      p = jnp.where(vis, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
    m_sc[...] = m_next
    v = v_ref[...]
    pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + pv

  pl.when(live & (cls == bt.FULL))(lambda: visit(False))
  pl.when(live & (cls == bt.PARTIAL))(lambda: visit(True))

  @pl.when(j == nk - 1)
  def _finish():
    l = l_sc[...][:, :1]
    seen = l > 0.0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc_sc[...] / safe_l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_sc[...][:, :1] + jnp.log(safe_l), LSE_EMPTY)


def forward_call(q, k, v, q_meta, k_meta_t, table: bt.BlockTable, *, interpret: bool,
                 scale: float | None = None):
  """Runs the forward kernel on kernel layouts.

  Args:
    q: [B, H, Lq, dh]; k, v: [B, Hkv, Lk, dh] (f32 or bf16; Hkv divides H).
    q_meta: i32[B, Lq, 8]; k_meta_t: i32[B, 8, Lk] (`pack_meta`, transposed for keys).
    table: block table with block_q | Lq and block_kv | Lk.
    scale: logit scale, default 1/sqrt(dh).
  Returns:
    out [B, H, Lq, dh] in q's dtype, lse f32[B, H, Lq, 1] (LSE_EMPTY where nothing is visible).
  """
  bsz, h, lq, dh = q.shape
  hkv, lk = k.shape[1], k.shape[2]
  bq, bk = table.block_q, table.block_kv
  nq, nk = lq // bq, lk // bk
  groups = h // hkv
  scale = dh ** -0.5 if scale is None else scale

  def kv_block(b, i, j, kv_index):
    return kv_index[(b * nq + i) * nk + j]

  q_spec = pl.BlockSpec((None, None, bq, dh), lambda b, hh, i, j, *_: (b, hh, i, 0))
  # lax.div, not //: floor division lowers through `sign`, which needs a TPU backend.
  kv_spec = pl.BlockSpec((None, None, bk, dh), lambda b, hh, i, j, kvi, *_: (
      b, lax.div(hh, groups), kv_block(b, i, j, kvi), 0))
  qm_spec = pl.BlockSpec((None, bq, META_WORDS), lambda b, hh, i, j, *_: (b, i, 0))
  km_spec = pl.BlockSpec((None, META_WORDS, bk),
                         lambda b, hh, i, j, kvi, *_: (b, 0, kv_block(b, i, j, kvi)))
  lse_spec = pl.BlockSpec((None, None, bq, 1), lambda b, hh, i, j, *_: (b, hh, i, 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(bsz, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, qm_spec, km_spec],
      out_specs=[q_spec, lse_spec],
      scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                      pltpu.VMEM((bq, dh), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk)
  # What XLA's cost analysis counts for this call (it cannot look inside). The dense upper
  # bound over the padded [Lq, Lk]: the visited block share (about a third for TV2TV rows)
  # is only known at run time from the block table. `flops.executed_step_flops` counts
  # the model's attention the same way.
  cost = pl.CostEstimate(
      flops=flops.attention_flops(bsz, h, lq, lk, dh, flops.FLASH_MATMULS["forward"]),
      transcendentals=int(bsz * h * lq * lk),  # exp(s - m)
      bytes_accessed=int(2 * q.size * q.dtype.itemsize  # q in, out
                         + (k.size + v.size) * k.dtype.itemsize * nq * groups))  # per q-block
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((bsz, h, lq, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret, name="tv2tv_splash_fwd",
  )(*flat_lists(table), q, k, v, q_meta, k_meta_t)
  return out, lse
