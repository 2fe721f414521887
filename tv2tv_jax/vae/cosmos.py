"""The NVIDIA Cosmos continuous video tokenizer in Flax, as diffusers' `AutoencoderKLCosmos`
implements it (same module tree and parameter names, channels-last activations).

Shapes (CV4x8x8: `temporal_compression_ratio` 4, `spatial_compression_ratio` 8, 16 latent
channels)::

    frames:  f32[B, 1 + 4k, H, W, 3] in [-1, 1]
    latents: f32[B, 1 + k, H/8, W/8, 16]      (deterministic: the tokenizer has no posterior)
    decode(latents) -> f32[B, 1 + 4k, H, W, 3]

The first frame is encoded alone (it is repeated `patch_size` times in front of the clip);
latent j >= 1 covers frames 4j-3 .. 4j. H and W must be multiples of the spatial ratio.

Architecture (diffusers' `autoencoder_kl_cosmos.py`): a Haar-wavelet (or plain
space-to-depth, `patch_type='rearrange'`) patch embedding over `patch_size`^3 voxels;
factorised causal convolutions (3x3 in space, then 3 taps in time); residual blocks with
per-frame GroupNorm(1); down/up blocks whose resampling is spatial and/or temporal as the
two compression ratios require; a mid block with spatial attention (within a frame) and
causal temporal attention (each pixel over the current and past frames); 1x1x1
`quant_conv` / `post_quant_conv`.

Long clips: `encode(..., tile_latents=m)` / `decode(..., tile_latents=m)` run the clip in
temporal tiles of m latent frames. Causal state carries over exactly (`causal3d.py`): every
temporal convolution keeps the frames its next window needs, every temporal attention keeps
the keys and values of all earlier frames (a fixed-capacity cache, masked), so the tiled
result equals the untiled one up to float rounding (tests/test_cosmos_vae.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax.vae import causal3d
from tv2tv_jax.vae.causal3d import CACHE, CausalConv3d, FrameGroupNorm

PATCH_TYPES = ("haar", "rearrange")


@dataclasses.dataclass(frozen=True)
class CosmosConfig(causal3d.DiffusersConfig):
  """diffusers `AutoencoderKLCosmos` config (field names and defaults as there) + `dtype`.

  Validated on construction: a bad field raises ConfigError naming `cosmos.<field>`.
  """
  prefix = "cosmos"
  class_name = "AutoencoderKLCosmos"
  # config.json keys that describe weights or pipelines, not the network.
  ignored_keys = ("scaling_factor", "latents_mean", "latents_std")

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 16
  encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  decode_block_out_channels: tuple[int, ...] = (256, 512, 512, 512)
  attention_resolutions: tuple[int, ...] = (32,)
  resolution: int = 1024
  num_layers: int = 2
  patch_size: int = 4
  patch_type: str = "haar"
  spatial_compression_ratio: int = 8
  temporal_compression_ratio: int = 8
  dtype: str = "float32"  # activations of the convolutions; params, norms, softmax stay f32

  def __post_init__(self):
    require = self.require
    def pow2(v):
      return v >= 1 and v & (v - 1) == 0
    require(self.patch_type in PATCH_TYPES, "patch_type", f"one of {PATCH_TYPES}, got "
            f"{self.patch_type!r}")
    require(pow2(self.patch_size), "patch_size", f"a power of 2, got {self.patch_size}")
    for name in ("spatial_compression_ratio", "temporal_compression_ratio"):
      v = getattr(self, name)
      require(pow2(v) and v >= self.patch_size, name,
              f"a power of 2 >= patch_size {self.patch_size}, got {v}")
    for name in ("encoder_block_out_channels", "decode_block_out_channels"):
      widths = getattr(self, name)
      require(len(widths) >= 2, name, f"needs at least 2 widths, got {widths}")
      require(len(widths) - 2 >= max(self.num_spatial_layers, self.num_temporal_layers), name,
              f"{len(widths) - 2} resampling blocks cannot reach the compression ratios")
    self.check_dtype()

  @property
  def num_spatial_layers(self) -> int:
    return int(math.log2(self.spatial_compression_ratio)) - int(math.log2(self.patch_size))

  @property
  def num_temporal_layers(self) -> int:
    return int(math.log2(self.temporal_compression_ratio)) - int(math.log2(self.patch_size))


CV4x8x8 = CosmosConfig(temporal_compression_ratio=4)  # Cosmos-0.1-Tokenizer-CV4x8x8
CV8x8x8 = CosmosConfig()  # Cosmos-1.0-Tokenizer-CV8x8x8 (diffusers' defaults)


# --------------------------------------------------------------------------- patching

def _haar_signs() -> np.ndarray:
  """S[n, i, j, k] = (-1)^(t_n i + h_n j + w_n k), band n = 4 t_n + 2 h_n + w_n (0 = low)."""
  bits = np.array([[(n >> 2) & 1, (n >> 1) & 1, n & 1] for n in range(8)])
  d = np.array(np.meshgrid([0, 1], [0, 1], [0, 1], indexing="ij"))  # [3, 2, 2, 2]
  return ((-1.0) ** np.einsum("na,aijk->nijk", bits, d)).astype(np.float32)


def haar_dwt(x: jax.Array) -> jax.Array:
  """One level of the 3-D Haar transform. x: [B, T, H, W, C] (T, H, W even) ->
  [B, T/2, H/2, W/2, 8C], channel = band * C + c (diffusers' order: band 0 is low-low-low).

  The reference filters with (1, 1)/sqrt(2) and (1, -1)/sqrt(2) along each axis and then
  divides by sqrt(8): each band is 1/8 of a signed sum over the 2x2x2 voxel.
  """
  b, t, h, w, c = x.shape
  x = x.reshape(b, t // 2, 2, h // 2, 2, w // 2, 2, c)
  y = jnp.einsum("btihjwkc,nijk->bthwnc", x, jnp.asarray(_haar_signs(), x.dtype) / 8)
  return y.reshape(b, t // 2, h // 2, w // 2, 8 * c)


def haar_idwt(y: jax.Array) -> jax.Array:
  """Inverse of `haar_dwt`: [B, T, H, W, 8C] -> [B, 2T, 2H, 2W, C]."""
  b, t, h, w, c8 = y.shape
  y = y.reshape(b, t, h, w, 8, c8 // 8)
  x = jnp.einsum("bthwnc,nijk->btihjwkc", y, jnp.asarray(_haar_signs(), y.dtype))
  return x.reshape(b, 2 * t, 2 * h, 2 * w, c8 // 8)


def patchify(x: jax.Array, p: int, kind: str) -> jax.Array:
  """[B, p*T, p*H, p*W, C] -> [B, T, H, W, p^3 C] (Haar levels or space-to-depth with
  channel = ((c p + i) p + j) p + k, as diffusers orders them)."""
  if kind == "haar":
    for _ in range(int(math.log2(p))):
      x = haar_dwt(x)
    return x
  b, t, h, w, c = x.shape
  x = x.reshape(b, t // p, p, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
  return x.reshape(b, t // p, h // p, w // p, c * p ** 3)


def unpatchify(x: jax.Array, p: int, kind: str) -> jax.Array:
  """Inverse of `patchify`: [B, T, H, W, p^3 C] -> [B, p*T, p*H, p*W, C]."""
  if kind == "haar":
    for _ in range(int(math.log2(p))):
      x = haar_idwt(x)
    return x
  b, t, h, w, cp = x.shape
  x = x.reshape(b, t, h, w, cp // p ** 3, p, p, p).transpose(0, 1, 5, 2, 6, 3, 7, 4)
  return x.reshape(b, t * p, h * p, w * p, cp // p ** 3)


# --------------------------------------------------------------------------- layers

class CausalGroupNorm(nn.Module):
  """diffusers' CosmosCausalGroupNorm (GroupNorm(1), eps 1e-6, per frame): params under
  `norm/`. x: [B, T, H, W, C] -> same."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return FrameGroupNorm(groups=1, eps=1e-6, name="norm")(x)


class ConvProjection(nn.Module):
  """3x3 spatial conv (`conv_s`) then a 3-tap causal temporal conv (`conv_t`).
  x: [B, T, H, W, Cin] -> [B, T, H, W, features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = CausalConv3d(self.features, (1, 3, 3), spatial_pad=1, dtype=self.dtype, name="conv_s")(x)
    return CausalConv3d(self.features, (3, 1, 1), dtype=self.dtype, name="conv_t")(x)


class ResnetBlock(nn.Module):
  """norm -> SiLU -> ConvProjection, twice, plus a (1x1x1 conv if the width changes)
  shortcut. x: [B, T, H, W, Cin] -> [B, T, H, W, features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = ConvProjection(self.features, self.dtype, name="conv1")(
        nn.silu(CausalGroupNorm(name="norm1")(x)))
    h = ConvProjection(self.features, self.dtype, name="conv2")(
        nn.silu(CausalGroupNorm(name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = CausalConv3d(self.features, dtype=self.dtype, name="conv_shortcut")(x)
    return h + x.astype(h.dtype)


class Attention(nn.Module):
  """Single-head self-attention with 1x1x1 q/k/v/out projections and a residual.

  `temporal=False`: the tokens are the H*W pixels of one frame. `temporal=True`: the tokens
  are one pixel's frames, each attending to itself and earlier frames; in a stream the keys
  and values of earlier tiles come from a cache of `cache_frames` slots.
  x: [B, T, H, W, C] -> same.
  """
  temporal: bool
  cache_frames: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = CausalGroupNorm(name="norm")(x)
    q, k, v = (CausalConv3d(c, dtype=self.dtype, name=f"to_{n}")(h) for n in "qkv")
    if not self.temporal:
      out = causal3d.frame_attention(q, k, v)
    else:
      t = q.shape[1]
      q_pos = jnp.arange(t)
      if causal3d.streaming(self):
        if t > self.cache_frames:
          raise ValueError(f"a tile of {t} frames exceeds the attention cache of "
                           f"{self.cache_frames}")
        shape = (k.shape[0], self.cache_frames, *k.shape[2:])
        k_cache = self.variable(CACHE, "k", jnp.zeros, shape, k.dtype)
        v_cache = self.variable(CACHE, "v", jnp.zeros, shape, v.dtype)
        index = self.variable(CACHE, "index", lambda: jnp.zeros((), jnp.int32))
        i = index.value
        k_cache.value = jax.lax.dynamic_update_slice_in_dim(k_cache.value, k, i, axis=1)
        v_cache.value = jax.lax.dynamic_update_slice_in_dim(v_cache.value, v, i, axis=1)
        index.value = i + t
        k, v, q_pos = k_cache.value, v_cache.value, q_pos + i
      # Slots not yet written sit at positions beyond every query: the causal mask hides them.
      mask = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]  # [T, S]
      logits = jnp.einsum("bthwc,bshwc->bhwts", q, k, preferred_element_type=jnp.float32)
      logits = jnp.where(mask, logits * (1.0 / math.sqrt(c)), -jnp.inf)
      probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      out = jnp.einsum("bhwts,bshwc->bthwc", probs, v)
    return CausalConv3d(c, dtype=self.dtype, name="to_out_0")(out) + x.astype(out.dtype)


class Downsample(nn.Module):
  """Spatial 2x (zero pad right/bottom, stride-2 3x3 conv + 2x2 mean) and/or temporal 2x
  (stride-2 causal conv over 2 copies of frame 0 + 2-frame mean over 1 copy), then a 1x1x1
  conv. Time: 1 + 2m -> 1 + m. x: [B, T, H, W, C] -> [B, T', H', W', C]."""
  spatial: bool
  temporal: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if self.spatial:
      xp = jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0)))
      conv = CausalConv3d(c, (1, 3, 3), stride=(1, 2, 2), dtype=self.dtype, name="conv1")(xp)
      b, t, h, w, _ = conv.shape
      pool = xp[:, :, :2 * h, :2 * w].reshape(b, t, h, 2, w, 2, c).mean(axis=(3, 5))
      x = conv + pool.astype(conv.dtype)
    if self.temporal:
      conv = CausalConv3d(c, (3, 1, 1), stride=(2, 1, 1), time_pad=2, dtype=self.dtype,
                          name="conv2")(x)
      xp = causal3d.causal_past(self, x, 1, 2, 2, name="pool_past")
      b, t = conv.shape[:2]
      pool = xp[:, :2 * t].reshape(b, t, 2, *xp.shape[2:]).mean(axis=2)
      x = conv + pool.astype(conv.dtype)
    return CausalConv3d(c, dtype=self.dtype, name="conv3")(x)


class Upsample(nn.Module):
  """Temporal 2x (each frame twice, the clip's first frame once; + causal conv residual)
  and/or spatial 2x (nearest; + 3x3 conv residual), then a 1x1x1 conv. Time: 1 + m ->
  1 + 2m. x: [B, T, H, W, C] -> [B, T', H', W', C]."""
  spatial: bool
  temporal: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if self.temporal:
      first = causal3d.first_tile(self)
      x = jnp.repeat(x, 2, axis=1)[:, 1 if first else 0:]
      x = CausalConv3d(c, (3, 1, 1), dtype=self.dtype, name="conv1")(x) + x
    if self.spatial:
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
      x = CausalConv3d(c, (1, 3, 3), spatial_pad=1, dtype=self.dtype, name="conv2")(x) + x
    return CausalConv3d(c, dtype=self.dtype, name="conv3")(x)


class Block(nn.Module):
  """A down or up block: `num_layers` resnets (each followed by spatial and temporal
  attention if `attention`), then the resampler. x: [B, T, H, W, Cin] -> [B, T', H', W', features]."""
  features: int
  num_layers: int
  attention: bool
  resample: str  # "down" or "up"
  spatial: bool
  temporal: bool
  cache_frames: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.dtype, name=f"resnets_{j}")(x)
      if self.attention:
        x = Attention(False, dtype=self.dtype, name=f"attentions_{j}")(x)
        x = Attention(True, self.cache_frames, self.dtype, name=f"temp_attentions_{j}")(x)
    if self.spatial or self.temporal:
      cls, name = (Downsample, "downsamplers_0") if self.resample == "down" else (
          Upsample, "upsamplers_0")
      x = cls(self.spatial, self.temporal, self.dtype, name=name)(x)
    return x


class MidBlock(nn.Module):
  """resnet, spatial attention, temporal attention, resnet. x: [B, T, H, W, C] -> same."""
  cache_frames: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.dtype, name="resnets_0")(x)
    x = Attention(False, dtype=self.dtype, name="attentions_0")(x)
    x = Attention(True, self.cache_frames, self.dtype, name="temp_attentions_0")(x)
    return ResnetBlock(c, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """frames: [B, 1 + tk, H, W, in] (or a later tile of a stream: [B, t m, H, W, in]) ->
  [B, 1 + k, H/s, W/s, latent] before `quant_conv`."""
  cfg: CosmosConfig
  cache_frames: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    widths, p = c.encoder_block_out_channels, c.patch_size
    if causal3d.first_tile(self):
      x = jnp.concatenate([jnp.repeat(x[:, :1], p - 1, axis=1), x], axis=1)
    x = ConvProjection(widths[0], dt, name="conv_in")(patchify(x, p, c.patch_type))
    res = c.resolution // p
    for i in range(len(widths) - 1):
      attention = res in c.attention_resolutions
      down = i < len(widths) - 2
      x = Block(widths[i + 1], c.num_layers, attention, "down",
                spatial=down and i < c.num_spatial_layers,
                temporal=down and i < c.num_temporal_layers,
                cache_frames=self.cache_frames, dtype=dt, name=f"down_blocks_{i}")(x)
      res = res // 2 if down else res
    x = MidBlock(self.cache_frames, dt, name="mid_block")(x)
    x = nn.silu(CausalGroupNorm(name="norm_out")(x))
    return ConvProjection(c.latent_channels, dt, name="conv_out")(x)


class Decoder(nn.Module):
  """latents (after `post_quant_conv`): [B, 1 + k, h, w, latent] (or a later tile: [B, m,
  ...]) -> frames [B, 1 + tk, h s, w s, out] (a later tile: [B, t m, ...])."""
  cfg: CosmosConfig
  cache_frames: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    widths = tuple(reversed(c.decode_block_out_channels))
    p = c.patch_size
    first = causal3d.first_tile(self)
    x = ConvProjection(widths[0], dt, name="conv_in")(x)
    x = MidBlock(self.cache_frames, dt, name="mid_block")(x)
    res = (c.resolution // p) // 2 ** (len(widths) - 2)
    for i in range(len(widths) - 1):
      attention = res in c.attention_resolutions
      up = i < len(widths) - 2
      temporal = up and 0 < i < c.num_temporal_layers + 1
      spatial = up and (temporal or (i < c.num_spatial_layers
                                     and c.num_spatial_layers > c.num_temporal_layers))
      x = Block(widths[i + 1], c.num_layers + 1, attention, "up", spatial=spatial,
                temporal=temporal, cache_frames=self.cache_frames, dtype=dt,
                name=f"up_blocks_{i}")(x)
      res = res * 2 if up else res
    x = nn.silu(CausalGroupNorm(name="norm_out")(x))
    x = ConvProjection(c.out_channels * p ** 3, dt, name="conv_out")(x)
    x = unpatchify(x.astype(jnp.float32), p, c.patch_type)
    return x[:, p - 1:] if first else x


class CosmosVAE(nn.Module):
  """`AutoencoderKLCosmos`: encoder + quant_conv; post_quant_conv + decoder.

  encode: f32[B, 1 + tk, H, W, 3] -> f32[B, 1 + k, H/s, W/s, C]; decode: the inverse shape.
  `cache_frames`: time slots of the temporal-attention caches when run as a stream.
  """
  cfg: CosmosConfig
  cache_frames: int = 0

  def setup(self):
    dt = jnp.dtype(self.cfg.dtype)
    self.encoder = Encoder(self.cfg, self.cache_frames)
    self.decoder = Decoder(self.cfg, self.cache_frames)
    self.quant_conv = CausalConv3d(self.cfg.latent_channels, dtype=dt)
    self.post_quant_conv = CausalConv3d(self.cfg.latent_channels, dtype=dt)

  def encode(self, frames: jax.Array) -> jax.Array:
    return self.quant_conv(self.encoder(frames)).astype(jnp.float32)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.decoder(self.post_quant_conv(latents))

  def __call__(self, frames: jax.Array) -> jax.Array:
    return self.decode(self.encode(frames))


# --------------------------------------------------------------------------- public API

@functools.partial(jax.jit, static_argnames="cfg")
def init_params(cfg: CosmosConfig, rng: jax.Array) -> Any:
  """Random parameters of `CosmosVAE(cfg)` (f32 leaves; `causal3d.init_params`)."""
  return causal3d.init_params(CosmosVAE(cfg), cfg.in_channels, cfg.spatial_compression_ratio,
                              rng)


@functools.partial(jax.jit, static_argnames=("cfg", "tile_latents"))
def encode(params: Any, frames: jax.Array, cfg: CosmosConfig,
           tile_latents: int | None = None) -> jax.Array:
  """Latents of a clip. frames: f32[B, 1 + tk, H, W, 3] in [-1, 1] -> f32[B, 1 + k, H/s,
  W/s, latent_channels] (t, s: the compression ratios).

  tile_latents: if set, encode in temporal tiles of that many latent frames (1 + t(m-1)
  frames, then t m frames each), carrying the causal state; same result, less memory.
  """
  causal3d.check_frames(frames.shape, cfg.temporal_compression_ratio,
                        cfg.spatial_compression_ratio)
  cache_frames = 1 + (frames.shape[1] - 1) // cfg.patch_size  # the most any layer sees
  return causal3d.encode_clip(CosmosVAE(cfg, cache_frames), params, frames,
                              cfg.temporal_compression_ratio, tile_latents)


@functools.partial(jax.jit, static_argnames=("cfg", "tile_latents"))
def decode(params: Any, latents: jax.Array, cfg: CosmosConfig,
           tile_latents: int | None = None) -> jax.Array:
  """Frames of latents. latents: f32[B, 1 + k, h, w, latent_channels] -> f32[B, 1 + tk,
  h s, w s, 3] (unclipped; about [-1, 1]). tile_latents: as in `encode`."""
  cache_frames = 1 + (latents.shape[1] - 1) * cfg.temporal_compression_ratio // cfg.patch_size
  return causal3d.decode_clip(CosmosVAE(cfg, cache_frames), params, latents, tile_latents)
