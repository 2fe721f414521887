"""What the splash-attention kernel derives from metadata alone: built once, shared by layers.

Every layer of the model attends under the same mask, so the padded, packed metadata
and the block tables (`block_table.py`) depend on the step's `SeqMeta` only, not on
the layer's q, k, v. `make_plan` builds them; the model builds one plan per forward
(`attention.prepare`) and broadcasts it through `nn.scan` to every layer, as stock
splash attention builds its mask object once and hands it to each call.

Every array of a plan is batch-leading ([B, ...], one row's values from that row's
metadata only), so a plan shards over the batch exactly like `SeqMeta`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from tv2tv_jax import masks
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.attention.kernel_forward import BlockSizes, default_block_sizes, pack_meta


@flax.struct.dataclass
class KernelPlan:
  """Padded metadata and block tables of one (query slots, key slots) pair.

  q_meta:   i32[B, Lq_pad, 8] query SlotFields packed per slot (`pack_meta`).
  k_meta_t: i32[B, 8, Lk_pad] key SlotFields, packed and transposed (a row per word).
  fwd:      BlockTable of the forward and dq kernels (block_q x block_kv).
  dkv:      BlockTable of the dk/dv kernel (block_q_dkv x block_kv_dkv), or None when
            those blocks equal the forward ones (the same table; stored once).
  lq, lk:   the unpadded query / key lengths (static), which q and k must have.
  """
  q_meta: jax.Array
  k_meta_t: jax.Array
  fwd: bt.BlockTable
  dkv: bt.BlockTable | None
  lq: int = flax.struct.field(pytree_node=False, default=0)
  lk: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def tables(self) -> tuple[bt.BlockTable, bt.BlockTable]:
    """(forward/dq table, dk/dv table)."""
    return self.fwd, self.fwd if self.dkv is None else self.dkv


def make_plan(q_fields: masks.SlotFields, k_fields: masks.SlotFields,
              block_sizes: BlockSizes | None = None, backward: bool = True) -> KernelPlan:
  """The plan for queries `q_fields` ([B, Lq] each) against keys `k_fields` ([B, Lk] each).

  block_sizes: kernel tiles (default: `default_block_sizes()` for the device being
    traced for), clamped to the sequence. Lengths are padded to a common multiple of
    the forward and dk/dv blocks with padding slots (`block_table.pad_fields`).
  backward: whether the plan will be differentiated; False (decoding) builds no dk/dv
    table and pads to the forward blocks only.
  Jit-able; the table count (1, or 2 when the dk/dv blocks differ) does not depend
  on how many layers use the plan.
  """
  lq, lk = q_fields.segment.shape[1], k_fields.segment.shape[1]
  bs = (block_sizes or default_block_sizes()).clamp(lq, lk)
  if not backward:
    bs = dataclasses.replace(bs, block_q_dkv=bs.block_q, block_kv_dkv=bs.block_kv)
  mq, mk = math.lcm(bs.block_q, bs.block_q_dkv), math.lcm(bs.block_kv, bs.block_kv_dkv)
  qf, kf = bt.pad_fields(q_fields, mq), bt.pad_fields(k_fields, mk)
  t_fwd = bt.block_table(qf, kf, bs.block_q, bs.block_kv)
  t_dkv = None
  if (bs.block_q_dkv, bs.block_kv_dkv) != (bs.block_q, bs.block_kv):
    t_dkv = bt.block_table(qf, kf, bs.block_q_dkv, bs.block_kv_dkv)
  return KernelPlan(q_meta=pack_meta(qf), k_meta_t=jnp.swapaxes(pack_meta(kf), 1, 2),
                    fwd=t_fwd, dkv=t_dkv, lq=lq, lk=lk)


def self_plan(meta: masks.SeqMeta, block_sizes: BlockSizes | None = None) -> KernelPlan:
  """The plan of self-attention over packed rows: every slot of `meta` ([B, L]) both ways."""
  f = meta.fields()
  return make_plan(f, f, block_sizes)


def cached_plan(meta: masks.SeqMeta, cached: masks.SeqMeta,
                block_sizes: BlockSizes | None = None) -> KernelPlan:
  """The forward-only plan of queries `meta` ([B, Lq]) against a KV cache's slots
  `cached` ([B, C]) followed by their own: keys [cached | meta] (`masks.against_cache`)."""
  k_meta, q_slot, k_slot = masks.against_cache(cached, meta)
  return make_plan(meta.fields()._replace(slot=q_slot), k_meta.fields()._replace(slot=k_slot),
                   block_sizes, backward=False)
