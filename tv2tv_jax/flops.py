"""Analytic FLOP counts of the model: model FLOPs (for MFU) and executed FLOPs (for compiles).

Counts multiply-adds as 2 FLOPs, matmuls and convolutions only (what dominates;
XLA's `cost_analysis` also counts elementwise work, which the tests allow for).

Two counts, one set of per-layer formulas:
  * model FLOPs (`forward_flops`, `train_step_flops`): the usual MFU convention. A
    training step costs 3x the forward pass (backward = 2x), except layers whose input
    is data (the first conv on latents), whose input gradient is never formed;
    attention is dense over the row, whatever the implementation.
  * executed FLOPs (`executed_step_flops`): what the compiled step runs, to compare with
    XLA's `cost_analysis` (`tv2tv_jax.aot`): the remat recompute, and attention as the
    chosen implementation runs it (the flash kernels recompute the scores in their
    backward pass; the kernels' `pl.CostEstimate`s are built from `attention_flops`
    here, dense over the padded row; the XLA path skips the noisy-key blocks the
    layout makes invisible).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from tv2tv_jax import masks
from tv2tv_jax.config import Experiment


# Matmuls per visited (q-block, kv-block) pair of the Pallas flash-attention kernels
# (tv2tv_jax/attention/kernel_*.py), each 2 * bq * bk * dh FLOPs per query head:
# forward s = q k^T, o += p v; the dq kernel recomputes s, then dp = dO v^T, dq += ds k;
# the dk/dv kernel recomputes s, then dv += p^T dO, dp = dO v^T, dk += ds^T q.
FLASH_MATMULS = {"forward": 2, "dq": 3, "dkv": 4}
# The same for the XLA attention (attention/reference.py): forward q k^T and p v over
# every pair it computes (the model's `region_attention`: all but the pairs
# `masks.Regions.skipped_count` counts); backward dp = dO v^T, dv = p^T dO, dq = ds k,
# dk = ds^T q.
XLA_ATTENTION_MATMULS = {"forward": 2, "backward": 4}
# Tower matmuls (`_tower_matmuls` keys) a remat'd layer does not recompute. `nn.remat`
# without a policy (model.py) saves nothing, but the backward pass recomputes only what it
# reads: the FFN down projection's output only feeds the residual stream that leaves the
# layer (the next layer's saved input), so it is dropped. Q/K/V, attention (the output
# projection's weight gradient reads its output; the kernel's backward its output and
# log-sum-exp), the output projection (the FFN norm reads x + out(o)) and gate/up (their
# product feeds the down projection's weight gradient) are all recomputed. Checked
# against XLA's count of the 3B layer on TPU (docs/aot.md).
REMAT_SKIPS = ("ffn_down",)


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int,
                    matmuls: int = 2) -> int:
  """FLOPs of `matmuls` dense [lq, lk] x head_dim matmuls per row and query head."""
  return 2 * matmuls * batch * heads * lq * lk * head_dim


def _tower_matmuls(c, tokens: int) -> dict[str, float]:
  """One tower, one layer, on `tokens` tokens, by matmul: Q/K/V, output projection,
  SwiGLU gate and up (`ffn_in`), SwiGLU down."""
  return dict(
      qkv=2 * tokens * c.d_model * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
      out=2 * tokens * c.num_heads * c.head_dim * c.d_model,
      ffn_in=2 * tokens * 2 * c.d_model * c.mlp_dim,
      ffn_down=2 * tokens * c.d_model * c.mlp_dim)


def _tower_layer(c, tokens: int) -> float:
  """One tower, one layer, on `tokens` tokens: Q/K/V, output projection, SwiGLU."""
  return sum(_tower_matmuls(c, tokens).values())


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


def _region_lengths(exp: Experiment) -> tuple[int, int]:
  """(text slots, video slots) of a row: [T text | noisy copies | clean copies]."""
  s = exp.seq
  return s.text_len, (s.num_noisy + s.max_chunks) * exp.model.tokens_per_chunk


def forward_flops(exp: Experiment, batch_size: int, routed: bool = True) -> dict[str, float]:
  """FLOPs of one forward pass over a batch of packed rows, by part.

  routed=False counts both towers on every token (what routing avoids).
  """
  c, s = exp.model, exp.seq
  t_len, v_len = _region_lengths(exp)
  seq_len = t_len + v_len
  if routed:
    towers = _tower_layer(c, t_len) + _tower_layer(c, v_len)
  else:
    towers = 2 * _tower_layer(c, seq_len)
  attn = attention_flops(1, c.num_heads, seq_len, seq_len, c.head_dim)  # QK^T, PV: dense
  down, down_data = _unet(c, s.num_noisy + s.max_chunks, up=False)  # noisy and clean copies
  up, _ = _unet(c, s.num_noisy, up=True)  # velocities of the noisy copies
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


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def executed_step_flops(exp: Experiment, batch_size: int, *, layers: int | None = None,
                        block_sizes=None) -> dict[str, float]:
  """FLOPs the compiled training step executes, by part (routed towers).

  Unlike `train_step_flops` (model FLOPs, for MFU) this follows the program:
    towers_*: forward, backward (2x) and, with `model.remat`, the recompute of every
      tower matmul but `REMAT_SKIPS`;
    attention_*: 'pallas' as the kernels' `pl.CostEstimate`s count it (dense over the row
      padded to the kernel blocks: the visited block share is only known at run time):
      forward 2 matmuls, backward 3 (dq kernel) + 4 (dk/dv kernel); 'xla' per
      `XLA_ATTENTION_MATMULS`, over the pairs of the row `region_attention` computes
      (L² less the noisy-key blocks the layout makes invisible); with `model.remat`
      the forward once more;
    lm_head, unet: 3x forward (the first conv on data 2x), as in `train_step_flops`.
  Elementwise work (norms, softmax, RoPE, the optimizer) is not counted.

  Args:
    exp: the experiment; batch_size: rows per step.
    layers: how many of the `model.num_layers` layers to count (default all). XLA's
      `cost_analysis` counts a while loop's body once, so `layers=1` is what it sees of
      scanned layers (`tv2tv_jax.aot`).
    block_sizes: the Pallas kernels' `BlockSizes` (their padding of the row); None: no
      padding. Unused for `attention_impl='xla'`.
  Returns:
    {part: FLOPs of the step}; the step's count is the sum of the values.
  """
  c = exp.model
  layers = c.num_layers if layers is None else layers
  t_len, v_len = _region_lengths(exp)
  seq_len = t_len + v_len
  per_layer = {k: _tower_matmuls(c, t_len)[k] + v for k, v in _tower_matmuls(c, v_len).items()}
  tower_fwd = sum(per_layer.values())
  tower_recompute = sum(v for k, v in per_layer.items() if k not in REMAT_SKIPS)
  if c.attention_impl == "pallas":
    lq = lk = seq_len
    if block_sizes is not None:  # as `attention.kernel.attention_from_fields` pads
      bs = block_sizes.clamp(seq_len, seq_len)
      lq = _round_up(seq_len, math.lcm(bs.block_q, bs.block_q_dkv))
      lk = _round_up(seq_len, math.lcm(bs.block_kv, bs.block_kv_dkv))
    counts = dict(forward=FLASH_MATMULS["forward"],
                  backward=FLASH_MATMULS["dq"] + FLASH_MATMULS["dkv"])
  else:
    skipped = masks.Regions.of_experiment(exp).skipped_count(seq_len)
    lq, lk = 1, seq_len * seq_len - skipped  # the computed pairs, as one "row"
    counts = XLA_ATTENTION_MATMULS
  attn = {k: attention_flops(1, c.num_heads, lq, lk, c.head_dim, m) for k, m in counts.items()}
  attn["recompute"] = attn["forward"]  # remat runs the whole attention forward again
  f = forward_flops(exp, 1)
  parts = {
      "towers_forward": layers * tower_fwd,
      "towers_backward": layers * 2 * tower_fwd,
      "towers_recompute": layers * tower_recompute if c.remat else 0.0,
      "attention_forward": layers * attn["forward"],
      "attention_backward": layers * attn["backward"],
      "attention_recompute": layers * attn["recompute"] if c.remat else 0.0,
      "lm_head": 3 * f["lm_head"],
      "unet": 3 * f["unet"] + 2 * f["unet_data_conv"],
  }
  return {k: batch_size * v for k, v in parts.items()}


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
