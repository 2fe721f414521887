"""Pretrained video tokenizers behind the interface of our own VAE's `VideoTokenizer`.

    tok = load_pretrained_tokenizer("cosmos", "path/to/Cosmos-CV4x8x8-diffusers")
    z = tok.encode(frames)            # f32[B, 1+4k, H, W, 3] in [-1, 1] -> f32[B, 1+k, H/8, W/8, 16]
    x = tok.decode(z)                 # -> f32[B, 1+4k, H, W, 3], unclipped

Like `tv2tv_jax.vae.video_tokenizer.VideoTokenizer`, `encode(..., normalized=True)` returns latents
normalised per channel by `stats` (a `LatentStats`, computed on the data it will encode:
`compute_stats`), and `decode(..., normalized=True)` undoes it. Unlike our VAE, these
work at any frame size that the spatial ratio divides, so `latent_shape` takes it.

`KINDS` names the tokenizers here ('cosmos'); our own VAE ('own') stays in `vae/train.py`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from tv2tv_jax.vae import convert, cosmos
from tv2tv_jax.vae.model import LatentStats, denormalize, latent_stats, normalize

# kind -> (diffusers class name, config type, init_params, encode, decode)
_KINDS = {
    "cosmos": ("AutoencoderKLCosmos", cosmos.CosmosConfig, cosmos.init_params, cosmos.encode,
               cosmos.decode),
}
KINDS = tuple(_KINDS)


@dataclasses.dataclass(frozen=True)
class PretrainedTokenizer:
  """A converted pretrained tokenizer: kind, config, params, optional latent statistics.

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

  def encode(self, frames: Any, normalized: bool = False) -> jax.Array:
    """f32[B, 1+tk, H, W, 3] in [-1, 1] -> f32[B, 1+k, H/s, W/s, C] (normalised if asked)."""
    fn = _KINDS[self.kind][3]
    z = fn(self.params, jnp.asarray(frames, jnp.float32), self.config, self.tile_latents)
    return normalize(z, self._stats()) if normalized else z

  def decode(self, latents: Any, normalized: bool = False) -> jax.Array:
    """f32[B, 1+k, h, w, C] (normalised if `normalized`) -> f32[B, 1+tk, h s, w s, 3]."""
    z = jnp.asarray(latents, jnp.float32)
    z = denormalize(z, self._stats()) if normalized else z
    return _KINDS[self.kind][4](self.params, z, self.config, self.tile_latents)

  def _stats(self) -> LatentStats:
    if self.stats is None:
      raise ValueError(f"this {self.kind} tokenizer has no latent statistics; compute them "
                       f"with pretrained.compute_stats")
    return self.stats


def load_pretrained_tokenizer(kind: str, path: str | os.PathLike, *,
                              stats: LatentStats | None = None, tile_latents: int | None = None,
                              **overrides) -> PretrainedTokenizer:
  """Converts the diffusers model directory `path` (config.json + safetensors, or a
  pipeline directory with `vae/`) into a tokenizer of `kind` (one of KINDS).

  overrides: fields of the config that are not in config.json (e.g. dtype='bfloat16').
  Raises the `convert` errors (naming the tensor), ConfigError for a bad config field.
  """
  if kind not in _KINDS:
    raise ValueError(f"unknown pretrained tokenizer {kind!r}; one of {KINDS}")
  class_name, config_type, init_params = _KINDS[kind][:3]
  cfg, params = convert.load_pretrained(path, class_name, config_type.from_diffusers,
                                        init_params, **overrides)
  params = jax.tree.map(jnp.asarray, params)
  return PretrainedTokenizer(kind, cfg, params, stats, tile_latents)


def compute_stats(tok: PretrainedTokenizer, clips: Iterable[Any]) -> LatentStats:
  """Per-channel mean/std of the latents of `clips` (each f32[B, 1+tk, H, W, 3] in [-1, 1]),
  pooled over every clip, frame and position (`model.latent_stats`)."""
  return latent_stats(tok.encode(frames) for frames in clips)
