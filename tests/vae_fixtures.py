"""Random pretrained-tokenizer weights in diffusers' layout, for tests: nothing is downloaded.

`write_random(path, kind, cfg)` writes what `pretrained.load_pretrained_tokenizer(kind, path)`
reads (config.json and diffusion_pytorch_model.safetensors) with random weights.
"""

import dataclasses
import json

import jax
from safetensors.numpy import save_file

from tv2tv_jax.vae import convert, cosmos, pretrained

# Cosmos CV4x8x8 at small widths: 8x8 in space, 4x in time, 16 latent channels.
COSMOS_SMALL = cosmos.CosmosConfig(
    temporal_compression_ratio=4, encoder_block_out_channels=(8, 16, 16, 16),
    decode_block_out_channels=(8, 16, 16, 16), num_layers=1)


def write_random(path, kind, cfg, seed=0, **config_json):
  """A diffusers model directory at `path` (created) holding random `kind` weights of
  config `cfg`; `config_json`: extra config.json keys (e.g. latents_mean). Returns path."""
  params = pretrained.init_params(kind, cfg, jax.random.key(seed))
  path.mkdir(parents=True, exist_ok=True)
  fields = {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}
  doc = {"_class_name": pretrained.class_name(kind), "_diffusers_version": "0.42.1", **fields,
         **config_json}
  (path / "config.json").write_text(json.dumps(doc, indent=2))
  save_file(convert.to_state_dict(params), str(path / convert.WEIGHTS_NAME))
  return path
