"""XLA reference attention: the dense mask from metadata, grouped-query, f32 softmax.

This is the default path on CPU and GPU and the numerical reference for the
Pallas kernel. It materialises the [B, L, L] mask and the [B, H, L, L] logits.
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
  hkv = k.shape[2]
  q = q.reshape(b, lq, hkv, h // hkv, dh)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  logits = logits * (dh ** -0.5)
  m = mask[:, None, None, :, :]
  logits = jnp.where(m, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(m.any(axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, dh).astype(q.dtype)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        meta: masks.SeqMeta) -> jax.Array:
  """Self-attention over a packed row under the TV2TV mask built from `meta`.

  q: [B, L, H, dh], k/v: [B, L, Hkv, dh], meta: SeqMeta of [B, L]. Returns [B, L, H, dh].
  """
  return masked_attention(q, k, v, masks.dense_mask(meta))
