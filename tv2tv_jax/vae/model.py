"""A causal 3D-CNN video VAE (Cosmos-CV4x8x8-like): 4x in time, 8x8 in space.

Shapes (defaults, 64x64 RGB, `temporal_factor` 4, spatial factor 8, 16 latent channels)::

    frames:  f32[B, 1 + 4k, 64, 64, 3] in [-1, 1]
    latents: f32[B, 1 + k, 8, 8, 16]
    decode(latents) -> f32[B, 1 + 4k, 64, 64, 3] (unbounded; clip to [-1, 1] for display)

Temporal grouping. The first frame is replicated `temporal_factor - 1` times in front
of the clip, so 1 + 4k frames become 4(1 + k) frames = 1 + k groups of 4: group 0 is
frame 0 alone, group j >= 1 is frames 4j-3 .. 4j (one chunk of the toy world). Each
group is folded into channels together with a `patch_size` x `patch_size` spatial
patch (space-to-depth), so every later layer runs at one time step per latent frame.
The decoder mirrors this and drops the first `temporal_factor - 1` output frames.

Causality. Every temporal convolution pads only on the past side (by replicating the
first time step), and every normalisation is per time step (statistics over H, W and a
channel group, never over time). Hence encoder output j is a function of groups 0..j,
i.e. of frames 0 .. 4j only, and decoder output group j of latents 0..j only
(`tests/test_vae.py` checks both by perturbation).

Two numerically identical implementations of the causal convolution (`conv_impl`):
'conv3d' is one 3-D `lax.conv_general_dilated`; 'stacked2d' stacks the `kernel_t`
time-shifted inputs along channels and runs one 2-D convolution over B*T images, which
XLA:CPU runs faster. Both read the same parameter, `kernel: f32[kt, 3, 3, Cin, Cout]`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax.config import ConfigError

CONV_IMPLS = ("conv3d", "stacked2d")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Shapes of the video VAE; validated on construction (raises ConfigError naming the field).

  The spatial downsampling factor is `patch_size * 2 ** (len(widths) - 1)` (space-to-depth
  at the input, then one stride-2 convolution between consecutive stages).
  """
  frame_size: int = 64  # H = W of the frames
  in_channels: int = 3
  latent_channels: int = 16
  temporal_factor: int = 4  # frames per latent frame (after the first)
  patch_size: int = 2  # input space-to-depth factor
  widths: tuple[int, ...] = (64, 128, 128)  # channels per stage, finest first
  blocks_per_stage: int = 1  # residual blocks per stage (encoder and decoder each)
  mid_blocks: int = 1  # residual blocks at the latent resolution
  kernel_t: int = 3  # temporal taps of every causal convolution
  norm_groups: int = 8
  # Added to the encoder's raw logvar: starts the posterior narrow (std e^-4 = 0.018), so
  # early reconstructions are not drowned in sampling noise that the small KL weight would
  # take thousands of steps to shrink.
  logvar_init: float = -8.0
  logvar_min: float = -20.0  # logvar clip range, keeps exp() finite
  logvar_max: float = 10.0
  conv_impl: str = "stacked2d"
  dtype: str = "float32"  # activations; parameters stay float32

  def __post_init__(self):
    def require(cond, name, message):
      if not cond:
        raise ConfigError(f"vae.{name}", message)
    for name in ("frame_size", "in_channels", "latent_channels", "temporal_factor",
                 "patch_size", "kernel_t", "norm_groups"):
      require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    require(self.blocks_per_stage >= 0 and self.mid_blocks >= 0, "blocks_per_stage",
            "block counts must be >= 0")
    require(len(self.widths) >= 1 and all(int(w) >= 1 for w in self.widths), "widths",
            f"needs at least one positive width, got {self.widths}")
    for w in self.widths:
      require(w % self.norm_groups == 0, "norm_groups",
              f"norm_groups={self.norm_groups} does not divide width {w}")
    require(self.frame_size % self.spatial_factor == 0, "frame_size",
            f"frame_size={self.frame_size} is not divisible by the spatial factor "
            f"{self.spatial_factor} (patch_size * 2**(len(widths)-1))")
    require(self.logvar_min < self.logvar_max, "logvar_min", "must be below logvar_max")
    require(self.conv_impl in CONV_IMPLS, "conv_impl", f"one of {CONV_IMPLS}, got "
            f"{self.conv_impl!r}")
    require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}, got {self.dtype!r}")

  @property
  def spatial_factor(self) -> int:
    return self.patch_size * 2 ** (len(self.widths) - 1)

  @property
  def latent_size(self) -> int:
    """h = w of a latent frame."""
    return self.frame_size // self.spatial_factor

  def num_latents(self, num_frames: int) -> int:
    """1 + k for 1 + temporal_factor * k frames; ValueError for any other count."""
    k, rem = divmod(num_frames - 1, self.temporal_factor)
    if num_frames < 1 or rem:
      raise ValueError(f"{num_frames} frames is not 1 + {self.temporal_factor}k")
    return 1 + k

  def latent_shape(self, num_frames: int) -> tuple[int, int, int, int]:
    """(1 + k, h, w, C) of one clip's latents."""
    s = self.latent_size
    return (self.num_latents(num_frames), s, s, self.latent_channels)


def vae_config_from_dict(values: Mapping[str, Any] | None) -> VAEConfig:
  """VAEConfig from a ConfigDict section or dict; unknown keys raise ConfigError."""
  values = dict(values.to_dict() if hasattr(values, "to_dict") else (values or {}))
  names = {f.name for f in dataclasses.fields(VAEConfig)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"vae.{unknown[0]}", f"unknown field; VAEConfig has {sorted(names)}")
  if "widths" in values:
    values["widths"] = tuple(int(w) for w in values["widths"])
  return VAEConfig(**values)


# --------------------------------------------------------------------------- layers

def group_frames(frames: jax.Array, t: int, p: int) -> jax.Array:
  """Replicates frame 0 (t-1 times), then folds t frames and p x p pixels into channels.

  frames: [B, 1 + t*k, H, W, C] -> [B, 1 + k, H/p, W/p, t*p*p*C].
  """
  b, n, h, w, c = frames.shape
  x = jnp.concatenate([jnp.repeat(frames[:, :1], t - 1, axis=1), frames], axis=1)
  g = (n + t - 1) // t
  x = x.reshape(b, g, t, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, g, h // p, w // p, t * p * p * c)


def ungroup_frames(x: jax.Array, t: int, p: int, c: int) -> jax.Array:
  """Inverse of `group_frames` minus the padding: [B, G, h, w, t*p*p*c] -> [B, 1+t(G-1), h*p, w*p, c].

  Of group 0 only its last frame is kept (the first t-1 stand for the replicated padding).
  """
  b, g, h, w, _ = x.shape
  x = x.reshape(b, g, h, w, t, p, p, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, g * t, h * p, w * p, c)[:, t - 1:]


class CausalConv(nn.Module):
  """3 x 3 spatial, `kernel_t` temporal convolution that sees only the present and past.

  x: [B, T, H, W, Cin] -> [B, T, H/stride, W/stride, features]. Spatial padding is zeros
  (1 px each side); temporal padding is kernel_t - 1 copies of x[:, 0], on the past side
  only, so output t depends on inputs 0..t.
  """
  features: int
  kernel_t: int
  impl: str = "stacked2d"
  stride: int = 1
  zero_init: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, cin = self.kernel_t, x.shape[-1]
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param("kernel", init, (kt, 3, 3, cin, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if kt > 1:
      x = jnp.concatenate([jnp.repeat(x[:, :1], kt - 1, axis=1), x], axis=1)
    pad = ((1, 1), (1, 1))
    if self.impl == "conv3d":
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, self.stride, self.stride), padding=((0, 0), *pad),
          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    else:
      b, tp, h, w, _ = x.shape
      t = tp - (kt - 1)
      # Channel block i holds input time t+i-(kt-1) for output time t: a 3-D conv in time.
      stacked = jnp.concatenate([x[:, i:i + t] for i in range(kt)], axis=-1)
      k2 = kernel.transpose(1, 2, 0, 3, 4).reshape(3, 3, kt * cin, self.features)
      y = jax.lax.conv_general_dilated(
          stacked.reshape(b * t, h, w, kt * cin), k2, window_strides=(self.stride,) * 2,
          padding=pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(b, t, *y.shape[1:])
    return y + bias.astype(y.dtype)


class FrameGroupNorm(nn.Module):
  """GroupNorm with statistics per (batch, time step): x: [B, T, H, W, C] -> same shape.

  Normalising over time would leak the future into the past, hence reduction over
  (H, W, C) only.
  """
  groups: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.GroupNorm(num_groups=self.groups, reduction_axes=(-3, -2, -1),
                        dtype=x.dtype)(x)


class ResBlock(nn.Module):
  """Pre-norm residual block of two causal convs. x: [B, T, H, W, Cin] -> [B, T, H, W, features]."""
  features: int
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    h = CausalConv(self.features, c.kernel_t, c.conv_impl, dtype=dt)(
        nn.silu(FrameGroupNorm(c.norm_groups)(x)))
    # Zero-initialised second conv: each block starts as the identity (stable deep stacks).
    h = CausalConv(self.features, c.kernel_t, c.conv_impl, zero_init=True, dtype=dt)(
        nn.silu(FrameGroupNorm(c.norm_groups)(h)))
    if x.shape[-1] != self.features:
      x = nn.Dense(self.features, dtype=dt, name="skip")(x)
    return x + h


def _upsample2(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x in space: [B, T, H, W, C] -> [B, T, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)


class Encoder(nn.Module):
  """frames: f32[B, 1+tk, H, W, in_ch] in [-1, 1] -> (mean, logvar): f32[B, 1+k, h, w, C] each."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    x = group_frames(frames.astype(dt), c.temporal_factor, c.patch_size)
    x = CausalConv(c.widths[0], c.kernel_t, c.conv_impl, dtype=dt, name="conv_in")(x)
    for i, width in enumerate(c.widths):
      for _ in range(c.blocks_per_stage):
        x = ResBlock(width, c)(x)
      if i + 1 < len(c.widths):
        x = CausalConv(c.widths[i + 1], c.kernel_t, c.conv_impl, stride=2, dtype=dt,
                       name=f"down_{i}")(x)
    for _ in range(c.mid_blocks):
      x = ResBlock(c.widths[-1], c)(x)
    x = nn.silu(FrameGroupNorm(c.norm_groups)(x))
    x = CausalConv(2 * c.latent_channels, c.kernel_t, c.conv_impl, dtype=dt,
                   name="conv_out")(x).astype(jnp.float32)
    mean, logvar = jnp.split(x, 2, axis=-1)
    return mean, jnp.clip(logvar + c.logvar_init, c.logvar_min, c.logvar_max)


class Decoder(nn.Module):
  """latents: f32[B, 1+k, h, w, C] -> frames: f32[B, 1+tk, H, W, in_ch] (about [-1, 1])."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    c = self.cfg
    dt = jnp.dtype(c.dtype)
    x = CausalConv(c.widths[-1], c.kernel_t, c.conv_impl, dtype=dt, name="conv_in")(
        latents.astype(dt))
    for _ in range(c.mid_blocks):
      x = ResBlock(c.widths[-1], c)(x)
    for i in reversed(range(len(c.widths))):
      for _ in range(c.blocks_per_stage):
        x = ResBlock(c.widths[i], c)(x)
      if i > 0:
        x = CausalConv(c.widths[i - 1], c.kernel_t, c.conv_impl, dtype=dt,
                       name=f"up_{i}")(_upsample2(x))
    x = nn.silu(FrameGroupNorm(c.norm_groups)(x))
    out = c.temporal_factor * c.patch_size ** 2 * c.in_channels
    x = CausalConv(out, c.kernel_t, c.conv_impl, dtype=dt, name="conv_out")(x)
    return ungroup_frames(x.astype(jnp.float32), c.temporal_factor, c.patch_size,
                          c.in_channels)


class VideoVAE(nn.Module):
  """Encoder + reparameterised sample + decoder.

  `__call__(frames, rng, sample=True)`: frames f32[B, 1+tk, H, W, 3] in [-1, 1] ->
  (recon f32[B, 1+tk, H, W, 3], mean f32[B, 1+k, h, w, C], logvar same shape). With
  `sample=False` the decoder sees the mean (deterministic; `rng` may be None).
  """
  cfg: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)

  def encode(self, frames: jax.Array) -> tuple[jax.Array, jax.Array]:
    self.cfg.num_latents(frames.shape[1])  # fail early on a wrong frame count
    return self.encoder(frames)

  def decode(self, latents: jax.Array) -> jax.Array:
    return self.decoder(latents)

  def __call__(self, frames: jax.Array, rng: jax.Array | None = None,
               sample: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    mean, logvar = self.encode(frames)
    z = mean
    if sample:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


@functools.partial(jax.jit, static_argnames=("cfg", "num_frames"))
def init_params(cfg: VAEConfig, rng: jax.Array, num_frames: int = 5) -> Any:
  """Parameters of `VideoVAE(cfg)` (they do not depend on the clip length).

  Jitted: eager Flax init dispatches every op separately, which is slow on CPU. The ~40
  initialisers draw from an 'rbg' key derived from `rng` (any key type): XLA:CPU compiles
  threefry sampling about 7x slower (tens of seconds for this tree), rbg in seconds.
  """
  x = jnp.zeros((1, num_frames, cfg.frame_size, cfg.frame_size, cfg.in_channels))
  rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  return VideoVAE(cfg).init(rbg, x, None, sample=False)["params"]


# --------------------------------------------------------------------------- public API

@functools.partial(jax.jit, static_argnames="config")
def encode(params: Any, frames: jax.Array, config: VAEConfig) -> jax.Array:
  """Latent means. frames: f32[B, 1+4k, H, W, 3] in [-1, 1] -> f32[B, 1+k, h, w, C]."""
  return VideoVAE(config).apply({"params": params}, frames, method=VideoVAE.encode)[0]


@functools.partial(jax.jit, static_argnames="config")
def decode(params: Any, latents: jax.Array, config: VAEConfig) -> jax.Array:
  """Frames from latents. latents: f32[B, 1+k, h, w, C] -> f32[B, 1+4k, H, W, 3] (unclipped)."""
  return VideoVAE(config).apply({"params": params}, latents, method=VideoVAE.decode)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element: f32[...] -> f32[...]."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


@dataclasses.dataclass(frozen=True)
class LatentStats:
  """Per-channel statistics of latent means, for the flow model's unit-scale inputs.

  mean, std: f32[C] over every (clip, latent frame, h, w) position of a clip set.
  """
  mean: np.ndarray
  std: np.ndarray

  def to_json(self) -> dict:
    return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "LatentStats":
    return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


def latent_stats(latent_batches: Iterable[Any]) -> LatentStats:
  """Per-channel mean/std pooled over every position of the batches (each f32[..., C]),
  accumulated in float64. The std is floored so that a dead channel cannot blow up
  normalised latents."""
  total = total_sq = 0.0
  count = 0
  for z in latent_batches:
    z = np.asarray(z, np.float64)
    z = z.reshape(-1, z.shape[-1])
    total = total + z.sum(0)
    total_sq = total_sq + np.square(z).sum(0)
    count += z.shape[0]
  if not count:
    raise ValueError("latent statistics need at least one latent")
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 1e-12))
  return LatentStats(mean.astype(np.float32), np.maximum(std, 1e-4).astype(np.float32))


def normalize(latents: jax.Array, stats: LatentStats) -> jax.Array:
  """(z - mean) / std per channel. latents: f32[..., C] -> f32[..., C]."""
  return (latents - jnp.asarray(stats.mean)) / jnp.asarray(stats.std)


def denormalize(latents: jax.Array, stats: LatentStats) -> jax.Array:
  """Inverse of `normalize`: z * std + mean per channel. f32[..., C] -> f32[..., C]."""
  return latents * jnp.asarray(stats.std) + jnp.asarray(stats.mean)
