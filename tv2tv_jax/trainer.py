"""The training loop: build, init, compile, train, log. `main.py` only parses flags.

Writes into the work directory:
  config.json      the full experiment config
  metrics.jsonl    one JSON object per logged step (both losses, grad norm, lr,
                   tokens/s, model FLOPs utilisation estimate)
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from tv2tv_jax import config as config_lib
from tv2tv_jax import flops, synthetic, train_step
from tv2tv_jax.model import TV2TV


def synthetic_batches(exp: config_lib.Experiment, data_cfg: Any) -> Iterator[dict]:
  """Packed batches of random examples; cycles `synthetic_batches` of them if > 0."""
  def make(i):
    return synthetic.random_batch(exp.train.seed * 1_000_003 + i, exp.seq, exp.model,
                                  exp.train.batch_size, layout=exp.seq.layout,
                                  max_examples_per_row=data_cfg.get("max_examples_per_row", 3),
                                  max_text_len=data_cfg.get("max_text_len", 3))
  count = int(data_cfg.get("synthetic_batches", 0))
  if count > 0:
    fixed = [make(i) for i in range(count)]
    return itertools.cycle(fixed)
  return (make(i) for i in itertools.count())


def make_batches(exp: config_lib.Experiment, cfg: ml_collections.ConfigDict) -> Iterator[dict]:
  """The configured input stream of packed numpy batches."""
  data_cfg = cfg.get("data", ml_collections.ConfigDict({"source": "synthetic"}))
  source = data_cfg.get("source", "synthetic")
  if source == "synthetic":
    return synthetic_batches(exp, data_cfg)
  raise config_lib.ConfigError("data.source", f"unknown source {source!r}; known: synthetic")


def _scalar_metrics(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(cfg: ml_collections.ConfigDict, workdir: str, log=print) -> list[dict[str, float]]:
  """Trains the configured model; returns the logged metric records.

  Args:
    cfg: an experiment ConfigDict (`experiments/*.py`).
    workdir: output directory (created).
    log: where progress lines go.
  """
  exp = config_lib.experiment_from_config_dict(cfg)  # validates before any compile
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))

  model = TV2TV(exp.model)
  rng = jax.random.key(exp.train.seed)
  init_rng, step_rng = jax.random.split(rng)
  state = train_step.create_train_state(model, exp, init_rng)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  step_fn = train_step.make_train_step(model, exp)
  batches = make_batches(exp, cfg)

  first = next(batches)
  compiled = step_fn.lower(state, first, step_rng).compile()
  mem = compiled.memory_analysis()
  step_flops = flops.train_step_flops(exp, exp.train.batch_size)
  log(f"model: {n_params / 1e6:.2f}M params, row length {exp.row_len} "
      f"(text {exp.seq.text_len}, {exp.seq.max_chunks} chunk copies x "
      f"{exp.model.tokens_per_chunk} tokens x 2), layout {exp.seq.layout}, "
      f"{step_flops / 1e9:.2f} GFLOP/step")
  if mem is not None:
    log(f"compiled step: temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB")

  records = []
  tokens_per_step = exp.train.batch_size * exp.row_len
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  t_last, steps_since = time.perf_counter(), 0
  with open(metrics_path, "w") as out:
    batch = first
    for step in range(exp.train.num_steps):
      state, metrics = compiled(state, batch, step_rng)
      steps_since += 1
      if step == 0 or (step + 1) % exp.train.log_every == 0 or step + 1 == exp.train.num_steps:
        m = _scalar_metrics(metrics)
        now = time.perf_counter()
        dt = (now - t_last) / steps_since
        t_last, steps_since = now, 0
        m.update(step=step + 1, step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                 model_tflops_per_s=step_flops / dt / 1e12)
        records.append(m)
        out.write(json.dumps(m) + "\n")
        out.flush()
        log(f"step {step + 1:5d}  loss {m['loss']:.4f}  text_ce {m['text_ce']:.4f}  "
            f"video_mse {m['video_mse']:.4f}  grad_norm {m['grad_norm']:.3f}  "
            f"lr {m['learning_rate']:.2e}  {m['tokens_per_s']:.0f} tok/s")
      batch = next(batches)
  return records


def final_summary(records: list[dict[str, float]]) -> str:
  """One line comparing the first and last logged losses."""
  a, b = records[0], records[-1]
  return (f"text_ce {a['text_ce']:.3f} -> {b['text_ce']:.3f}, "
          f"video_mse {a['video_mse']:.3f} -> {b['video_mse']:.3f} "
          f"over {int(b['step'])} steps")


