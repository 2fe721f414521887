"""TFDS builder for the toy world (docs/design.md, section 5), written as ArrayRecord, read without TF.

Build (from the repo root; see docs/data.md)::

    python -m data_pipelines.toy_world_tfds --config=small --data_dir=$HOME/tensorflow_datasets

Read back (no TensorFlow; plugs straight into Grain)::

    import tensorflow_datasets as tfds
    import data_pipelines.toy_world_tfds  # registers the builder 'toy_world'
    src = tfds.data_source("toy_world/small", split="train", data_dir=...)
    ex = src[0]   # dict of numpy arrays; Text features come back as bytes

One example = one clip (`toy_world.generate_clip`), with k = config.num_chunks:
  name           Text            "train/seed_000000123"
  seed           int64           the clip's seed
  frames         uint8[1+4k, 64, 64, 3]   RGB, 16 fps; frame 0 is the given first frame
  texts          Text[k]         the training text per chunk: the action text ("left fire")
                                 in `dense` mode, the sparse caption ("" or "moved left twice
                                 then fired") in `sports` mode, placed before the chunks it
                                 describes (`caption_placement` "plan") or after them ("report")
  action_texts   Text[k]         the ground-truth action text per chunk (both modes)
  movement       int32[k]        index into toy_world.MOVES
  fire           bool[k]
  caption_wrong  bool[k]         texts[i] is a hallucinated caption (always False in dense)

Splits: train uses seeds base_seed + [0, num_train), validation uses
base_seed + VALIDATION_SEED_OFFSET + [0, num_validation); the ranges never overlap
(`split_seeds` checks it). Captions of a clip use the clip's seed. Everything is
deterministic: the same config gives bit-identical examples, and examples are stored in
seed order (shuffling is left to Grain).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import toy_world
from data_pipelines.tfds_common import ArrayRecordBuilder

VALIDATION_SEED_OFFSET = 1_000_000_000
CAPTION_MODES = ("dense", "sports")


@dataclasses.dataclass(eq=False)
class ToyWorldBuilderConfig(tfds.core.BuilderConfig):
  """Size and caption mode of a toy-world dataset.

  Attributes:
    num_train / num_validation: clips per split.
    num_chunks: k, chunks per clip (1 + 4k frames).
    caption_mode: "dense" (per-chunk action text) or "sports" (a caption every
      `caption_every` chunks, wrong with probability `wrong_rate`).
    caption_placement: sports mode only: "plan" (the caption before chunk i describes
      chunks i .. i+k-1) or "report" (it describes chunks i-k+1 .. i); see
      `toy_world.caption_spans`. Dense data ignores it.
    base_seed: first train seed.
  """
  num_train: int = 64
  num_validation: int = 8
  num_chunks: int = 16
  caption_mode: str = "dense"
  caption_every: int = 4
  wrong_rate: float = 0.1
  caption_placement: str = "plan"
  base_seed: int = 0

  def __post_init__(self):
    if self.caption_mode not in CAPTION_MODES:
      raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {self.caption_mode!r}")
    if self.num_chunks < 1 or self.num_train < 0 or self.num_validation < 0:
      raise ValueError("num_chunks must be >= 1 and split sizes >= 0")
    if not 1 <= self.caption_every <= toy_world.MAX_CAPTION_EVERY:
      raise ValueError(f"caption_every must be in 1..{toy_world.MAX_CAPTION_EVERY}")
    if self.caption_placement not in toy_world.CAPTION_PLACEMENTS:
      raise ValueError(f"caption_placement must be one of {toy_world.CAPTION_PLACEMENTS}, "
                       f"got {self.caption_placement!r}")
    if not 0.0 <= self.wrong_rate <= 1.0:
      raise ValueError(f"wrong_rate must be a probability, got {self.wrong_rate}")
    if max(self.num_train, self.num_validation) > VALIDATION_SEED_OFFSET:
      raise ValueError("a split larger than VALIDATION_SEED_OFFSET would overlap seeds")


def _configs() -> list[ToyWorldBuilderConfig]:
  sizes = {  # name: (num_train, num_validation, num_chunks)
      "tiny": (8, 4, 4),
      "small": (512, 64, 8),
      "default": (8192, 512, 16),
  }
  out = []
  for size, (n_train, n_val, k) in sizes.items():
    out.append(ToyWorldBuilderConfig(
        name=size, description=f"{n_train}/{n_val} clips of {k} chunks, dense action texts",
        num_train=n_train, num_validation=n_val, num_chunks=k, caption_mode="dense"))
    out.append(ToyWorldBuilderConfig(
        name=f"{size}_sports", description=f"{n_train}/{n_val} clips of {k} chunks, "
        "a caption every 4 chunks, 10% wrong", num_train=n_train, num_validation=n_val,
        num_chunks=k, caption_mode="sports", caption_every=4, wrong_rate=0.1))
  return out


def split_seeds(config: ToyWorldBuilderConfig) -> dict[str, list[int]]:
  """Split name -> clip seeds, in storage order. Train and validation seeds are disjoint."""
  seeds = {
      "train": [config.base_seed + i for i in range(config.num_train)],
      "validation": [config.base_seed + VALIDATION_SEED_OFFSET + i
                     for i in range(config.num_validation)],
  }
  assert not set(seeds["train"]) & set(seeds["validation"])
  return seeds


def generate_example(seed: int, config: ToyWorldBuilderConfig, split: str = "train",
                     world: toy_world.ToyWorldConfig = toy_world.ToyWorldConfig()) -> dict:
  """The example the builder stores for `seed` (see the module docstring for features)."""
  clip = toy_world.generate_clip(seed, config.num_chunks, world)
  if config.caption_mode == "dense":
    texts, wrong = list(clip.texts), [False] * clip.num_chunks
  else:
    texts, wrong = toy_world.caption_clip_with_truth(clip, config.caption_every,
                                                     config.wrong_rate, seed,
                                                     config.caption_placement)
  return {
      "name": f"{split}/seed_{seed:09d}",
      "seed": np.int64(seed),
      "frames": clip.frames,
      "texts": texts,
      "action_texts": list(clip.texts),
      "movement": np.array([toy_world.MOVES.index(a.movement) for a in clip.actions], np.int32),
      "fire": np.array([a.fire for a in clip.actions], bool),
      "caption_wrong": np.array(wrong, bool),
  }


class ToyWorld(ArrayRecordBuilder):
  """The toy world's clips with per-chunk texts (registered as 'toy_world')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "tiny"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: ToyWorldBuilderConfig = self.builder_config
    world = toy_world.ToyWorldConfig()
    k, t = cfg.num_chunks, 1 + world.frames_per_chunk * cfg.num_chunks
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "seed": tfds.features.Scalar(dtype=np.int64),
            # zlib: flat-colour frames compress ~30x; the default would store raw bytes.
            "frames": tfds.features.Tensor(shape=(t, world.size, world.size, 3),
                                           dtype=np.uint8, encoding="zlib"),
            "texts": tfds.features.Sequence(tfds.features.Text(), length=k),
            "action_texts": tfds.features.Sequence(tfds.features.Text(), length=k),
            "movement": tfds.features.Tensor(shape=(k,), dtype=np.int32),
            "fire": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
            "caption_wrong": tfds.features.Tensor(shape=(k,), dtype=np.bool_),
        }),
        # Seed order on disk: reading index i of a split is clip seeds[i]; Grain shuffles.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            fps=world.fps, frames_per_chunk=world.frames_per_chunk,
            caption_mode=cfg.caption_mode, caption_every=cfg.caption_every,
            wrong_rate=cfg.wrong_rate, caption_placement=cfg.caption_placement,
            validation_seed_offset=VALIDATION_SEED_OFFSET,
            moves=list(toy_world.MOVES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the world is procedural
    return {split: self._generate_examples(split, seeds)
            for split, seeds in split_seeds(self.builder_config).items()}

  def _generate_examples(self, split: str, seeds: list[int]) -> Iterator[tuple[str, dict]]:
    for seed in seeds:
      ex = generate_example(seed, self.builder_config, split)
      yield ex["name"], ex


def resolve_config(fields: Mapping[str, Any],
                   description: str = "from the experiment config"
                   ) -> ToyWorldBuilderConfig | None:
  """The builder config an experiment's `data.toy_world` mapping gives: {name} alone (or
  nothing) selects a registered config (None when none has that name); more fields build
  a custom one (name 'custom' unless given). Raises TypeError / ValueError on fields the
  builder config refuses."""
  fields = dict(fields)
  name = fields.pop("name", None)
  if not fields:
    return next((c for c in ToyWorld.BUILDER_CONFIGS if c.name == name), None)
  return ToyWorldBuilderConfig(name=name or "custom", description=description, **fields)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Build the toy-world TFDS dataset (ArrayRecord).")
  parser.add_argument("--config", default="tiny",
                      help=f"one of {[c.name for c in ToyWorld.BUILDER_CONFIGS]}")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  args = parser.parse_args(argv)
  builder = ToyWorld(config=args.config, data_dir=args.data_dir)
  builder.download_and_prepare()
  print(builder.info.splits)


if __name__ == "__main__":
  main()
