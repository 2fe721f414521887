"""Llama-style building blocks of one tower: RMSNorm, RoPE, GQA projections, SwiGLU.

Every parameter carries logical axis names (`tv2tv_jax.axes`); rank>2 weights are
declared with `self.param` (not `nn.DenseGeneral`, which flattens kernels to 2-D and would
lose the per-head names) and applied by `rows_matmul`. Letters in shapes: b batch, l length,
d model width, h query heads, k kv heads, e head dim, f FFN width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax import axes
from tv2tv_jax.config import Llama3RopeScaling, ModelConfig


def _param(module: nn.Module, name: str, init, shape, names, cfg: ModelConfig):
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      jnp.dtype(cfg.param_dtype))


def _fan_in_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


def rows_matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
  """x [B, L, *in] contracted with w [*in, *out] over the `n_in` dims `in`: [B, L, *out].

  The same product as the einsum "bl<in>,<in><out>->bl<out>", computed on the rows
  flattened to one axis ([B*L, prod(in)] @ [prod(in), prod(out)]). Why: the weight
  gradient of the einsum contracts two dimensions (b and l), which XLA:CPU lowers outside
  its fast dot path after transposing copies of the activations; flattened, every dot of
  the forward and backward contracts one dimension (a SwiGLU FFN's forward + backward 1.5x
  faster on CPU, docs/benchmarks.md). The merged row axis keeps the batch and length
  shardings (batch major), so nothing is resharded.
  """
  b, l = x.shape[:2]
  k = 1
  for n in x.shape[2:2 + n_in]:
    k *= n
  out = w.shape[n_in:]
  y = x.reshape(b * l, k) @ w.reshape(k, -1)
  return y.reshape(b, l, *out)


class RMSNorm(nn.Module):
  """x: [..., D] -> [..., D]; statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (axes.NORM,), self.cfg)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.cfg.dtype))


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: Llama3RopeScaling | None = None) -> jax.Array:
  """RoPE's inverse frequencies f32[head_dim / 2]: theta^(-2i/head_dim), then `scaling`.

  Llama-3.1 scaling ("llama3"; Hugging Face `_compute_llama3_parameters`) sorts each
  frequency f by its wavelength 2*pi/f against the pretraining context
  C = original_max_position_embeddings:
    wavelength < C / high_freq_factor   kept (short-range detail)
    wavelength > C / low_freq_factor    divided by `factor` (stretched to the longer context)
    in between                          (1 - s) * f / factor + s * f, with
                                        s = (C / wavelength - low) / (high - low),
  which meets both outer bands continuously (s = 0 at C/low, s = 1 at C/high).
  """
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return freq
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  context = float(scaling.original_max_position_embeddings)
  wavelen = 2 * jnp.pi / freq
  s = (context / wavelen - low) / (high - low)
  middle = (1 - s) * freq / scaling.factor + s * freq
  # Strict inequalities as in the reference: a wavelength exactly on a boundary is
  # "in between", where the interpolation already equals the outer band's value.
  return jnp.where(wavelen < context / high, freq,
                   jnp.where(wavelen > context / low, freq / scaling.factor, middle))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               scaling: Llama3RopeScaling | None = None) -> jax.Array:
  """Rotary position embedding (Llama's half-split convention).

  x: [B, L, H, dh]; positions: i32[B, L]; theta: the base; scaling: optional frequency
  scaling (`ModelConfig.rope_scaling`, see `rope_inv_freq`). Returns x rotated, same dtype.
  """
  freq = rope_inv_freq(x.shape[-1], theta, scaling)  # [dh/2]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B, L, dh/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class QKVProjection(nn.Module):
  """x: [B, N, D] -> q [B, N, H, dh], k [B, N, Hkv, dh], v [B, N, Hkv, dh]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array):
    c = self.cfg
    init = _fan_in_init(c.d_model)
    wq = _param(self, "wq", init, (c.d_model, c.num_heads, c.head_dim),
                (axes.EMBED, axes.Q_HEADS, axes.HEAD_DIM), c)
    wk = _param(self, "wk", init, (c.d_model, c.num_kv_heads, c.head_dim),
                (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), c)
    wv = _param(self, "wv", init, (c.d_model, c.num_kv_heads, c.head_dim),
                (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM), c)
    dt = jnp.dtype(c.dtype)
    x = x.astype(dt)
    q = rows_matmul(x, wq.astype(dt), 1)
    k = rows_matmul(x, wk.astype(dt), 1)
    v = rows_matmul(x, wv.astype(dt), 1)
    q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    k = nn.with_logical_constraint(k, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    v = nn.with_logical_constraint(v, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
    return q, k, v


class OutProjection(nn.Module):
  """o: [B, N, H, dh] -> [B, N, D]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, o: jax.Array) -> jax.Array:
    c = self.cfg
    wo = _param(self, "wo", _fan_in_init(c.num_heads * c.head_dim),
                (c.num_heads, c.head_dim, c.d_model), (axes.Q_HEADS, axes.HEAD_DIM, axes.EMBED), c)
    dt = jnp.dtype(c.dtype)
    return rows_matmul(o.astype(dt), wo.astype(dt), 2)


class SwiGLU(nn.Module):
  """x: [B, N, D] -> [B, N, D]; down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    w_gate = _param(self, "w_gate", _fan_in_init(c.d_model), (c.d_model, c.mlp_dim),
                    (axes.EMBED, axes.MLP), c)
    w_up = _param(self, "w_up", _fan_in_init(c.d_model), (c.d_model, c.mlp_dim),
                  (axes.EMBED, axes.MLP), c)
    w_down = _param(self, "w_down", _fan_in_init(c.mlp_dim), (c.mlp_dim, c.d_model),
                    (axes.MLP, axes.EMBED), c)
    dt = jnp.dtype(c.dtype)
    x = x.astype(dt)
    h = nn.silu(rows_matmul(x, w_gate.astype(dt), 1)) * rows_matmul(x, w_up.astype(dt), 1)
    h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
    return rows_matmul(h, w_down.astype(dt), 1)


class TowerLayer(nn.Module):
  """One tower's parameters for one layer: both norms, Q/K/V, output projection, FFN.

  Split into `project` (before the shared attention) and `finish` (after it), so
  the MoT layer can run global attention between the two halves.
  """
  cfg: ModelConfig

  def setup(self):
    self.attn_norm = RMSNorm(self.cfg)
    self.qkv = QKVProjection(self.cfg)
    self.out = OutProjection(self.cfg)
    self.ffn_norm = RMSNorm(self.cfg)
    self.ffn = SwiGLU(self.cfg)

  def project(self, x: jax.Array):
    """x: [B, N, D] -> (q [B, N, H, dh], k [B, N, Hkv, dh], v [B, N, Hkv, dh])."""
    return self.qkv(self.attn_norm(x))

  def finish(self, x: jax.Array, o: jax.Array) -> jax.Array:
    """Residual updates: x [B, N, D], attention output o [B, N, H, dh] -> [B, N, D]."""
    x = x + self.out(o).astype(x.dtype)
    return x + self.ffn(self.ffn_norm(x)).astype(x.dtype)
