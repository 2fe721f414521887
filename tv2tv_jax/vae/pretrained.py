"""Pretrained video tokenizers behind the interface of our own VAE's `VideoTokenizer`.

    tok = load_pretrained_tokenizer("cosmos", "path/to/Cosmos-CV4x8x8-diffusers")
    z = tok.encode(frames)            # f32[B, 1+4k, H, W, 3] in [-1, 1] -> f32[B, 1+k, H/8, W/8, 16]
    x = tok.decode(z)                 # -> f32[B, 1+4k, H, W, 3], unclipped

Like `tv2tv_jax.vae.video_tokenizer.VideoTokenizer`, `encode(..., normalized=True)` returns latents
normalised per channel by `stats` (a `LatentStats`, computed on the data it will encode:
`compute_stats`), and `decode(..., normalized=True)` undoes it. Unlike our VAE, these
work at any frame size that the spatial ratio divides, so `latent_shape` takes it.

`KINDS` names the tokenizers here ('cosmos'; 'wan', Wan 2.1's VAE, whose decode clamps to
[-1, 1]); our own VAE ('own') stays in `vae/train.py`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from tv2tv_jax.vae import convert, cosmos, wan
from tv2tv_jax.vae.model import LatentStats, latent_stats
from tv2tv_jax.vae.video_tokenizer import LatentCodec

# kind -> (diffusers class name, config type, init_params, encode, decode)
_KINDS = {
    "cosmos": ("AutoencoderKLCosmos", cosmos.CosmosConfig, cosmos.init_params, cosmos.encode,
               cosmos.decode),
    "wan": ("AutoencoderKLWan", wan.WanConfig, wan.init_params, wan.encode, wan.decode),
}
KINDS = tuple(_KINDS)


@dataclasses.dataclass(frozen=True)
class PretrainedTokenizer(LatentCodec):
  """A converted pretrained tokenizer: kind, config, params, optional latent statistics;
  `encode` / `decode` (normalised or not) as `video_tokenizer.LatentCodec`.

  tile_latents: encode and decode in temporal tiles of this many latent frames (exactly
  the untiled result; bounds activation memory on long clips), or None for whole clips.
  """
  kind: str
  config: Any
  params: Any
  stats: LatentStats | None = None
  tile_latents: int | None = None

  @property
  def temporal_factor(self) -> int:
    return self.config.temporal_compression_ratio

  @property
  def spatial_factor(self) -> int:
    return self.config.spatial_compression_ratio

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(1 + k, h, w, C) of one clip of 1 + tk frames of height x width."""
    s = self.spatial_factor
    if height % s or width % s:
      raise ValueError(f"frame size {height}x{width} is not a multiple of {s}")
    return (self.config.num_latents(num_frames), height // s, width // s, self.latent_channels)

  def _encode(self, frames: jax.Array) -> jax.Array:
    """f32[B, 1+tk, H, W, 3] in [-1, 1] -> f32[B, 1+k, H/s, W/s, C]."""
    return _KINDS[self.kind][3](self.params, frames, self.config, self.tile_latents)

  def _decode(self, latents: jax.Array) -> jax.Array:
    """f32[B, 1+k, h, w, C] -> f32[B, 1+tk, h s, w s, 3]."""
    return _KINDS[self.kind][4](self.params, latents, self.config, self.tile_latents)


def load_pretrained_tokenizer(kind: str, path: str | os.PathLike, *,
                              stats: LatentStats | None = None, tile_latents: int | None = None,
                              **overrides) -> PretrainedTokenizer:
  """Converts the diffusers model directory `path` (config.json + safetensors, or a
  pipeline directory with `vae/`) into a tokenizer of `kind` (one of KINDS).

  overrides: fields of the config that are not in config.json (e.g. dtype='bfloat16').
  Raises the `convert` errors (naming the tensor), ConfigError for a bad config field.
  """
  name, cfg_type, init = _entry(kind)[:3]
  cfg, params = convert.load_pretrained(path, name, cfg_type.from_diffusers, init, **overrides)
  params = jax.tree.map(jnp.asarray, params)
  return PretrainedTokenizer(kind, cfg, params, stats, tile_latents)


def compute_stats(tok: PretrainedTokenizer, clips: Iterable[Any]) -> LatentStats:
  """Per-channel mean/std of the latents of `clips` (each f32[B, 1+tk, H, W, 3] in [-1, 1]),
  pooled over every clip, frame and position (`model.latent_stats`)."""
  return latent_stats(tok.encode(frames) for frames in clips)


def class_name(kind: str) -> str:
  """The diffusers class whose weights `kind` converts (e.g. 'AutoencoderKLCosmos')."""
  return _entry(kind)[0]


def config_type(kind: str) -> type:
  """The frozen config dataclass of `kind` (with `from_diffusers`)."""
  return _entry(kind)[1]


def init_params(kind: str, cfg: Any, rng: jax.Array | None = None) -> Any:
  """Freshly initialised params of a `kind` tokenizer with config `cfg` (the tree its
  converted weights fill)."""
  return _entry(kind)[2](cfg, jax.random.key(0) if rng is None else rng)


def _entry(kind: str) -> tuple:
  if kind not in _KINDS:
    raise ValueError(f"unknown pretrained tokenizer {kind!r}; one of {KINDS}")
  return _KINDS[kind]
