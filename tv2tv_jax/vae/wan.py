"""The Wan 2.1 video VAE in Flax, as diffusers' `AutoencoderKLWan` implements it (same module
tree and parameter names, channels-last activations).

Shapes (the published config: 4x in time, 8x8 in space, 16 latent channels)::

    frames:  f32[B, 1 + 4k, H, W, 3] in [-1, 1]
    latents: f32[B, 1 + k, H/8, W/8, 16]       the posterior mean (`latent_dist.mode()`)
    decode(latents) -> f32[B, 1 + 4k, H, W, 3] clamped to [-1, 1], as diffusers clamps it

Latent 0 is frame 0 alone; latent j >= 1 covers frames 4j-3 .. 4j. H and W must be
multiples of 8.

Architecture (diffusers' `autoencoder_kl_wan.py`, Wan 2.1: `is_residual=False`, no
`patch_size`): causal 3x3x3 convolutions whose past is two zero frames; residual blocks with
an RMS norm over the channels of each pixel (`gamma` times sqrt(C), no statistics across
space or time); resamplers that are per-frame 2-D convolutions (stride 2 after zero padding
right/bottom down, nearest 2x then a 3x3 conv halving the channels up) plus, where
`temperal_downsample` says so, a temporal stage; a mid block with single-head attention
among the pixels of each frame; the encoder's `conv_out` and 1x1x1 `quant_conv` give the
posterior's mean and log-variance (2 * z_dim channels), of which `encode` keeps the mean.

Streaming in diffusers, and the function it defines. diffusers runs the encoder on frame 0
alone and then on 4 frames at a time, and the decoder on one latent at a time, with a
feature cache. For the causal convolutions that is the same as one pass over the whole clip
with two zero frames in front. The temporal resamplers are not. Their first chunk skips the
time convolution, so diffusers computes:

  * downsample: frame 0 passes; output j >= 1 is a stride-2, 3-tap conv over frames
    2j-2, 2j-1, 2j (no padding);
  * upsample: frame 0 passes and stays one frame; frames 1.. go through a 3-tap causal conv
    with two zero frames in front (frame 0 is not among its inputs), whose 2C outputs
    become two frames of C channels each.

`Resample` implements exactly that on whole clips, and in tiles through `causal3d`'s cache.

Long clips: `encode(..., tile_latents=m)` / `decode(..., tile_latents=m)` run the clip in
temporal tiles of m latent frames, carrying every causal conv's past in the `cache`
collection; the result equals the untiled one up to float rounding (tests/test_wan_vae.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax.vae import causal3d
from tv2tv_jax.vae.causal3d import CausalConv3d

@dataclasses.dataclass(frozen=True)
class WanConfig(causal3d.DiffusersConfig):
  """diffusers `AutoencoderKLWan` config (field names, spelling and defaults as there; the
  defaults are Wan 2.1's) + `dtype`.

  Validated on construction: a bad field raises ConfigError naming `wan.<field>`. Only the
  Wan 2.1 layout is implemented: Wan 2.2's (`is_residual`, `patch_size`) is refused, and so
  is attention in the down blocks (`attn_scales`), which diffusers cannot run.
  """
  prefix = "wan"
  class_name = "AutoencoderKLWan"
  # config.json keys that are not the network: the published latent statistics, and
  # `clip_output`, which some published configs carry but AutoencoderKLWan does not take
  # (diffusers drops it and always clamps the decoded frames).
  ignored_keys = ("latents_mean", "latents_std", "clip_output")

  base_dim: int = 96
  decoder_base_dim: int | None = None  # None: base_dim
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_scales: tuple[float, ...] = ()  # only (): see __post_init__
  temperal_downsample: tuple[bool, ...] = (False, True, True)
  dropout: float = 0.0  # training only: inference ignores it
  is_residual: bool = False
  in_channels: int = 3
  out_channels: int = 3
  patch_size: int | None = None
  scale_factor_temporal: int | None = 4
  scale_factor_spatial: int | None = 8
  dtype: str = "float32"  # activations of the convolutions; params, norms, softmax stay f32

  def __post_init__(self):
    require = self.require
    def positive(v):
      return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
      require(positive(getattr(self, name)), name, f"a positive int, got {getattr(self, name)!r}")
    require(self.decoder_base_dim is None or positive(self.decoder_base_dim), "decoder_base_dim",
            f"None or a positive int, got {self.decoder_base_dim!r}")
    require(isinstance(self.dim_mult, tuple) and len(self.dim_mult) >= 1
            and all(positive(u) for u in self.dim_mult), "dim_mult",
            f"a list of positive ints, got {self.dim_mult!r}")
    t = self.temperal_downsample
    require(isinstance(t, tuple) and len(t) == len(self.dim_mult) - 1
            and all(isinstance(v, bool) for v in t), "temperal_downsample",
            f"{len(self.dim_mult) - 1} bools (one per resampling stage), got {t!r}")
    # diffusers streams the encoder 1 frame, then 4 at a time: only 4x in time fits that.
    require(sum(t) == 2, "temperal_downsample", f"exactly 2 temporal stages (4x in time, "
            f"as diffusers streams 4 frames at a time), got {t!r}")
    # diffusers 0.42.1 builds attention into the down blocks for these scales but cannot run
    # it (its encoder passes a feature cache WanAttentionBlock does not take), so there is
    # no reference to match; no published config sets them.
    require(self.attn_scales == (), "attn_scales",
            f"only [] is implemented (no attention in the down blocks), got {self.attn_scales!r}")
    require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout",
            f"in [0, 1), got {self.dropout!r}")
    require(self.is_residual is False, "is_residual",
            "only Wan 2.1's layout (False) is implemented, not Wan 2.2's residual blocks")
    require(self.patch_size is None, "patch_size",
            f"only None (Wan 2.1) is implemented, got {self.patch_size!r}")
    for name, want in (("scale_factor_temporal", self.temporal_compression_ratio),
                       ("scale_factor_spatial", self.spatial_compression_ratio)):
      v = getattr(self, name)
      require(v is None or v == want, name, f"None or {want} (what the layers give), got {v!r}")
    self.check_dtype()

  @property
  def temporal_compression_ratio(self) -> int:
    return 2 ** sum(self.temperal_downsample)

  @property
  def spatial_compression_ratio(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def latent_channels(self) -> int:
    return self.z_dim


WAN_2_1 = WanConfig()  # Wan-AI/Wan2.1-*-Diffusers, subfolder vae


# --------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
  """diffusers' WanRMS_norm: each pixel's channel vector divided by its L2 norm (at least
  1e-12), times sqrt(C) * gamma, in float32. x: [B, T, H, W, C] -> same shape and dtype.

  Param `gamma`: f32[C, 1, 1, 1] (f32[C, 1, 1] if `images`), PyTorch's own shape, so that
  the converter copies it as it is.
  """
  images: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    shape = (c, 1, 1) if self.images else (c, 1, 1, 1)
    gamma = self.param("gamma", nn.initializers.ones, shape, jnp.float32).reshape(c)
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, 1e-12) * c ** 0.5 * gamma).astype(x.dtype)


def _conv3(features: int, dtype: Any, name: str) -> CausalConv3d:
  """diffusers' WanCausalConv3d(k=3, padding=1): zero padding 1 in space, 2 zero frames
  before the clip in time."""
  return CausalConv3d(features, (3, 3, 3), spatial_pad=1, zero_past=True, dtype=dtype,
                      name=name)


def _conv2d(features: int, kernel: int, dtype: Any, name: str, **kwargs) -> nn.Conv:
  """A per-frame PyTorch Conv2d: kernel f32[kh, kw, Cin, Cout] (PyTorch's [out, in, kh, kw]
  transposed by the converter's one rule), on [B, T, H, W, Cin]."""
  return nn.Conv(features, (kernel, kernel), dtype=dtype, param_dtype=jnp.float32, name=name,
                 **kwargs)


class ResidualBlock(nn.Module):
  """norm -> SiLU -> 3x3x3 conv, twice, plus a (1x1x1 conv if the width changes) shortcut.
  x: [B, T, H, W, Cin] -> [B, T, H, W, features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(RMSNorm(name="norm1")(x))
    h = _conv3(self.features, self.dtype, "conv1")(h)
    h = _conv3(self.features, self.dtype, "conv2")(nn.silu(RMSNorm(name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = CausalConv3d(self.features, dtype=self.dtype, name="conv_shortcut")(x)
    return h + x.astype(h.dtype)


class AttentionBlock(nn.Module):
  """diffusers' WanAttentionBlock: RMS norm, one 1x1 conv for q, k, v (channel blocks in
  that order), single-head attention among the pixels of each frame, 1x1 `proj`, residual.
  x: [B, T, H, W, C] -> same."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    qkv = _conv2d(3 * c, 1, self.dtype, "to_qkv")(RMSNorm(images=True, name="norm")(x))
    out = causal3d.frame_attention(*jnp.split(qkv, 3, axis=-1))
    return _conv2d(c, 1, self.dtype, "proj")(out) + x.astype(out.dtype)


class Resample(nn.Module):
  """diffusers' WanResample. Time, as diffusers' streaming computes it (module docstring):

    downsample3d: [B, 1 + 2n, ...] -> [B, 1 + n, ...]; upsample3d: [B, 1 + n, ...] ->
    [B, 1 + 2n, ...] (a later tile of a stream: 2n -> n and n -> 2n).

  Space: `downsample*` zero pads right/bottom and runs a stride-2 3x3 conv (H, W -> H/2,
  W/2, C kept); `upsample*` repeats pixels 2x2 and runs a 3x3 conv to `features` channels.
  """
  mode: str
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    # Frame 0 skips the time conv: diffusers' first chunk finds no cache and passes it on.
    first = causal3d.first_tile(self) if self.mode.endswith("3d") else True
    if self.mode == "upsample3d":
      head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
      y = CausalConv3d(2 * c, (3, 1, 1), zero_past=True, dtype=self.dtype, name="time_conv")(rest)
      b, t, h, w, _ = y.shape
      # Channel block s of output t is frame 2t + s (diffusers' reshape to (b, 2, c, ...)).
      y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
      x = jnp.concatenate([head.astype(y.dtype), y], axis=1)
    if self.mode.startswith("upsample"):
      # diffusers' 'nearest-exact' upsampling: at a factor of 2, each pixel twice.
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      return _conv2d(self.features, 3, self.dtype, "resample_1", padding=((1, 1), (1, 1)))(x)
    x = _conv2d(c, 3, self.dtype, "resample_1", strides=(2, 2), padding=((0, 1), (0, 1)))(x)
    if self.mode == "downsample3d":
      y = CausalConv3d(c, (3, 1, 1), stride=(2, 1, 1), time_pad=0, dtype=self.dtype,
                       name="time_conv")(x)
      x = jnp.concatenate([x[:, :1], y], axis=1) if first else y
    return x


class MidBlock(nn.Module):
  """resnet, attention, resnet. x: [B, T, H, W, C] -> same."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResidualBlock(c, self.dtype, name="resnets_0")(x)
    x = AttentionBlock(self.dtype, name="attentions_0")(x)
    return ResidualBlock(c, self.dtype, name="resnets_1")(x)


class UpBlock(nn.Module):
  """`num_res_blocks + 1` resnets, then (unless `mode` is None) a Resample to features // 2
  channels. x: [B, T, H, W, Cin] -> [B, T', H', W', features or features // 2]."""
  features: int
  num_res_blocks: int
  mode: str | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_res_blocks + 1):
      x = ResidualBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
    if self.mode is not None:
      x = Resample(self.mode, self.features // 2, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """frames [B, 1 + 4k, H, W, in] (a later tile of a stream: [B, 4m, ...]) -> the posterior's
  [B, 1 + k, H/s, W/s, 2 z_dim] before `quant_conv`. `down_blocks` is one flat list, as in
  diffusers: per stage its resnets, then the stage's resampler."""
  cfg: WanConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    dims = [c.base_dim * u for u in (1,) + c.dim_mult]
    x = _conv3(dims[0], dt, "conv_in")(x)
    n = 0
    for i, width in enumerate(dims[1:]):
      for _ in range(c.num_res_blocks):
        x = ResidualBlock(width, dt, name=f"down_blocks_{n}")(x)
        n += 1
      if i != len(c.dim_mult) - 1:
        mode = "downsample3d" if c.temperal_downsample[i] else "downsample2d"
        x = Resample(mode, width, dt, name=f"down_blocks_{n}")(x)
        n += 1
    x = MidBlock(dt, name="mid_block")(x)
    x = nn.silu(RMSNorm(name="norm_out")(x))
    return _conv3(2 * c.z_dim, dt, "conv_out")(x)


class Decoder(nn.Module):
  """latents after `post_quant_conv` [B, 1 + k, h, w, z_dim] (a later tile: [B, m, ...]) ->
  frames [B, 1 + 4k, h s, w s, out] (a later tile: [B, 4m, ...]), not yet clamped. No
  attention outside the mid block: diffusers' up blocks ignore `attn_scales`."""
  cfg: WanConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    base = c.decoder_base_dim or c.base_dim
    dims = [base * u for u in (c.dim_mult[-1],) + c.dim_mult[::-1]]
    temporal = c.temperal_downsample[::-1]
    x = _conv3(dims[0], dt, "conv_in")(x)
    x = MidBlock(dt, name="mid_block")(x)
    for i, width in enumerate(dims[1:]):
      mode = None
      if i != len(c.dim_mult) - 1:
        mode = "upsample3d" if temporal[i] else "upsample2d"
      x = UpBlock(width, c.num_res_blocks, mode, dt, name=f"up_blocks_{i}")(x)
    x = nn.silu(RMSNorm(name="norm_out")(x))
    return _conv3(c.out_channels, dt, "conv_out")(x)


class WanVAE(nn.Module):
  """`AutoencoderKLWan`: encoder + quant_conv (the posterior mean is kept); post_quant_conv
  + decoder, clamped to [-1, 1].

  encode: f32[B, 1 + 4k, H, W, 3] -> f32[B, 1 + k, H/8, W/8, z_dim]; decode: the inverse.
  """
  cfg: WanConfig

  def setup(self):
    dt, z = jnp.dtype(self.cfg.dtype), self.cfg.z_dim
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)
    self.quant_conv = CausalConv3d(2 * z, dtype=dt)
    self.post_quant_conv = CausalConv3d(z, dtype=dt)

  def encode(self, frames: jax.Array) -> jax.Array:
    moments = self.quant_conv(self.encoder(frames)).astype(jnp.float32)
    return moments[..., :self.cfg.z_dim]  # mean; the log-variance follows

  def decode(self, latents: jax.Array) -> jax.Array:
    frames = self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)
    return jnp.clip(frames, -1.0, 1.0)

  def __call__(self, frames: jax.Array) -> jax.Array:
    return self.decode(self.encode(frames))


# --------------------------------------------------------------------------- public API

@functools.partial(jax.jit, static_argnames="cfg")
def init_params(cfg: WanConfig, rng: jax.Array) -> Any:
  """Random parameters of `WanVAE(cfg)` (f32 leaves; `causal3d.init_params`)."""
  return causal3d.init_params(WanVAE(cfg), cfg.in_channels, cfg.spatial_compression_ratio, rng)


@functools.partial(jax.jit, static_argnames=("cfg", "tile_latents"))
def encode(params: Any, frames: jax.Array, cfg: WanConfig,
           tile_latents: int | None = None) -> jax.Array:
  """Latents (the posterior mean) of a clip. frames: f32[B, 1 + 4k, H, W, in_channels] in
  [-1, 1] -> f32[B, 1 + k, H/s, W/s, z_dim] (s: the spatial ratio, 8).

  tile_latents: if set, encode in temporal tiles of that many latent frames (1 + 4(m-1)
  frames, then 4m frames each), carrying the causal state; same result, less memory.
  """
  causal3d.check_frames(frames.shape, cfg.temporal_compression_ratio,
                        cfg.spatial_compression_ratio)
  return causal3d.encode_clip(WanVAE(cfg), params, frames, cfg.temporal_compression_ratio,
                              tile_latents)


@functools.partial(jax.jit, static_argnames=("cfg", "tile_latents"))
def decode(params: Any, latents: jax.Array, cfg: WanConfig,
           tile_latents: int | None = None) -> jax.Array:
  """Frames of latents. latents: f32[B, 1 + k, h, w, z_dim] -> f32[B, 1 + 4k, h s, w s,
  out_channels], clamped to [-1, 1] as diffusers' decode clamps. tile_latents: as in
  `encode`."""
  return causal3d.decode_clip(WanVAE(cfg), params, latents, tile_latents)
