"""Analytic FLOP counts of the model, for MFU and for checking the routing.

Counts multiply-adds as 2 FLOPs, matmuls and convolutions only (what dominates;
XLA's `cost_analysis` also counts elementwise work, which the tests allow for).
A training step costs 3x the forward pass (backward = 2x), except layers whose
input is data (the first conv on latents), whose input gradient is never formed.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from tv2tv_jax.config import Experiment


def _tower_layer(c, tokens: int) -> float:
  """One tower, one layer, on `tokens` tokens: Q/K/V, output projection, SwiGLU."""
  qkv = 2 * tokens * c.d_model * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  out = 2 * tokens * c.num_heads * c.head_dim * c.d_model
  ffn = 2 * tokens * 3 * c.d_model * c.mlp_dim
  return qkv + out + ffn


def _conv(h, w, cin, cout):
  return 2 * h * w * 9 * cin * cout


def _unet(c, copies: int, up: bool) -> tuple[float, float]:
  """(FLOPs with an input gradient, FLOPs of the data-facing first conv) for `copies`."""
  h, w, ch = c.latent_shape
  cu, p, n = c.unet_channels, c.patch_size, c.tokens_per_chunk
  time_mlp = 2 * (c.time_embed_dim * cu + cu * cu)
  blocks = c.unet_blocks * (2 * _conv(h, w, cu, cu) + 2 * cu * cu)
  if up:
    body = (time_mlp + 2 * n * c.d_model * p * p * cu + _conv(h, w, 2 * cu, cu) + blocks
            + _conv(h, w, cu, ch))
    return copies * body, 0.0
  body = time_mlp + blocks + 2 * n * p * p * cu * c.d_model
  return copies * body, copies * _conv(h, w, ch, cu)


def forward_flops(exp: Experiment, batch_size: int, routed: bool = True) -> dict[str, float]:
  """FLOPs of one forward pass over a batch of packed rows, by part.

  routed=False counts both towers on every token (what routing avoids).
  """
  c, s = exp.model, exp.seq
  t_len, v_len = s.text_len, 2 * s.max_chunks * c.tokens_per_chunk
  seq_len = t_len + v_len
  if routed:
    towers = _tower_layer(c, t_len) + _tower_layer(c, v_len)
  else:
    towers = 2 * _tower_layer(c, seq_len)
  attn = 2 * 2 * seq_len * seq_len * c.num_heads * c.head_dim  # QK^T and PV, dense
  down, down_data = _unet(c, 2 * s.max_chunks, up=False)
  up, _ = _unet(c, s.max_chunks, up=True)
  parts = {
      "towers": c.num_layers * towers,
      "attention": c.num_layers * attn,
      "lm_head": 2 * t_len * c.d_model * c.vocab_size,
      "unet": down + up,
      "unet_data_conv": down_data,
  }
  return {k: batch_size * v for k, v in parts.items()}


def train_step_flops(exp: Experiment, batch_size: int, routed: bool = True) -> float:
  """FLOPs of one training step (forward + backward) on `batch_size` rows."""
  f = forward_flops(exp, batch_size, routed)
  return 3 * (sum(f.values()) - f["unet_data_conv"]) + 2 * f["unet_data_conv"]


# Dense bf16 peak FLOP/s per chip, from the vendors' published figures.
_PEAK_BY_KIND = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
)


@functools.lru_cache(maxsize=None)
def device_peak_flops() -> float:
  """Peak FLOP/s of one local device: the published bf16 figure for known accelerators;
  on CPU, the float32 matmul rate measured now (a 1024^3 jnp.dot, best of 5)."""
  device = jax.local_devices()[0]
  kind = device.device_kind.lower()
  for key, peak in _PEAK_BY_KIND:
    if key in kind:
      return peak
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  # With N fake CPU devices on one host they share its cores.
  return 2 * n ** 3 / best / max(1, jax.local_device_count() if kind == "cpu" else 1)
