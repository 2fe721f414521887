"""A small toy-world latent dataset for the pipeline tests, built without training a VAE.

The "encoder" is a fixed NumPy function of the frames (8x8 average pooling of frame 0 and
of each chunk's last frame, plus their grey level as a 4th channel), so every stored
latent can be recomputed from `toy_world_tfds.generate_example` and compared exactly.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines import grain_pipeline, latent_dataset, tokenizer as tokenizer_lib
from data_pipelines import toy_world_tfds
from experiments import toy_world as toy_world_exp
from tv2tv_jax import config as config_lib

NUM_TRAIN, NUM_VAL, NUM_CHUNKS = 24, 4, 2
PROMPT = "toy world"


def builder_config() -> toy_world_tfds.ToyWorldBuilderConfig:
  return toy_world_tfds.ToyWorldBuilderConfig(
      name="pipeline_test", description="pipeline tests", num_train=NUM_TRAIN,
      num_validation=NUM_VAL, num_chunks=NUM_CHUNKS, caption_mode="dense")


def pool_encode(frames: np.ndarray) -> np.ndarray:
  """f32[B, 1+4k, 64, 64, 3] -> f32[B, 1+k, 8, 8, 4] (deterministic, exact in float32)."""
  frames = np.asarray(frames, np.float32)
  key = frames[:, ::4]  # frame 0 and the last frame of every chunk
  b, t = key.shape[:2]
  pooled = key.reshape(b, t, 8, 8, 8, 8, 3).mean(axis=(3, 5))
  return np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1).astype(np.float32)


def experiment_config(layout: str = "tv2tv"):
  c = toy_world_exp.get_config("tiny")
  c.model.update(latent_shape=(8, 8, 4))
  c.seq.update(text_len=48, max_chunks=6, layout=layout)
  return c


def experiment(layout: str = "tv2tv"):
  return config_lib.experiment_from_config_dict(experiment_config(layout))


def build(root: str) -> grain_pipeline.PipelineConfig:
  """TFDS dataset -> latent dataset (pool encoder) -> tokenizer, under `root`."""
  tfds_dir, latent_dir = os.path.join(root, "tfds"), os.path.join(root, "latents")
  builder = toy_world_tfds.ToyWorld(config=builder_config(), data_dir=tfds_dir)
  builder.download_and_prepare()
  enc = latent_dataset.LatentEncoder(pool_encode, {"mean": [0.0] * 4, "std": [1.0] * 4},
                                     "pool")
  latent_dataset.build_latent_dataset(tfds_dir, builder_config(), enc, latent_dir,
                                      log=lambda s: None)
  tok = tokenizer_lib.train_bpe(tokenizer_lib.toy_world_corpus(num_clips=4) + [PROMPT], 96,
                                byte_level=False)
  tok_path = os.path.join(root, "tokenizer.json")
  tok.save(tok_path)
  return grain_pipeline.PipelineConfig(latent_dir=latent_dir, tokenizer_path=tok_path,
                                       prompt=PROMPT, shuffle_seed=0)
