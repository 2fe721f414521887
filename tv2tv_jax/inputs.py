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
import tempfile
from typing import Any, Iterator

import jax
import numpy as np

from tv2tv_jax import synthetic, workdirs
from tv2tv_jax.config import ConfigError, Experiment

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
    data_cfg: the config's `data` section (`max_examples_per_row`, `max_text_len`,
      `synthetic_batches`: cycle through that many distinct batches; 0 = never repeat).
    seed: stream seed.
  """

  def __init__(self, exp: Experiment, data_cfg: Any, seed: int):
    self.exp, self.seed = exp, seed
    self.cycle = int(data_cfg.get("synthetic_batches", 0))
    self.max_examples = int(data_cfg.get("max_examples_per_row", 3))
    self.max_text = int(data_cfg.get("max_text_len", 3))
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


def toy_world_data_dir(cfg: Any, workdir: str | os.PathLike | None) -> str:
  """The toy-world data directory: `data.data_dir`, else <workdir>/toy_world_data, else
  <system temp dir>/tv2tv_toy_world_data; always a local path.

  Raises workdirs.WorkdirError naming `data.data_dir` when it (or the default under a
  gs:// work directory) is not local: the data stages (TFDS ArrayRecord build, VAE,
  tokenizer) read and write with local file I/O.
  """
  data_cfg = cfg.get("data") or {}
  if data_cfg.get("data_dir"):
    data_dir = os.fspath(data_cfg["data_dir"])
  elif workdir:
    data_dir = os.fspath(workdirs.as_path(workdir) / "toy_world_data")
  else:
    # No work directory given (a caller of the older signature): a shared cache in the
    # system temp directory; stage markers keep it correct across configs.
    data_dir = os.path.join(tempfile.gettempdir(), "tv2tv_toy_world_data")
  return workdirs.require_local(
      data_dir, "data.data_dir", "the toy-world data stages (defaulting to "
      "<workdir>/toy_world_data) use local file I/O; set data.data_dir to a local path")


def _toy_world_pipeline(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None):
  """Prepares the toy-world data stages (cached) and returns the pipeline config.

  The data directory is `toy_world_data_dir(cfg, workdir)`. Process 0 runs
  the missing stages; the others wait for it at a barrier and then read the same files.
  """
  from data_pipelines import main_job, tokenizer as tokenizer_lib  # local: heavy imports
  data_dir = toy_world_data_dir(cfg, workdir)
  # The training stream and the evaluation batches of one run ask for the same stages:
  # check (and log) them once per process.
  key = (data_dir, repr(cfg), exp)
  if key not in _PREPARED:
    if jax.process_index() == 0:
      main_job.prepare_toy_world(data_dir, cfg)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("toy_world_data_prepared")
    pcfg = main_job.pipeline_config(data_dir, cfg)
    tokenizer_lib.check_compatible(tokenizer_lib.load_tokenizer(pcfg.tokenizer_path), exp)
    _PREPARED[key] = pcfg
  return _PREPARED[key]


_PREPARED: dict = {}  # (data dir, config, experiment) -> pipeline config, this process


def _toy_world_stream(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None, split: str,
                      train: bool):
  from data_pipelines import grain_pipeline  # local: grain is only needed for this source
  pcfg = _toy_world_pipeline(exp, cfg, workdir)
  if not train:  # evaluation: a fixed, unshuffled pass over validation, in this process
    pcfg = dataclasses.replace(pcfg, num_workers=0)
  ds = grain_pipeline.make_dataset(pcfg, split, exp.seq, exp.model, exp.train.batch_size,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count(), shuffle=train)
  return grain_pipeline.GrainBatches(ds)


def make_train_input(exp: Experiment, cfg: Any, workdir: str | os.PathLike | None = None):
  """The configured training stream (see `data.source`).

  `workdir`: the run's work directory; 'toy_world' caches its data stages under it
  unless `data.data_dir` is set.
  """
  data_cfg = cfg.get("data") or {}
  source = data_cfg.get("source", "synthetic")
  if source == "synthetic":
    return SyntheticBatches(exp, data_cfg, seed=exp.train.seed)
  if source == "toy_world":
    return _toy_world_stream(exp, cfg, workdir, "train", train=True)
  raise ConfigError("data.source", f"unknown source {source!r}; known: synthetic, toy_world")


def data_identity(exp: Experiment, cfg: Any,
                  workdir: str | os.PathLike | None = None) -> tuple[dict[str, str], str]:
  """(identity, where) of the prepared data the configured source reads.

  'toy_world': `main_job.data_identity` of its data directory (prepared first, as
  `make_train_input` does); 'synthetic': ({}, '') -- its batches follow from the config
  alone, which `resume_check` compares.
  """
  if (cfg.get("data") or {}).get("source") != "toy_world":
    return {}, ""
  from data_pipelines import main_job  # local: heavy imports
  _toy_world_pipeline(exp, cfg, workdir)
  data_dir = toy_world_data_dir(cfg, workdir)
  return main_job.data_identity(data_dir), data_dir


def make_eval_batches(exp: Experiment, cfg: Any,
                      workdir: str | os.PathLike | None = None
                      ) -> list[dict[str, np.ndarray]]:
  """`train.eval_batches` held-out batches (this process's rows), fixed for the run.

  'toy_world': the first batches of the validation split, unshuffled (repeated if the
  split holds fewer).
  """
  if (cfg.get("data") or {}).get("source") == "toy_world":
    stream = _toy_world_stream(exp, cfg, workdir, "validation", train=False)
    return [next(stream) for _ in range(exp.train.eval_batches)]
  data_cfg = dict(cfg.get("data") or {}, synthetic_batches=0)
  stream = SyntheticBatches(exp, data_cfg, seed=_EVAL_SEED_BASE + exp.train.seed)
  return [next(stream) for _ in range(exp.train.eval_batches)]
