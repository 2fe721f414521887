"""Timing helpers shared by the scripts in `benchmarks/`."""

from __future__ import annotations

import time

import jax
import numpy as np

from tv2tv_jax import synthetic, train_step
from tv2tv_jax.config import Experiment
from tv2tv_jax.model import TV2TV


def median_seconds(fn, calls: int) -> float:
  """Median wall time of `calls` calls of fn() (each waited for), after one warm-up call
  that compiles it."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def synthetic_train_step(exp: Experiment):
  """(step, state, batch, rng): the single-device jitted train step of `exp`, its fresh
  state (seed 0), one synthetic batch of `exp`'s shapes and the step's rng (seed 1)."""
  model = TV2TV(exp.model)
  state = train_step.create_train_state(model, exp, jax.random.key(0))
  batch = synthetic.random_batch(0, exp.seq, exp.model, exp.train.batch_size)
  return train_step.make_train_step(model, exp), state, batch, jax.random.key(1)


def time_train_step(exp: Experiment, steps: int) -> dict:
  """Times the single-device train step on one synthetic batch of `exp`'s shapes.

  Returns step_s (median of `steps` timed steps after a warm-up), compile_and_first_step_s,
  and the parameter count.
  """
  step, state, batch, rng = synthetic_train_step(exp)
  t = time.perf_counter()
  state, m = step(state, batch, rng)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return dict(step_s=float(np.median(times)), steps=steps, compile_and_first_step_s=compile_s,
              params=int(sum(x.size for x in jax.tree.leaves(state.params))))
