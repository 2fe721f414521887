"""The video tokenizer of a prepared data directory (`<data_dir>/vae`), whichever it is.

Data preparation writes one of two layouts, and everything that encodes or decodes latents
(the latent encode, sampling, evaluation) reads it through `load` here:

  own       our VAE trained on the toy world, or a copy of one (`video_tokenizer.save`):
            vae_config.json, params.msgpack, latent_stats.json
  cosmos,   a pretrained tokenizer converted from its published diffusers weights
  wan       (`pretrained.load_pretrained_tokenizer`) by `save_pretrained`:
            pretrained.json ({"kind", "config", "tile_latents", "source"}),
            params.msgpack, latent_stats.json

`identity` is what the latent encode records in latents/meta.json ("encoder_info") and
what sampling checks the loaded tokenizer against (`check_matches`): a run's latents are
decoded only by the tokenizer that encoded them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Union

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import workdirs
from tv2tv_jax.vae import convert, pretrained, video_tokenizer
from tv2tv_jax.vae.model import LatentStats
from tv2tv_jax.vae.pretrained import PretrainedTokenizer
from tv2tv_jax.vae.video_tokenizer import VideoTokenizer

OWN = "own"
# Every tokenizer a data directory can hold; `data.vae_kind` takes one of these.
KINDS = (OWN,) + pretrained.KINDS
PRETRAINED_FILE = "pretrained.json"
OWN_FILE = "vae_config.json"
PARAMS_FILE = "params.msgpack"
STATS_FILE = "latent_stats.json"

Tokenizer = Union[VideoTokenizer, PretrainedTokenizer]


class TokenizerMismatchError(ValueError):
  """Latents would be decoded by another tokenizer than the one that encoded them."""


def save_pretrained(out_dir: str | os.PathLike, tok: PretrainedTokenizer,
                    source: str = "") -> None:
  """Writes a converted pretrained tokenizer (with its stats, if set) into `out_dir`:
  pretrained.json, params.msgpack, latent_stats.json. `source`: where its weights came
  from (recorded, not read back)."""
  wd = workdirs.as_path(out_dir)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / PARAMS_FILE).write_bytes(flax.serialization.to_bytes(jax.device_get(tok.params)))
  if tok.stats is not None:
    (wd / STATS_FILE).write_text(json.dumps(tok.stats.to_json(), indent=2))
  doc = {"kind": tok.kind, "config": dataclasses.asdict(tok.config),
         "tile_latents": tok.tile_latents, "source": source}
  (wd / PRETRAINED_FILE).write_text(json.dumps(doc, indent=2))  # last: marks it complete


def kind_of(vae_dir: str | os.PathLike) -> str:
  """The kind of tokenizer `vae_dir` holds (one of KINDS); FileNotFoundError naming the
  files looked for when it holds none."""
  wd = workdirs.as_path(vae_dir)
  if (wd / PRETRAINED_FILE).exists():
    kind = json.loads((wd / PRETRAINED_FILE).read_text()).get("kind")
    if kind not in pretrained.KINDS:
      raise ValueError(f"{wd / PRETRAINED_FILE}: unknown tokenizer kind {kind!r}; one of "
                       f"{pretrained.KINDS}")
    return kind
  if (wd / OWN_FILE).exists():
    return OWN
  raise FileNotFoundError(f"{vae_dir} holds no video tokenizer (neither {OWN_FILE} nor "
                          f"{PRETRAINED_FILE})")


def load(vae_dir: str | os.PathLike) -> Tokenizer:
  """The tokenizer in `vae_dir` (either layout), with its latent statistics when saved.
  Both kinds have encode(frames, normalized) and decode(latents, normalized) with the
  shapes of `VideoTokenizer`, and a `params` field (so that
  `dataclasses.replace(tok, params=p).encode(...)` is a pure function of p)."""
  kind = kind_of(vae_dir)
  if kind == OWN:
    return video_tokenizer.load_tokenizer(vae_dir)
  wd = workdirs.as_path(vae_dir)
  doc = json.loads((wd / PRETRAINED_FILE).read_text())
  cfg = pretrained.config_type(kind).from_diffusers(doc["config"])
  target = jax.eval_shape(lambda: pretrained.init_params(kind, cfg))
  params = flax.serialization.from_bytes(target, (wd / PARAMS_FILE).read_bytes())
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(target),
                               jax.tree.leaves(params)):
    if want.shape != tuple(np.shape(got)):
      raise ValueError(f"{wd / PARAMS_FILE}: {jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(got)}, {PRETRAINED_FILE} gives {want.shape}")
  stats = None
  if (wd / STATS_FILE).exists():
    stats = LatentStats.from_json(json.loads((wd / STATS_FILE).read_text()))
  return PretrainedTokenizer(kind, cfg, jax.tree.map(jnp.asarray, params), stats,
                             doc.get("tile_latents"))


def identity(vae_dir: str | os.PathLike) -> dict[str, str]:
  """{"kind", "params_sha256"}: which tokenizer, down to its weights (16 hex digits of
  the sha256 of params.msgpack)."""
  wd = workdirs.as_path(vae_dir)
  digest = hashlib.sha256((wd / PARAMS_FILE).read_bytes()).hexdigest()[:16]
  return {"kind": kind_of(vae_dir), "params_sha256": digest}


def check_matches(vae_dir: str | os.PathLike, encoded_by: Mapping[str, Any],
                  where: str) -> None:
  """Raises TokenizerMismatchError unless the tokenizer in `vae_dir` is the one that
  encoded the latents whose meta.json "encoder_info" is `encoded_by` (`where` names that
  file in the message). Latents encoded before the kind was recorded count as 'own'."""
  have = identity(vae_dir)
  want = {"kind": encoded_by.get("kind", OWN), "params_sha256": encoded_by.get("params_sha256")}
  if have != want:
    raise TokenizerMismatchError(
        f"{where} was encoded by the {want['kind']} tokenizer with weights "
        f"{want['params_sha256']}, but {vae_dir} holds the {have['kind']} tokenizer with "
        f"weights {have['params_sha256']}: decoding with it would produce wrong video. "
        f"Restore the tokenizer the latents were encoded with, or prepare the data again "
        f"with this one (data.vae_kind, data.vae_dir)")


def published_stats(weights_dir: str | os.PathLike, class_name: str,
                    channels: int) -> LatentStats:
  """The per-channel `latents_mean` / `latents_std` a diffusers config.json publishes
  (Wan 2.1's, for instance). ValueError when absent or not `channels` long."""
  raw = convert.read_config(weights_dir, class_name)
  mean, std = raw.get("latents_mean"), raw.get("latents_std")
  if not (isinstance(mean, list) and isinstance(std, list)
          and len(mean) == len(std) == channels):
    raise ValueError(f"{convert.model_dir(weights_dir)}/config.json publishes no "
                     f"{channels}-channel latents_mean / latents_std (found "
                     f"{None if mean is None else len(mean)} / "
                     f"{None if std is None else len(std)} values)")
  return LatentStats(np.asarray(mean, np.float32), np.asarray(std, np.float32))
