"""Input streams for training and evaluation, with exact, checkpointable state.

Every stream is an iterator of packed numpy batches (`tv2tv_jax.sequence` arrays
with a leading batch axis) with `get_state()` / `set_state()` returning / taking
JSON-serialisable state, so a checkpoint resumes the input exactly where it was.
With several processes each one yields only its own rows of the global batch
(`process_rows`), which `sharding.put_batch` assembles into global arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import jax
import numpy as np

from tv2tv_jax import config as config_lib, synthetic
from tv2tv_jax.config import PREPARED_SOURCES, ConfigError, DataConfig, Experiment

# Evaluation batches are drawn from a seed range disjoint from training's.
_EVAL_SEED_BASE = 10 ** 9


def process_rows(batch: dict[str, np.ndarray], process_index: int,
                 process_count: int) -> dict[str, np.ndarray]:
  """This process's contiguous share of a global batch's rows."""
  b = next(iter(batch.values())).shape[0]
  if b % process_count:
    raise ConfigError("train.batch_size", f"{b} rows do not split over {process_count} "
                      f"processes")
  per = b // process_count
  return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


class SyntheticBatches:
  """Random packed batches of the right structure; batch i depends only on (seed, i).

  Args:
    exp: the experiment (shapes, layout, batch size).
    data: the `data` section (`max_examples_per_row`, `max_text_len`,
      `synthetic_batches`: cycle through that many distinct batches; 0 = never repeat).
    seed: stream seed.
  """

  def __init__(self, exp: Experiment, data: DataConfig, seed: int):
    self.exp, self.seed = exp, seed
    self.cycle = data.synthetic_batches
    self.max_examples = data.max_examples_per_row
    self.max_text = data.max_text_len
    self.index = 0

  def batch(self, i: int) -> dict[str, np.ndarray]:
    """The global batch number i (all processes' rows)."""
    if self.cycle:
      i %= self.cycle
    return synthetic.random_batch(self.seed * 1_000_003 + i, self.exp.seq, self.exp.model,
                                  self.exp.train.batch_size, layout=self.exp.seq.layout,
                                  max_examples_per_row=self.max_examples,
                                  max_text_len=self.max_text)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = process_rows(self.batch(self.index), jax.process_index(), jax.process_count())
    self.index += 1
    return out

  def get_state(self) -> dict[str, int]:
    return {"index": self.index, "seed": self.seed}

  def set_state(self, state: dict[str, int]) -> None:
    if int(state["seed"]) != self.seed:
      raise ValueError(f"input state was saved for seed {state['seed']}, this stream has "
                       f"seed {self.seed}")
    self.index = int(state["index"])


def skipped_examples(state: Any) -> int:
  """Bad examples a stream has skipped so far, from its `get_state()`: the sum of every
  "skipped" count in the (nested) state, one per packing iterator (several with
  multiprocess prefetch workers); 0 for streams that skip nothing."""
  if isinstance(state, dict):
    return sum(int(v) if k == "skipped" and not isinstance(v, (dict, list)) else
               skipped_examples(v) for k, v in state.items())
  if isinstance(state, list):
    return sum(skipped_examples(v) for v in state)
  return 0


def _data(cfg: Any) -> DataConfig:
  """The `data` section of a run config (`config.RunConfig`; a raw config is parsed)."""
  return config_lib.as_run_config(cfg).data


def data_dir(cfg: Any, workdir: str | os.PathLike | None) -> str:
  """The run's prepared data directory (`prepared.default_data_dir`)."""
  from data_pipelines import prepared  # local: heavy imports
  return prepared.default_data_dir(_data(cfg), workdir)


def _prepared_pipeline(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None):
  """The pipeline config of the run's prepared data directory, checked once per process.

  Raises prepared.NotPreparedError (a ConfigError naming data.data_dir and the prepare
  command) when the directory is not completely prepared: the input code reads prepared
  data, it never builds any.
  """
  from data_pipelines import prepared, tokenizer as tokenizer_lib  # local: heavy imports
  where = data_dir(cfg, workdir)
  # The training stream and the evaluation batches of one run read the same directory:
  # check it once per process.
  data = _data(cfg)
  key = (where, data, exp)
  if key not in _PREPARED:
    prepared.check_prepared(where)
    pcfg = prepared.pipeline_config(where, data)
    tokenizer_lib.check_compatible(tokenizer_lib.load_tokenizer(pcfg.tokenizer_path), exp)
    _PREPARED[key] = pcfg
  return _PREPARED[key]


_PREPARED: dict = {}  # (data dir, config, experiment) -> pipeline config, this process


def _prepared_stream(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None, split: str,
                     train: bool):
  from data_pipelines import grain_pipeline  # local: grain is only needed for this source
  pcfg = _prepared_pipeline(exp, cfg, workdir)
  if not train:  # evaluation: a fixed, unshuffled pass over validation, in this process
    pcfg = dataclasses.replace(pcfg, num_workers=0)
  ds = grain_pipeline.make_dataset(pcfg, split, exp.seq, exp.model, exp.train.batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(), shuffle=train)
  return grain_pipeline.GrainBatches(ds)


def make_train_input(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None = None):
  """The configured training stream (see `data.source`).

  `cfg`: the run's `config.RunConfig` (a raw config is parsed); `workdir`: the run's work
  directory; the prepared sources read `data_dir(cfg, workdir)`.
  """
  data = _data(cfg)
  source = data.source
  if source == "synthetic":
    return SyntheticBatches(exp, data, seed=exp.train.seed)
  if source in PREPARED_SOURCES:
    return _prepared_stream(exp, cfg, workdir, "train", train=True)
  raise ConfigError("data.source", f"unknown source {source!r}; known: synthetic, "
                    f"{', '.join(PREPARED_SOURCES)}")


def data_identity(exp: Experiment, cfg: Any,
                  workdir: str | os.PathLike | None = None) -> tuple[dict[str, str], str]:
  """(identity, where) of the prepared data the configured source reads
  (`prepared.data_identity` of its directory, checked to be prepared); ({}, '') for
  'synthetic', whose batches follow from the config alone, which `resume_check` compares.
  """
  if _data(cfg).source not in PREPARED_SOURCES:
    return {}, ""
  from data_pipelines import prepared  # local: heavy imports
  _prepared_pipeline(exp, cfg, workdir)
  where = data_dir(cfg, workdir)
  return prepared.data_identity(where), where


def make_eval_batches(exp: Experiment, cfg: Any,
                      workdir: str | os.PathLike | None = None
                      ) -> list[dict[str, np.ndarray]]:
  """`train.eval_batches` held-out batches (this process's rows), fixed for the run.

  Prepared sources: the first batches of the validation split, unshuffled (repeated if
  the split holds fewer).
  """
  data = _data(cfg)
  if data.source in PREPARED_SOURCES:
    stream = _prepared_stream(exp, cfg, workdir, "validation", train=False)
    return [next(stream) for _ in range(exp.train.eval_batches)]
  data = dataclasses.replace(data, synthetic_batches=0)
  stream = SyntheticBatches(exp, data, seed=_EVAL_SEED_BASE + exp.train.seed)
  return [next(stream) for _ in range(exp.train.eval_batches)]
