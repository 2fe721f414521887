"""bfloat16 activations with float32 weights (the paper configs' numerics) train like float32.

The tiny model trains 300 steps on the same 8 synthetic batches with the same flow times and
noise, once with `model.dtype='float32'` and once with 'bfloat16' (weights, optimizer state
and the loss reductions stay float32). bfloat16 keeps 8 mantissa bits, a relative rounding of
2^-9 (0.2%) per operation; the rounding differs from step to step, so the two runs drift
apart as a random walk rather than by a bias. Measured on this CPU: the 20-step moving
averages of the loss differ by at most 0.15% (text CE 0.6%, video MSE 0.2%). The bounds below
are about ten times those, and far below what a broken bf16 path does (a loss that stalls or
diverges moves the averages by tens of percent).
"""

import dataclasses

import jax
import numpy as np
import pytest

from experiments import toy_world
from tv2tv_jax import config as config_lib
from tv2tv_jax import synthetic, train_step
from tv2tv_jax.model import TV2TV

STEPS, BATCHES, WINDOW = 300, 8, 20


def _experiment(dtype: str):
  exp = config_lib.experiment_from_config_dict(toy_world.get_config("tiny"))
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, dtype=dtype))


def _curves(dtype: str) -> dict[str, np.ndarray]:
  exp = _experiment(dtype)
  model = TV2TV(exp.model)
  state = train_step.create_train_state(model, exp, jax.random.key(0))
  data = [synthetic.random_batch(i, exp.seq, exp.model, exp.train.batch_size)
          for i in range(BATCHES)]
  step = train_step.make_train_step(model, exp)
  rng = jax.random.key(1)
  out = {"loss": [], "text_ce": [], "video_mse": []}
  for i in range(STEPS):
    state, m = step(state, data[i % BATCHES], jax.random.fold_in(rng, i))
    for k in out:
      out[k].append(m[k])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params)), dtype
  return {k: np.asarray(jax.device_get(v), np.float64) for k, v in out.items()}


def _smooth(x: np.ndarray) -> np.ndarray:
  return np.convolve(x, np.ones(WINDOW) / WINDOW, mode="valid")


def test_bfloat16_model_computes_in_bfloat16():
  """The bf16 config really runs the towers' matmuls in bf16 on float32 weights (else the
  comparison below would be vacuous), and the f32 config none."""
  def bf16_dots(dtype):
    exp = _experiment(dtype)
    model = TV2TV(exp.model)
    state = train_step.create_train_state(model, exp, jax.random.key(0))
    batch = synthetic.random_batch(0, exp.seq, exp.model, 2)
    step = train_step.make_train_step(model, exp)
    text = str(jax.make_jaxpr(step)(state, batch, jax.random.key(1)))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    return sum("dot_general" in line and "bf16[" in line for line in text.splitlines())
  assert bf16_dots("float32") == 0
  assert bf16_dots("bfloat16") > 10


@pytest.mark.slow  # two 300-step runs of the tiny model: ~30 s on 2 CPU cores
def test_bfloat16_loss_curve_follows_float32():
  f32, bf16 = _curves("float32"), _curves("bfloat16")
  loss_f, loss_b = _smooth(f32["loss"]), _smooth(bf16["loss"])
  assert np.all(np.isfinite(bf16["loss"]))
  # Both learn: the moving average falls to under a third of its start.
  assert loss_f[-1] < loss_f[0] / 3 and loss_b[-1] < loss_b[0] / 3
  assert np.max(np.abs(loss_b - loss_f) / loss_f) < 0.02
  for key in ("text_ce", "video_mse"):
    a, b = _smooth(f32[key]), _smooth(bf16[key])
    assert np.max(np.abs(b - a) / a) < 0.05, key
