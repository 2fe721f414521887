"""Attention over the interleaved sequence: one dispatch, several implementations.

`attend` is the only entry the model calls. Implementations:
  'xla'    -- `reference.reference_attention`: dense mask from metadata (default on
              CPU/GPU, and the oracle the kernel is tested against).
  'pallas' -- the interleaved splash-attention kernel (TPU; interpret mode on CPU).
"""

from __future__ import annotations

import jax

from tv2tv_jax import masks
from tv2tv_jax.attention.reference import masked_attention, reference_attention

_IMPLS = {"xla": reference_attention}


def register(name: str, fn) -> None:
  """Registers an implementation `fn(q, k, v, meta) -> out` under `name`."""
  _IMPLS[name] = fn


def attend(q: jax.Array, k: jax.Array, v: jax.Array, meta: masks.SeqMeta,
           impl: str = "xla") -> jax.Array:
  """TV2TV self-attention over packed rows.

  Args:
    q: [B, L, H, dh], k: [B, L, Hkv, dh], v: [B, L, Hkv, dh] (RoPE already applied;
      q is not pre-scaled).
    meta: per-slot metadata, [B, L] each.
    impl: 'xla' or 'pallas'.
  Returns:
    [B, L, H, dh] in q's dtype.
  """
  if impl == "pallas" and "pallas" not in _IMPLS:
    # Imported lazily: the kernel module pulls in Pallas/Mosaic.
    from tv2tv_jax.attention import kernel  # noqa: F401  (registers itself)
  if impl not in _IMPLS:
    raise ValueError(f"unknown attention implementation {impl!r}; known: {sorted(_IMPLS)}")
  return _IMPLS[impl](q, k, v, meta)


__all__ = ["attend", "masked_attention", "reference_attention", "register"]
