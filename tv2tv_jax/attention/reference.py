"""XLA attention: the dense mask from metadata, grouped-query, f32 softmax.

`reference_attention` is the dense path and the numerical reference for the Pallas
kernel and for `region_attention`: it materialises the [B, L, L] mask and the
[B, H, L, L] logits. `region_attention` (the model's training forward on CPU and GPU)
computes the same thing without the key blocks the storage layout guarantees are
invisible (`masks.Regions`): about 40% of all pairs at the profiled shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tv2tv_jax import masks

# Finite, so that a fully masked row (which the mask rule never produces, but a
# hand-built one might) gives a uniform softmax instead of NaN; such rows are
# then zeroed explicitly.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention under an explicit boolean mask.

  Args:
    q: [B, Lq, H, dh] queries (not pre-scaled; scaled here by 1/sqrt(dh)).
    k: [B, Lk, Hkv, dh] keys, v: [B, Lk, Hkv, dh] values; Hkv divides H.
    mask: bool[B, Lq, Lk], True where attending is allowed.
  Returns:
    [B, Lq, H, dh] in q's dtype; rows with no visible key are exactly zero.
  """
  b, lq, h, dh = q.shape
  group = h // k.shape[2]
  # K/V repeated to every query head: a plain 4-D layout that XLA's CPU backend runs
  # ~1.4x faster than a grouped 5-D einsum (benchmarked side by side); the copies are
  # [B, L, H, dh], small next to the [B, H, L, L] logits.
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None], logits * (dh ** -0.5), _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  # Zero rows with no visible key on the output ([B, L, H, dh]), not on the probabilities.
  out = out * mask.any(axis=-1)[:, :, None, None]
  return out.astype(q.dtype)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        meta: masks.SeqMeta) -> jax.Array:
  """Self-attention over a packed row under the TV2TV mask built from `meta`.

  q: [B, L, H, dh], k/v: [B, L, Hkv, dh], meta: SeqMeta of [B, L]. Returns [B, L, H, dh].
  """
  return masked_attention(q, k, v, masks.dense_mask(meta))


def region_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta,
                     regions: masks.Regions) -> jax.Array:
  """`reference_attention` of a row in the storage layout, without its invisible blocks.

  Args:
    q: [B, L, H, dh] (not pre-scaled), k/v: [B, L, Hkv, dh], Hkv divides H.
    meta: SeqMeta of [B, L]; regions: the row's storage layout, L = T + Kn·n + K·n.
  Returns:
    [B, L, H, dh] in q's dtype, equal to `reference_attention` up to summation order.

  Two pair sets are never computed, because the layout makes `masks.visible` false on
  them (`masks.skipped_pairs_visible` checks it on a batch):
    * a [text | clean] query against any noisy key: the causal clause excludes noisy
      keys, and the own-chunk clause needs a shared chunk-copy id, but text and
      padding slots have chunk 0 and `sequence.pack_row` numbers noisy copies 1..Kn
      and clean copies Kn+1..Kn+K; padding queries see only their own slot;
    * a noisy query against the noisy keys of another copy: not causal either, and
      each n-slot block of the noisy region holds one copy (or padding).
  So a [text | clean] query attends to the T + K·n [text | clean] keys; a noisy query
  to those keys plus its own block's n keys, both in one softmax. Every computed pair
  is decided by `masks.visible` on the slots' own fields; the rest of the arithmetic
  (f32 logits and softmax, scale, mask value, zeroed rows) is `masked_attention`'s.
  """
  b, length, h, dh = q.shape
  regions.check(length)
  if regions.noisy == 0:
    return reference_attention(q, k, v, meta)
  group = h // k.shape[2]
  # Repeated once here for both parts (why repeat at all: `masked_attention`).
  k = jnp.repeat(k, group, axis=2)
  v = jnp.repeat(v, group, axis=2)
  (q_kept, q_noisy), (k_kept, k_noisy), (v_kept, v_noisy) = (
      regions.split(x) for x in (q, k, v))
  f_kept, f_noisy = masks.region_fields(meta, regions)
  q_side = lambda f: masks.SlotFields(*(a[:, :, None] for a in f))
  k_side = lambda f: masks.SlotFields(*(a[:, None, :] for a in f))
  out_kept = masked_attention(q_kept, k_kept, v_kept, masks.visible(q_side(f_kept),
                                                                    k_side(f_kept)))

  kn, n, la = regions.noisy_copies, regions.block, k_kept.shape[1]
  blocks = lambda x: x.reshape(b, kn, n, *x.shape[2:])  # [B, Kn·n, ...] -> [B, Kn, n, ...]
  # Against [text | clean]: the plain 4-D layout of `masked_attention`, then split
  # into copies (a free reshape).
  to_kept = jnp.einsum("bqhd,bkhd->bhqk", q_noisy, k_kept,
                       preferred_element_type=jnp.float32).reshape(b, h, kn, n, la)
  to_own = jnp.einsum("bcqhd,bckhd->bhcqk", blocks(q_noisy), blocks(k_noisy),
                      preferred_element_type=jnp.float32)
  f_blocks = masks.SlotFields(*(blocks(a) for a in f_noisy))
  mask = jnp.concatenate([
      masks.visible(q_side(f_noisy), k_side(f_kept)).reshape(b, kn, n, la),
      masks.visible(masks.SlotFields(*(a[..., :, None] for a in f_blocks)),
                    masks.SlotFields(*(a[..., None, :] for a in f_blocks)))],
      axis=-1)  # bool[B, Kn, n, T + K·n + n]
  logits = jnp.concatenate([to_kept, to_own], axis=-1)
  logits = jnp.where(mask[:, None], logits * (dh ** -0.5), _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out_noisy = jnp.einsum("bhqk,bkhd->bqhd", probs[..., :la].reshape(b, h, kn * n, la),
                         v_kept, preferred_element_type=jnp.float32)
  out_noisy += jnp.einsum("bhcqk,bckhd->bcqhd", probs[..., la:], blocks(v_noisy),
                          preferred_element_type=jnp.float32).reshape(out_noisy.shape)
  out_noisy = out_noisy * mask.any(axis=-1).reshape(b, kn * n)[:, :, None, None]
  return regions.merge(out_kept, out_noisy.astype(q.dtype))
