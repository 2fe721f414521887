"""The TV2TV attention mask: the rule (one function) and the dense oracle built from it.

Rule (docs/design.md, section 2). Query q may attend key k iff they are in the same
packed example (segment id, non-zero) and either

  (a) k comes at or before q in logical order and k is not a noisy-copy token, or
  (b) q and k belong to the same chunk copy (bidirectional inside a chunk),

and k is not hidden by classifier-free-guidance text drop: when q is a noisy
token whose chunk has its plan dropped (`cfg_drop`), text tokens of that plan
(`plan_ids` equal, non-zero) are invisible to it. The layout (`sequence`) gives
that plan id to the chunk's text *and* to the BOF that closes it, because BOF has
attended to the text: a dropped noisy copy may see neither its plan (the text
written since the previous chunk) nor that BOF, so in the TV2TV layout its
velocity does not depend on the dropped text at all. (Think2V still leaks: every
token after the plan block has read the whole plan; docs/model.md, "Classifier-free
guidance: what the dropped branch sees".)

Padding slots (segment 0) attend to themselves only, so no row is empty and no
NaN can come out of a softmax; nothing real attends to padding.

`visible` is elementwise and broadcasts, so the dense oracle ([L, 1] against
[1, L]) and the Pallas kernel (a q block against a kv block) evaluate the very
same expression.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import sequence
from tv2tv_jax.config import Experiment


class SlotFields(NamedTuple):
  """Per-slot metadata that the rule reads; any broadcastable shapes."""
  segment: jax.Array  # i32
  modality: jax.Array  # i32
  chunk: jax.Array  # i32, chunk-copy id, 0 = not video
  order: jax.Array  # i32, logical order within the example
  plan: jax.Array  # i32
  drop: jax.Array  # bool, CFG text drop (meaningful on noisy queries)
  slot: jax.Array  # i32, storage index in the row (for the padding self-edge)


def visible(q: SlotFields, k: SlotFields) -> jax.Array:
  """bool[broadcast(q, k)]: may query slot q attend key slot k."""
  same_example = (q.segment == k.segment) & (q.segment != 0)
  causal = (k.order <= q.order) & (k.modality != sequence.NOISY)
  same_chunk = (q.chunk == k.chunk) & (q.chunk != 0)
  plan_hidden = (q.drop & (q.modality == sequence.NOISY) & (k.modality == sequence.TEXT)
                 & (q.plan != 0) & (k.plan == q.plan))
  pad_self = (q.segment == 0) & (q.slot == k.slot)
  return (same_example & (causal | same_chunk) & ~plan_hidden) | pad_self


@flax.struct.dataclass
class SeqMeta:
  """Per-slot metadata of a batch, all [B, L] (see `tv2tv_jax.sequence`)."""
  segment_ids: jax.Array  # i32[B, L]
  modality: jax.Array  # i32[B, L]
  chunk_ids: jax.Array  # i32[B, L]
  positions: jax.Array  # i32[B, L]
  order: jax.Array  # i32[B, L]
  plan_ids: jax.Array  # i32[B, L]
  cfg_drop: jax.Array  # bool[B, L]

  @classmethod
  def from_batch(cls, batch, cfg_drop=None) -> "SeqMeta":
    """Reads the slot arrays of a packed batch; `cfg_drop` bool[B, L] defaults to none."""
    seg = jnp.asarray(batch["segment_ids"])
    drop = jnp.zeros(seg.shape, bool) if cfg_drop is None else jnp.asarray(cfg_drop, bool)
    return cls(segment_ids=seg, modality=jnp.asarray(batch["modality"]),
               chunk_ids=jnp.asarray(batch["chunk_ids"]),
               positions=jnp.asarray(batch["positions"]), order=jnp.asarray(batch["order"]),
               plan_ids=jnp.asarray(batch["plan_ids"]), cfg_drop=drop)

  def fields(self) -> SlotFields:
    """SlotFields of every slot, [B, L] each."""
    slot = jnp.broadcast_to(jnp.arange(self.segment_ids.shape[-1], dtype=jnp.int32),
                            self.segment_ids.shape)
    return SlotFields(self.segment_ids, self.modality, self.chunk_ids, self.order,
                      self.plan_ids, self.cfg_drop, slot)

  def slice(self, start: int, stop: int) -> "SeqMeta":
    """The metadata of slots [start, stop) (a region of the row)."""
    return jax.tree.map(lambda a: a[..., start:stop], self)


def dense_mask(meta: SeqMeta) -> jax.Array:
  """bool[B, L, L]: mask[b, q, k] = `visible` for every pair. The oracle for all paths."""
  f = meta.fields()
  q = SlotFields(*(a[:, :, None] for a in f))
  k = SlotFields(*(a[:, None, :] for a in f))
  return visible(q, k)


def against_cache(cached: SeqMeta, new: SeqMeta) -> tuple[SeqMeta, jax.Array, jax.Array]:
  """The keys of queries `new` ([B, Lq]) run against a KV cache holding `cached` ([B, C]).

  The keys are [cached | new]: the cache's slots, then the queries' own (a chunk sees
  itself bidirectionally; text sees itself causally). Slot ids: cache slot s is s,
  new slot i is C + i, so they never collide (they only decide padding self-edges).
  Returns (k_meta SeqMeta [B, C + Lq], q_slot i32[B, Lq], k_slot i32[B, C + Lq]).
  """
  b, lq = new.segment_ids.shape
  c = cached.segment_ids.shape[1]
  k_meta = jax.tree.map(lambda a, n: jnp.concatenate([a, n.astype(a.dtype)], axis=1),
                        cached, new)
  k_slot = jnp.broadcast_to(jnp.arange(c + lq, dtype=jnp.int32), (b, c + lq))
  return k_meta, k_slot[:, c:], k_slot


def cross_mask(q_meta: SeqMeta, k_meta: SeqMeta, q_slot: jax.Array,
               k_slot: jax.Array) -> jax.Array:
  """bool[B, Lq, Lk] for queries and keys from different slot sets (e.g. a KV cache).

  q_slot: i32[B, Lq], k_slot: i32[B, Lk] storage indices (only used for padding
  self-edges, so they must be distinct between distinct slots).
  """
  fq, fk = q_meta.fields()._replace(slot=q_slot), k_meta.fields()._replace(slot=k_slot)
  return visible(SlotFields(*(a[:, :, None] for a in fq)),
                 SlotFields(*(a[:, None, :] for a in fk)))


@dataclasses.dataclass(frozen=True)
class Regions:
  """The static storage layout of a packed row (`tv2tv_jax.sequence`), in slots:

      [ text T | noisy Kn·n (Kn copies of n) | clean: the rest (K·n) ]

  Python ints, hashable (a static field of a plan, never traced). The layout, not the
  metadata, tells which key blocks no query can see (`skipped_pairs`); the metadata
  then decides every pair that is computed.
  """
  text: int  # T text slots
  noisy: int  # Kn·n noisy slots
  block: int  # n tokens per chunk copy

  @classmethod
  def of_experiment(cls, exp: Experiment) -> "Regions":
    """The regions of `exp`'s rows (`exp.row_len` slots): `seq.num_noisy` noisy copies,
    which is `max_chunks` when `seq.noisy_chunks` is 0."""
    n = exp.model.tokens_per_chunk
    return cls(text=exp.seq.text_len, noisy=exp.seq.num_noisy * n, block=n)

  @property
  def noisy_copies(self) -> int:
    """Kn, the noisy chunk copies of a row."""
    return self.noisy // self.block

  def check(self, length: int) -> None:
    """Raises ValueError unless these regions describe a row of `length` slots."""
    if (min(self.text, self.noisy) < 0 or self.block < 1 or self.noisy % self.block
        or self.text + self.noisy > length):
      raise ValueError(f"regions {self} do not describe a row of {length} slots "
                       f"([text | noisy copies of block | clean])")

  def split(self, x: jax.Array, axis: int = 1) -> tuple[jax.Array, jax.Array]:
    """(x at [text | clean] slots, x at noisy slots), both along `axis` (the row's L)."""
    t, e = self.text, self.text + self.noisy
    take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
    return (jnp.concatenate([take(0, t), take(e, x.shape[axis])], axis=axis), take(t, e))

  def merge(self, kept: jax.Array, noisy: jax.Array, axis: int = 1) -> jax.Array:
    """Inverse of `split`: back to storage order [text | noisy | clean] along `axis`."""
    text = jax.lax.slice_in_dim(kept, 0, self.text, axis=axis)
    clean = jax.lax.slice_in_dim(kept, self.text, kept.shape[axis], axis=axis)
    return jnp.concatenate([text, noisy, clean], axis=axis)

  def skipped_pairs(self, length: int) -> np.ndarray:
    """bool[L, L]: the (query, key) pairs region attention never computes: every noisy
    key, except for the queries of its own n-token copy."""
    self.check(length)
    slot = np.arange(length)
    noisy = (slot >= self.text) & (slot < self.text + self.noisy)
    copy = np.where(noisy, (slot - self.text) // self.block, -1)
    return noisy[None, :] & (copy[:, None] != copy[None, :])

  def skipped_count(self, length: int) -> int:
    """Pairs of `skipped_pairs` in a row of `length` slots: Kn·n·(L − n)."""
    self.check(length)
    return self.noisy * (length - self.block)

  def skipped_fraction(self, length: int) -> float:
    """Share of the L² pairs skipped: Kn·n·(L − n) / L²."""
    return self.skipped_count(length) / length ** 2


def region_fields(meta: SeqMeta, regions: Regions) -> tuple[SlotFields, SlotFields]:
  """SlotFields of the [text | clean] slots ([B, T + K·n] each) and of the noisy slots
  ([B, Kn·n] each), with their storage indices (`slot`) kept for padding self-edges."""
  regions.check(meta.segment_ids.shape[-1])
  parts = [regions.split(a) for a in meta.fields()]
  return SlotFields(*(p[0] for p in parts)), SlotFields(*(p[1] for p in parts))


def skipped_pairs_visible(meta: SeqMeta, regions: Regions) -> jax.Array:
  """bool[]: whether `visible` allows any pair of `Regions.skipped_pairs` in any row.

  False on every row the layout builds (why: `reference.region_attention`), which is
  what makes skipping those pairs exact; evaluated with the rule itself, pair by pair
  ([B, T + K·n, Kn·n] and [B, Kn·n, Kn·n]), not with a copy of it.
  """
  kept, noisy = region_fields(meta, regions)
  other_to_noisy = visible(SlotFields(*(a[:, :, None] for a in kept)),
                           SlotFields(*(a[:, None, :] for a in noisy)))
  copy = jnp.arange(regions.noisy) // regions.block
  other_copy = copy[:, None] != copy[None, :]
  noisy_to_noisy = visible(SlotFields(*(a[:, :, None] for a in noisy)),
                           SlotFields(*(a[:, None, :] for a in noisy))) & other_copy
  return other_to_noisy.any() | noisy_to_noisy.any()
