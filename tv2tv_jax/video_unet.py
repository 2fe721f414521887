"""The video tower's input and output: a small U-Net around patchify / unpatchify.

Downsampler: chunk latent [h, w, c] and flow time t -> n = (h/p)(w/p) tokens of
width D, via a conv, a learned 2D position embedding, residual conv blocks
conditioned on a timestep embedding, then patchify. Upsampler: tokens -> velocity
of the latent's shape, via un-patchify, a skip connection from the downsampler's
features, and residual conv blocks. Each chunk copy is processed independently,
so nothing here moves information between copies (the mask alone decides that).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax import axes
from tv2tv_jax.config import ModelConfig

_CONV_NAMES = (axes.CONV_HEIGHT, axes.CONV_WIDTH, axes.CONV_IN, axes.CONV_OUT)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding of flow time. t: f32[N] in [0, 1] -> f32[N, dim]."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angle = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """x: [N, h, w, C] -> [N, (h/p)(w/p), p*p*C], row-major over the patch grid."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `patchify`: [N, (h/p)(w/p), p*p*C] -> [N, h, w, C]."""
  n, _, f = x.shape
  c = f // (p * p)
  x = x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h, w, c)


class _Conv(nn.Module):
  features: int
  cfg: ModelConfig
  zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    return nn.Conv(self.features, (3, 3), padding="SAME", dtype=jnp.dtype(self.cfg.dtype),
                   param_dtype=jnp.dtype(self.cfg.param_dtype),
                   kernel_init=nn.with_logical_partitioning(init, _CONV_NAMES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (axes.CONV_OUT,)))(x)


class _GroupNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=self.cfg.unet_groups, dtype=jnp.float32,
                        param_dtype=jnp.dtype(self.cfg.param_dtype),
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones,
                                                                (axes.CONV_OUT,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (axes.CONV_OUT,)))(x)


def _dense(features: int, cfg: ModelConfig, names, zero_init: bool = False):
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(features, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=nn.with_logical_partitioning(init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class TimeEmbed(nn.Module):
  """t: f32[N] -> f32[N, unet_channels] (sinusoid then a 2-layer MLP)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, t):
    c = self.cfg
    e = timestep_embedding(t, c.time_embed_dim)
    e = nn.silu(_dense(c.unet_channels, c, (axes.CONV_IN, axes.CONV_OUT))(e))
    return _dense(c.unet_channels, c, (axes.CONV_IN, axes.CONV_OUT))(e)


class ResBlock(nn.Module):
  """x: [N, h, w, C], temb: [N, C] -> [N, h, w, C]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, temb):
    c = self.cfg.unet_channels
    h = _Conv(c, self.cfg)(nn.silu(_GroupNorm(self.cfg)(x)))
    h = h + _dense(c, self.cfg, (axes.CONV_IN, axes.CONV_OUT))(nn.silu(temb))[:, None, None, :]
    h = _Conv(c, self.cfg, zero_init=True)(nn.silu(_GroupNorm(self.cfg)(h)))
    return x + h


class VideoDownsampler(nn.Module):
  """Chunk latents to tokens.

  latents: f32[N, h, w, c], t: f32[N] -> (tokens [N, n, D], features [N, h, w, C_u]);
  `features` is the skip the upsampler reads.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, latents, t):
    c = self.cfg
    h, w, _ = c.latent_shape
    temb = TimeEmbed(c)(t)
    x = _Conv(c.unet_channels, c)(latents.astype(jnp.dtype(c.dtype)))
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (axes.CONV_HEIGHT, axes.CONV_WIDTH, axes.CONV_OUT)),
        (h, w, c.unet_channels), jnp.dtype(c.param_dtype))
    x = x + pos.astype(x.dtype)[None]
    for _ in range(c.unet_blocks):
      x = ResBlock(c)(x, temb)
    tokens = _dense(c.d_model, c, (axes.PATCH, axes.EMBED))(patchify(x, c.patch_size))
    return tokens, x


class VideoUpsampler(nn.Module):
  """Tokens back to a velocity.

  tokens: [N, n, D], features: [N, h, w, C_u] (the downsampler's skip), t: f32[N]
  -> velocity f32[N, h, w, c]. The last conv is zero-initialised, so training
  starts from a zero velocity.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, features, t):
    c = self.cfg
    h, w, ch = c.latent_shape
    p = c.patch_size
    temb = TimeEmbed(c)(t)
    x = _dense(p * p * c.unet_channels, c, (axes.EMBED, axes.PATCH))(tokens)
    x = unpatchify(x, p, h, w)
    x = _Conv(c.unet_channels, c)(jnp.concatenate([x, features.astype(x.dtype)], axis=-1))
    for _ in range(c.unet_blocks):
      x = ResBlock(c)(x, temb)
    x = _Conv(ch, c, zero_init=True)(nn.silu(_GroupNorm(c)(x)))
    return x.astype(jnp.float32)
