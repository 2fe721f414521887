"""Block table for the interleaved splash-attention kernel, computed from per-slot metadata.

For a (row, q-block, kv-block) the class is

  EMPTY   -- no (q, k) pair in the two blocks is visible: the kernel never visits it;
  PARTIAL -- some pairs may be visible: visited, mask computed in-kernel by `masks.visible`;
  FULL    -- every pair is visible: visited, no mask.

The classification is *sound*, not necessarily tight: EMPTY and FULL are only
claimed when they are certain, anything else is PARTIAL. It never materialises
[L, L]: each block is reduced to a handful of summaries (O(L) work), and a pair of
blocks is classified from its two summaries (O(B * nq * nk) work), by reasoning on
the structure of the rule in `tv2tv_jax.masks`:

  visible(q, k) = (same_example & (causal | same_chunk) & ~plan_hidden) | pad_self

* not EMPTY needs one of
    - pad_self possible: q block holds a padding slot whose slot index lies in the
      kv block's slot range;
    - same_example possible (non-zero segment ranges overlap) and
        causal possible: the lexicographic minimum of (segment, order) over real,
          non-noisy keys is <= the lexicographic maximum over real queries (any
          visible causal pair (s, ok) <= (s, oq) sits between the two), or
        same_chunk possible: the non-zero chunk-id ranges overlap.
  and not all pairs CFG-hidden (every query a dropped noisy slot of plan p, every
  key a text slot of plan p); finer plan_hidden structure is ignored (it only
  removes pairs, so ignoring it keeps the answer sound).
* FULL needs all of
    - every q and k slot real (no padding) and all in one segment s;
    - no CFG-hidden pair: the plan range of dropped noisy queries and the plan range
      of planned text keys are disjoint (or one is empty);
    - every pair causal or same-chunk: either (A) no noisy key and the latest key
      order <= the earliest query order, or (B) q and kv block each hold one and
      the same chunk copy.

Where summaries lose precision (blocks straddling two packed examples, a query
block holding two chunk copies, a block mixing a chunk with causal context) the
answer is PARTIAL: correct, at a cost of sparsity (EMPTY -> PARTIAL) or of an
in-kernel mask (FULL -> PARTIAL). `benchmarks/kernel_sparsity.py` measures the
gap to the ideal (the dense mask's own block occupancy) on TV2TV layouts.

Lists. Per (row, q-block) the non-EMPTY kv-blocks in increasing order, padded to
nk entries by repeating the last listed block (so the pipeline issues no new DMA
for the padding steps, which the kernel skips by the count); the transposed lists
(per kv-block, the q-blocks that visit it) drive the dk/dv kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import masks, sequence

EMPTY, PARTIAL, FULL = 0, 1, 2

_BIG = np.iinfo(np.int32).max
_SMALL = np.iinfo(np.int32).min


class BlockSummary(NamedTuple):
  """Per-block reductions of SlotFields, each i32[B, nb] (bool where noted)."""
  any_pad: jax.Array  # bool: some slot has segment 0
  seg_lo: jax.Array  # min / max non-zero segment (BIG / SMALL if none)
  seg_hi: jax.Array
  lex_seg_hi: jax.Array  # lexicographic max of (segment, order) over real slots
  lex_ord_hi: jax.Array
  lex_seg_lo: jax.Array  # lexicographic min of (segment, order) over real non-noisy slots
  lex_ord_lo: jax.Array
  order_lo: jax.Array  # min order over real slots
  order_hi: jax.Array  # max order over real slots
  any_noisy: jax.Array  # bool
  chunk_lo: jax.Array  # min / max non-zero chunk id (BIG / SMALL if none)
  chunk_hi: jax.Array
  one_chunk: jax.Array  # bool: every slot has the same non-zero chunk id
  drop_plan_lo: jax.Array  # plan range of dropped noisy slots with a plan
  drop_plan_hi: jax.Array
  all_dropped: jax.Array  # bool: every slot is such a dropped noisy slot
  text_plan_lo: jax.Array  # plan range of text slots with a plan
  text_plan_hi: jax.Array
  all_planned_text: jax.Array  # bool: every slot is such a text slot
  pad_slot_lo: jax.Array  # slot range of padding slots
  pad_slot_hi: jax.Array
  slot_lo: jax.Array  # slot range of all slots
  slot_hi: jax.Array


def _min(x, where):
  return jnp.min(jnp.where(where, x, _BIG), axis=-1)


def _max(x, where):
  return jnp.max(jnp.where(where, x, _SMALL), axis=-1)


def summarize(f: masks.SlotFields, block: int) -> BlockSummary:
  """Reduces SlotFields of [B, L] (L a multiple of `block`) to per-block summaries [B, L/block]."""
  b, length = f.segment.shape
  if length % block:
    raise ValueError(f"length {length} is not a multiple of the block size {block}")
  r = lambda a: jnp.asarray(a).reshape(b, length // block, block)
  seg, mod, chunk, order, plan, slot = map(r, (f.segment, f.modality, f.chunk, f.order,
                                                f.plan, f.slot))
  drop = r(f.drop).astype(bool)
  real = seg != 0
  noisy = mod == sequence.NOISY
  # Lexicographic extrema: first the extreme segment, then the extreme order within it.
  lex_seg_hi = _max(seg, real)
  lex_ord_hi = _max(order, real & (seg == lex_seg_hi[..., None]))
  nn = real & ~noisy
  lex_seg_lo = _min(seg, nn)
  lex_ord_lo = _min(order, nn & (seg == lex_seg_lo[..., None]))
  has_chunk = chunk != 0
  dropped = real & noisy & drop & (plan != 0)
  planned_text = real & (mod == sequence.TEXT) & (plan != 0)
  every = jnp.ones_like(real)
  return BlockSummary(
      any_pad=jnp.any(~real, axis=-1),
      seg_lo=_min(seg, real), seg_hi=_max(seg, real),
      lex_seg_hi=lex_seg_hi, lex_ord_hi=lex_ord_hi,
      lex_seg_lo=lex_seg_lo, lex_ord_lo=lex_ord_lo,
      order_lo=_min(order, real), order_hi=_max(order, real),
      any_noisy=jnp.any(real & noisy, axis=-1),
      chunk_lo=_min(chunk, has_chunk), chunk_hi=_max(chunk, has_chunk),
      one_chunk=jnp.all(has_chunk, axis=-1) & (_min(chunk, every) == _max(chunk, every)),
      drop_plan_lo=_min(plan, dropped), drop_plan_hi=_max(plan, dropped),
      all_dropped=jnp.all(dropped, axis=-1),
      text_plan_lo=_min(plan, planned_text), text_plan_hi=_max(plan, planned_text),
      all_planned_text=jnp.all(planned_text, axis=-1),
      pad_slot_lo=_min(slot, ~real), pad_slot_hi=_max(slot, ~real),
      slot_lo=_min(slot, every), slot_hi=_max(slot, every))


def _overlap(a_lo, a_hi, b_lo, b_hi):
  """Ranges [a_lo, a_hi] and [b_lo, b_hi] intersect (an empty range is lo > hi)."""
  return (jnp.maximum(a_lo, b_lo) <= jnp.minimum(a_hi, b_hi)) & (a_lo <= a_hi) & (b_lo <= b_hi)


def classify(qs: BlockSummary, ks: BlockSummary) -> jax.Array:
  """i32[B, nq, nk]: EMPTY / PARTIAL / FULL for every (q-block, kv-block) pair."""
  q = jax.tree.map(lambda a: a[:, :, None], qs)
  k = jax.tree.map(lambda a: a[:, None, :], ks)
  pad_possible = _overlap(q.pad_slot_lo, q.pad_slot_hi, k.slot_lo, k.slot_hi)
  seg_possible = _overlap(q.seg_lo, q.seg_hi, k.seg_lo, k.seg_hi)
  causal_possible = ((k.lex_seg_lo < q.lex_seg_hi)
                     | ((k.lex_seg_lo == q.lex_seg_hi) & (k.lex_ord_lo <= q.lex_ord_hi)))
  causal_possible &= k.lex_seg_lo != _BIG  # some real non-noisy key at all
  chunk_possible = _overlap(q.chunk_lo, q.chunk_hi, k.chunk_lo, k.chunk_hi)
  # Every pair CFG-hidden: dropped noisy queries of one plan against that plan's text.
  all_hidden = (q.all_dropped & k.all_planned_text & (q.drop_plan_lo == q.drop_plan_hi)
                & (k.text_plan_lo == k.text_plan_hi) & (q.drop_plan_lo == k.text_plan_lo))
  nonempty = pad_possible | (seg_possible & (causal_possible | chunk_possible) & ~all_hidden)

  one_segment = (~q.any_pad & ~k.any_pad & (q.seg_lo == q.seg_hi) & (k.seg_lo == k.seg_hi)
                 & (q.seg_lo == k.seg_lo))
  no_hidden = ~_overlap(q.drop_plan_lo, q.drop_plan_hi, k.text_plan_lo, k.text_plan_hi)
  all_causal = ~k.any_noisy & (k.order_hi <= q.order_lo)
  same_chunk = q.one_chunk & k.one_chunk & (q.chunk_lo == k.chunk_lo)
  full = one_segment & no_hidden & (all_causal | same_chunk)
  return jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int32)


def _compact(cls: jax.Array):
  """Per leading index, the non-EMPTY positions of the last axis (ascending, padded).

  cls: i32[B, n, m]. Returns (idx i32[B, n, m], cls_at i32[B, n, m], count i32[B, n]);
  entries past `count` repeat the last listed index (0 when none), class EMPTY.
  """
  m = cls.shape[-1]
  pos = jnp.arange(m, dtype=jnp.int32)
  key = jnp.where(cls != EMPTY, pos, m + pos)
  idx = jnp.argsort(key, axis=-1).astype(jnp.int32)
  count = jnp.sum(cls != EMPTY, axis=-1).astype(jnp.int32)
  last = jnp.take_along_axis(idx, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  last = jnp.where(count[..., None] > 0, last, 0)
  listed = pos < count[..., None]
  idx = jnp.where(listed, idx, last)
  cls_at = jnp.where(listed, jnp.take_along_axis(cls, idx, axis=-1), EMPTY)
  return idx, cls_at.astype(jnp.int32), count


@flax.struct.dataclass
class BlockTable:
  """The block table of one (q, kv) pair of slot sets; all int32.

  classes:  [B, nq, nk] EMPTY / PARTIAL / FULL.
  kv_index: [B, nq, nk] per q-block, the kv-blocks to visit (first kv_count listed).
  kv_class: [B, nq, nk] the class of each listed kv-block (EMPTY past the count).
  kv_count: [B, nq].
  q_index, q_class: [B, nk, nq], q_count: [B, nk] -- the transposed lists (dk/dv).
  """
  classes: jax.Array
  kv_index: jax.Array
  kv_class: jax.Array
  kv_count: jax.Array
  q_index: jax.Array
  q_class: jax.Array
  q_count: jax.Array
  block_q: int = flax.struct.field(pytree_node=False, default=0)
  block_kv: int = flax.struct.field(pytree_node=False, default=0)


def block_table(q_fields: masks.SlotFields, k_fields: masks.SlotFields, block_q: int,
                block_kv: int) -> BlockTable:
  """The block table for queries `q_fields` ([B, Lq] each) against keys `k_fields` ([B, Lk]).

  Lq must be a multiple of block_q and Lk of block_kv (see `pad_fields`). Jit-able.
  """
  classes = classify(summarize(q_fields, block_q), summarize(k_fields, block_kv))
  kv_index, kv_class, kv_count = _compact(classes)
  q_index, q_class, q_count = _compact(jnp.swapaxes(classes, 1, 2))
  return BlockTable(classes, kv_index, kv_class, kv_count, q_index, q_class, q_count,
                    block_q=block_q, block_kv=block_kv)


def pad_fields(f: masks.SlotFields, multiple: int) -> masks.SlotFields:
  """Pads [B, L] SlotFields to a multiple of `multiple` with padding slots.

  Added slots have segment 0 (they attend only to themselves and nothing real sees
  them) and slot indices continuing past the largest existing one, so they never
  collide with a real slot.
  """
  b, length = f.segment.shape
  extra = (-length) % multiple
  if not extra:
    return f
  new_slots = jnp.max(f.slot, axis=-1, keepdims=True) + 1 + jnp.arange(extra, dtype=jnp.int32)
  def pad(a, name):
    if name == "slot":
      return jnp.concatenate([a, new_slots.astype(a.dtype)], axis=-1)
    return jnp.concatenate([a, jnp.zeros((b, extra), a.dtype)], axis=-1)
  return masks.SlotFields(*(pad(a, name) for a, name in zip(f, f._fields)))


def classes_from_mask(mask, block_q: int, block_kv: int) -> np.ndarray:
  """The ideal (exact) classes of a dense bool[B, Lq, Lk] mask (numpy; tests and benchmarks).

  A block is EMPTY iff no entry is True, FULL iff every entry is True.
  """
  mask = np.asarray(mask)
  b, lq, lk = mask.shape
  m = mask.reshape(b, lq // block_q, block_q, lk // block_kv, block_kv)
  any_ = m.any(axis=(2, 4))
  all_ = m.all(axis=(2, 4))
  return np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY)).astype(np.int32)
