"""A trained video VAE ready to use: encode frames to (normalised) latents and back.

The inference side of `tv2tv_jax.vae`: what data preparation, sampling and evaluation need
from a trained VAE, apart from how it was trained (`vae.train`).

- `VideoTokenizer`: config, params and latent statistics; `encode` / `decode`.
- `save` / `load_tokenizer`: the directory layout (vae_config.json, params.msgpack,
  latent_stats.json), local or gs://.
- `to_float` / `to_uint8`: uint8 frames <-> the VAE's f32 pixels in [-1, 1].
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import workdirs
from tv2tv_jax.vae import model as vae_model
from tv2tv_jax.vae.model import LatentStats, VAEConfig


def to_float(frames: np.ndarray) -> np.ndarray:
  """uint8[..., 3] in [0, 255] -> f32[..., 3] in [-1, 1]."""
  return frames.astype(np.float32) / 127.5 - 1.0


def to_uint8(frames: Any) -> np.ndarray:
  """f32[..., 3] (about [-1, 1]) -> uint8[..., 3], clipped and rounded."""
  return np.clip(np.round((np.asarray(frames) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruct(params: Any, frames: Any, vae_cfg: VAEConfig) -> jax.Array:
  """decode(encode(frames)) with latent means: f32[B, 1+4k, H, W, 3] -> same shape."""
  return vae_model.decode(params, vae_model.encode(params, frames, vae_cfg), vae_cfg)


def save(workdir: str | os.PathLike, vae_cfg: VAEConfig, params: Any,
         stats: LatentStats | None = None) -> None:
  """Writes vae_config.json, params.msgpack and (if given) latent_stats.json into workdir
  (local or gs://)."""
  wd = workdirs.as_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "vae_config.json").write_text(json.dumps(dataclasses.asdict(vae_cfg), indent=2))
  (wd / "params.msgpack").write_bytes(flax.serialization.to_bytes(jax.device_get(params)))
  if stats is not None:
    (wd / "latent_stats.json").write_text(json.dumps(stats.to_json(), indent=2))


class LatentCodec(abc.ABC):
  """encode / decode with the optional per-channel normalisation, for every tokenizer kind
  (`VideoTokenizer` here, `pretrained.PretrainedTokenizer`): a subclass has `params`,
  `stats` (a LatentStats or None) and the raw maps `_encode` / `_decode`.

  encode(frames f32[B, 1+tk, H, W, 3] in [-1, 1]) -> latents f32[B, 1+k, h, w, C],
  normalised per channel when `normalized` (needs stats); decode is the inverse direction.
  """
  stats: LatentStats | None

  def encode(self, frames: Any, normalized: bool = False) -> jax.Array:
    z = self._encode(jnp.asarray(frames, jnp.float32))
    return vae_model.normalize(z, self._stats()) if normalized else z

  def decode(self, latents: Any, normalized: bool = False) -> jax.Array:
    z = jnp.asarray(latents, jnp.float32)
    return self._decode(vae_model.denormalize(z, self._stats()) if normalized else z)

  @abc.abstractmethod
  def _encode(self, frames: jax.Array) -> jax.Array:
    """f32[B, 1+tk, H, W, 3] in [-1, 1] -> raw latents f32[B, 1+k, h, w, C]."""

  @abc.abstractmethod
  def _decode(self, latents: jax.Array) -> jax.Array:
    """Raw latents f32[B, 1+k, h, w, C] -> frames f32[B, 1+tk, H, W, 3]."""

  def _stats(self) -> LatentStats:
    if self.stats is None:
      raise ValueError(f"this {type(self).__name__} has no latent statistics "
                       f"(latent_stats.json; pretrained.compute_stats computes them)")
    return self.stats


@dataclasses.dataclass(frozen=True)
class VideoTokenizer(LatentCodec):
  """A trained VAE: config, params and (optional) latent statistics, ready to use.

  encode(frames f32[B, 1+4k, H, W, 3] in [-1, 1]) -> latent means f32[B, 1+k, h, w, C],
  normalised per channel when `normalized` (needs stats); decode is the inverse direction.
  """
  config: VAEConfig
  params: Any
  stats: LatentStats | None = None

  @property
  def temporal_factor(self) -> int:
    """Frames per latent frame after the first (as `PretrainedTokenizer`'s)."""
    return self.config.temporal_factor

  @property
  def spatial_factor(self) -> int:
    """Pixels per latent position along each side (as `PretrainedTokenizer`'s)."""
    return self.config.spatial_factor

  @property
  def latent_channels(self) -> int:
    return self.config.latent_channels

  def _encode(self, frames: jax.Array) -> jax.Array:
    return vae_model.encode(self.params, frames, self.config)

  def _decode(self, latents: jax.Array) -> jax.Array:
    return vae_model.decode(self.params, latents, self.config)


def load_tokenizer(workdir: str | os.PathLike) -> VideoTokenizer:
  """Rebuilds the VAEConfig and restores params (and stats, if saved) written by `save`
  into `workdir` (local or gs://)."""
  wd = workdirs.as_path(workdir)
  vae_cfg = vae_model.vae_config_from_dict(json.loads((wd / "vae_config.json").read_text()))
  # Restoring into the abstract init tree checks every name and shape of the file.
  target = jax.eval_shape(lambda: vae_model.init_params(vae_cfg, jax.random.key(0)))
  params = flax.serialization.from_bytes(target, (wd / "params.msgpack").read_bytes())
  for want, got in zip(jax.tree.leaves(target), jax.tree.leaves(params)):
    if want.shape != got.shape:
      raise ValueError(f"params.msgpack does not match vae_config.json: {got.shape} vs "
                       f"{want.shape}")
  params = jax.tree.map(jnp.asarray, params)
  stats = None
  path = wd / "latent_stats.json"
  if path.exists():
    stats = LatentStats.from_json(json.loads(path.read_text()))
  return VideoTokenizer(vae_cfg, params, stats)
