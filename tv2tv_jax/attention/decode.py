"""Decode-time attention: the queries of one chunk (or a few text slots) against a KV cache.

In the sampler (docs/design.md, section 6) each ODE step computes only the n tokens of
the chunk being generated; they attend to the KV cache of everything before (and,
bidirectionally, to their own keys, which the caller writes into the cache first).
The mask is `masks.cross_mask(q_meta, k_meta, q_slot, k_slot)`: the same rule,
with queries and keys from different slot sets. For the CFG pass the caller sets
`q_meta.cfg_drop` on the noisy queries; nothing else changes.

This runs the forward kernel of `kernel_forward` on a block table built from the
two slot sets' summaries, so a long cache is visited block-sparsely: cache blocks
of other packed examples, of noisy copies and of slots after the query (e.g. the
unused tail of a preallocated cache, whose segment is 0) are never loaded.
Forward only (the sampler needs no gradient); for a differentiable cross
attention use `kernel.attention_from_fields`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tv2tv_jax import masks
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.attention.kernel_forward import (BlockSizes, default_block_sizes,
                                                default_interpret, forward_call, pack_meta)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                     q_meta: masks.SeqMeta, k_meta: masks.SeqMeta, q_slot: jax.Array,
                     k_slot: jax.Array, *, block_sizes: BlockSizes | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Attention of Lq query slots to Lk cached key slots under `masks.cross_mask`.

  Args:
    q: [B, Lq, H, dh] queries (RoPE applied, not pre-scaled), e.g. Lq = n tokens of a chunk.
    k_cache, v_cache: [B, Lk, Hkv, dh] cached keys / values (Hkv divides H), q's dtype.
    q_meta: SeqMeta of [B, Lq]; k_meta: SeqMeta of [B, Lk] (unused cache slots: segment 0).
    q_slot: i32[B, Lq], k_slot: i32[B, Lk] storage indices, distinct between distinct
      slots (they only decide padding self-edges, as in `masks.cross_mask`).
    block_sizes: block_q / block_kv are used (default per device; clamped to Lq, Lk).
    interpret: Pallas interpret mode (default: True on CPU).
  Returns:
    [B, Lq, H, dh] in q's dtype; a query that sees no cached key gets zeros.
  """
  b, lq, h, dh = q.shape
  lk = k_cache.shape[1]
  bs = (block_sizes or default_block_sizes()).clamp(lq, lk)
  interpret = default_interpret() if interpret is None else interpret
  qf = q_meta.fields()._replace(slot=jnp.asarray(q_slot, jnp.int32))
  kf = k_meta.fields()._replace(slot=jnp.asarray(k_slot, jnp.int32))
  qf, kf = bt.pad_fields(qf, bs.block_q), bt.pad_fields(kf, bs.block_kv)
  lq_pad, lk_pad = qf.segment.shape[1], kf.segment.shape[1]
  table = bt.block_table(qf, kf, bs.block_q, bs.block_kv)

  def layout(x, length):
    return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))), 1, 2)

  out, _ = forward_call(layout(q, lq_pad), layout(k_cache, lk_pad), layout(v_cache, lk_pad),
                        pack_meta(qf), jnp.swapaxes(pack_meta(kf), 1, 2), table,
                        interpret=interpret)
  return jnp.swapaxes(out, 1, 2)[:, :lq]
