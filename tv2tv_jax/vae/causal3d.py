"""Pieces shared by the pretrained causal video tokenizers (`cosmos.py`, `wan.py`): the causal
3-D convolution with carried state, a per-frame GroupNorm, attention within a frame, the
temporal tiling driver, the whole-clip / tiled encode and decode, and the config mixin that
reads a diffusers config.json.

Layout: activations are `f32[B, T, H, W, C]` (channels last); convolution kernels are stored
as `f32[kt, kh, kw, Cin, Cout]`, the PyTorch `[Cout, Cin, kt, kh, kw]` transposed, so that a
converter maps every kernel with one rule (`convert.py`).

Streaming (temporal tiles). A causal layer's output at time t reads only inputs at times
<= t, so a long clip can be processed tile by tile if every layer that looks back in time
keeps what it needs from the previous tile. Those layers keep it in the Flax variable
collection `'cache'`:

  * when `'cache'` is not mutable (`apply(..., mutable=False)`), a layer sees the whole clip
    and pads its past as the reference does (copies of the first frame for Cosmos, zeros
    for Wan);
  * when `'cache'` is mutable, a layer that finds no cache entry pads the same way (the
    first tile) and stores the tail of its padded input that the next output window
    starts with; a layer that finds one prepends it instead of the padding.

So `apply(tile_0, mutable=['cache'])`, then `apply(tile_1, cache=...)`, ... computes the
same function as one call on the concatenated clip, provided the tiles cut the clip where
every strided layer's windows align (`run_tiles` cuts at latent-frame boundaries).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax.config import ConfigError

CACHE = "cache"
Pad2 = tuple[tuple[int, int], tuple[int, int]]


def streaming(module: nn.Module) -> bool:
  """True while the module runs one tile of a stream (the 'cache' collection is mutable;
  `init` makes every collection mutable, but initialisation is never a stream)."""
  return module.is_mutable_collection(CACHE) and not module.is_initializing()


def first_tile(module: nn.Module, name: str = "started") -> bool:
  """Whether this call sees the start of the clip (always, outside a stream).

  Marks the module as started in the stream's cache: the marker is an empty array, so it
  costs nothing and keeps the cache a plain array pytree for `lax.scan`.
  """
  if not streaming(module):
    return True
  first = not module.has_variable(CACHE, name)
  module.variable(CACHE, name, lambda: jnp.zeros((0,), jnp.float32))
  return first


def causal_past(module: nn.Module, x: jax.Array, pad: int, kernel_t: int, stride: int,
                name: str = "past", zeros: bool = False) -> jax.Array:
  """x with its past prepended along time: `pad` copies of x[:, 0] (or `pad` zero frames)
  at the clip's start, else the frames the previous tile left in the cache.

  x: [B, T, ...] -> [B, P + T, ...] (T may be 0 when `zeros`). In a stream, stores the tail
  of the result from the first frame that the next window (of `kernel_t` frames, `stride`
  apart) starts on.
  """
  def start():
    if zeros:
      return jnp.zeros((x.shape[0], pad, *x.shape[2:]), x.dtype)
    return jnp.repeat(x[:, :1], pad, axis=1)
  if not streaming(module):
    return jnp.concatenate([start(), x], axis=1) if pad else x
  past = module.variable(CACHE, name, start)
  padded = jnp.concatenate([past.value.astype(x.dtype), x], axis=1)
  n_out = max((padded.shape[1] - kernel_t) // stride + 1, 0)
  past.value = padded[:, n_out * stride:]
  return padded


def _as_pad2(pad: int | Pad2) -> Pad2:
  return ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad


class CausalConv3d(nn.Module):
  """A convolution that reads the present and the past only.

  x: f32[B, T, H, W, Cin] -> f32[B, T', H', W', features], T' = max((T + P - kt) // st + 1, 0)
  with P = `time_pad` (default kt - st) frames of past: copies of the first frame, or zeros
  if `zero_past`. Space: zero padding `spatial_pad` (an int for every side, or ((top,
  bottom), (left, right))), stride `stride[1:]`. T' may be 0 (Wan's first frame skips its
  temporal resamplers, whose convs still run so that params and cache exist).

  The kernel `f32[kt, kh, kw, Cin, Cout]` runs as one 2-D convolution over B*T' images
  with the kt time-shifted inputs stacked on channels (1x1 in space: one matmul), which
  XLA:CPU runs faster than a 3-D convolution (docs/vae.md, "Measured").
  """
  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  stride: tuple[int, int, int] = (1, 1, 1)
  spatial_pad: int | Pad2 = 0
  time_pad: int | None = None
  zero_past: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kt, kh, kw = self.kernel
    st, sh, sw = self.stride
    cin = x.shape[-1]
    w = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, cin, self.features),
                   jnp.float32).astype(self.dtype)
    b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x = x.astype(self.dtype)
    pad_t = kt - st if self.time_pad is None else self.time_pad
    if kt > 1 or pad_t:
      x = causal_past(self, x, pad_t, kt, st, zeros=self.zero_past)
    (pt, pb), (pl, pr) = _as_pad2(self.spatial_pad)
    if pt or pb or pl or pr:
      x = jnp.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr), (0, 0)))
    n_out = max((x.shape[1] - kt) // st + 1, 0)
    # Channel block i holds input time st*t + i for output time t.
    x = jnp.concatenate([x[:, i:][:, :st * n_out:st] for i in range(kt)], axis=-1)
    w = w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * cin, self.features)
    bsz, t, h, wd, c = x.shape
    if (kh, kw, sh, sw) == (1, 1, 1, 1):
      y = jnp.einsum("bthwc,cd->bthwd", x, w[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x.reshape(bsz * t, h, wd, c), w, window_strides=(sh, sw), padding="VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      y = y.reshape(bsz, t, *y.shape[1:])
    return y + b.astype(y.dtype)


class FrameGroupNorm(nn.Module):
  """GroupNorm whose statistics never cross time: per (batch, frame, group) over (H, W,
  channels of the group), in float32. x: [B, T, H, W, C] -> same shape and dtype.

  Params `scale`, `bias`: f32[C] (PyTorch GroupNorm's weight and bias).
  """
  groups: int = 1
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
    mean = xf.mean(axis=(2, 3, 5), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(2, 3, 5), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale + bias).astype(x.dtype)


def frame_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Single-head softmax attention among the H*W pixels of each frame (scale 1/sqrt(C);
  logits and softmax in float32). q, k, v: [B, T, H, W, C] -> [B, T, H, W, C], v's dtype."""
  b, t, h, w, c = q.shape
  q, k, v = (a.reshape(b, t, h * w, c) for a in (q, k, v))
  logits = jnp.einsum("btqc,btkc->btqk", q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * (1.0 / math.sqrt(c)), axis=-1).astype(v.dtype)
  return jnp.einsum("btqk,btkc->btqc", probs, v).reshape(b, t, h, w, c)


# --------------------------------------------------------------------------- tiling

TileFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def tile_lengths(total: int, first: int, rest: int) -> list[int]:
  """Lengths of the tiles that cut `total` steps: `first`, then `rest` each, the last one
  possibly shorter. E.g. tile_lengths(10, 4, 3) == [4, 3, 3]."""
  if total <= first:
    return [total]
  n, r = divmod(total - first, rest)
  return [first] + [rest] * n + ([r] if r else [])


def run_tiles(fn: TileFn, x: jax.Array, lengths: Sequence[int]) -> jax.Array:
  """Runs `fn(tile, cache) -> (out, cache)` over consecutive time tiles of x and
  concatenates the outputs along time.

  x: [B, T, ...] with T = sum(lengths); `cache` is None for the first tile. The first and
  the last tile run on their own (they may differ in length, and the first one creates the
  cache); the equal tiles between them run under one `lax.scan`, so a long clip compiles
  to three tile programs however many tiles it has.
  """
  starts = [sum(lengths[:i]) for i in range(len(lengths))]
  out0, cache = fn(x[:, :lengths[0]], None)
  outs = [out0]
  mid = [i for i in range(1, len(lengths)) if lengths[i] == lengths[1]]
  if mid:
    n, size = len(mid), lengths[1]
    body = x[:, starts[1]:starts[1] + n * size]
    body = body.reshape(x.shape[0], n, size, *x.shape[2:]).swapaxes(0, 1)

    def step(carry, tile):
      out, carry = fn(tile, carry)
      return carry, out

    cache, ys = jax.lax.scan(step, cache, body)
    ys = ys.swapaxes(0, 1)
    outs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
  if len(lengths) > 1 + len(mid):
    out, cache = fn(x[:, starts[-1]:], cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


# --------------------------------------------------------------------------- whole clips

def init_params(model: nn.Module, in_channels: int, spatial: int, rng: jax.Array) -> Any:
  """Random params of a tokenizer `model` (they depend on neither the frame size nor the
  clip length, so one frame of spatial x spatial pixels initialises them). Drawn from an
  'rbg' key derived from `rng`: XLA:CPU compiles threefry sampling for a tree this size
  far more slowly (see `model.init_params`). Call it under `jax.jit`."""
  x = jnp.zeros((1, 1, spatial, spatial, in_channels))
  rbg = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  return model.init(rbg, x)["params"]


def num_latents(num_frames: int, temporal: int) -> int:
  """1 + k for 1 + temporal * k frames; ValueError otherwise."""
  k, rem = divmod(num_frames - 1, temporal)
  if num_frames < 1 or rem:
    raise ValueError(f"{num_frames} frames is not 1 + {temporal}k")
  return 1 + k


def check_frames(shape: tuple[int, ...], temporal: int, spatial: int) -> None:
  """ValueError unless frames of `shape` [B, T, H, W, C] have T = 1 + temporal * k and H, W
  multiples of `spatial`."""
  num_latents(shape[1], temporal)
  if shape[2] % spatial or shape[3] % spatial:
    raise ValueError(f"frame size {shape[2]}x{shape[3]} is not a multiple of the spatial "
                     f"compression ratio {spatial}")


def _apply(model: nn.Module, params: Any, x: jax.Array, method: str,
           tile_latents: int | None, first_len: int, rest_len: int) -> jax.Array:
  """`model.<method>(x)` on the whole clip, or streamed in tiles of `first_len`, then
  `rest_len` time steps (`run_tiles`) when `tile_latents` is set."""
  if tile_latents is None:
    return model.apply({"params": params}, x, method=method)
  if tile_latents < 1:
    raise ValueError(f"tile_latents must be >= 1, got {tile_latents}")

  def tile(chunk, cache):
    variables = {"params": params} if cache is None else {"params": params, CACHE: cache}
    out, state = model.apply(variables, chunk, method=method, mutable=[CACHE])
    return out, state[CACHE]

  return run_tiles(tile, x, tile_lengths(x.shape[1], first_len, rest_len))


def encode_clip(model: nn.Module, params: Any, frames: jax.Array, temporal: int,
                tile_latents: int | None = None) -> jax.Array:
  """`model.encode` of a clip: f32[B, 1 + tk, H, W, C] -> latents f32[B, 1 + k, ...]
  (t = `temporal`), whole, or in tiles of `tile_latents` = m latent frames: 1 + t(m-1)
  frames, then t m frames each (the tiles every causal layer's windows align with)."""
  m = tile_latents or 1
  return _apply(model, params, frames, "encode", tile_latents, 1 + temporal * (m - 1),
                temporal * m)


def decode_clip(model: nn.Module, params: Any, latents: jax.Array,
                tile_latents: int | None = None) -> jax.Array:
  """`model.decode` of latents f32[B, 1 + k, ...] -> frames f32[B, 1 + tk, ...], whole or
  in tiles of `tile_latents` latent frames."""
  m = tile_latents or 1
  return _apply(model, params, latents, "decode", tile_latents, m, m)


# --------------------------------------------------------------------------- configs

class DiffusersConfig:
  """Mixin of the frozen config dataclasses of the pretrained tokenizers: `num_latents`,
  `from_diffusers` (a diffusers config.json dict -> config), and ConfigError naming
  `<prefix>.<field>`. A subclass sets `prefix`, `class_name` and `ignored_keys` (config.json
  keys that describe weights or pipelines, not the network), and has the properties
  `temporal_compression_ratio` and `spatial_compression_ratio` (fields or derived)."""
  prefix: ClassVar[str] = ""
  class_name: ClassVar[str] = ""
  ignored_keys: ClassVar[tuple[str, ...]] = ()
  DTYPES: ClassVar[tuple[str, ...]] = ("float32", "bfloat16")

  def require(self, cond: bool, name: str, message: str) -> None:
    """ConfigError naming `<prefix>.<name>` unless `cond`."""
    if not cond:
      raise ConfigError(f"{self.prefix}.{name}", message)

  def check_dtype(self) -> None:
    dtype = getattr(self, "dtype")
    self.require(dtype in self.DTYPES, "dtype", f"float32 or bfloat16, got {dtype!r}")

  def num_latents(self, num_frames: int) -> int:
    """1 + k for 1 + temporal_compression_ratio * k frames; ValueError otherwise."""
    return num_latents(num_frames, getattr(self, "temporal_compression_ratio"))

  @classmethod
  def from_diffusers(cls, values: Mapping[str, Any], **overrides):
    """From a diffusers config.json dict (keys starting with '_', and `ignored_keys`, are
    ignored; lists become tuples); any other unknown key raises ConfigError naming it.
    `overrides`: fields config.json does not hold (e.g. dtype='bfloat16')."""
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {}
    for key, value in dict(values).items():
      if key.startswith("_") or key in cls.ignored_keys:
        continue
      if key not in names:
        raise ConfigError(f"{cls.prefix}.{key}", f"unknown {cls.class_name} field; known: "
                          f"{sorted(names - {'dtype'})}")
      kept[key] = tuple(value) if isinstance(value, list) else value
    return cls(**{**kept, **overrides})
