"""Gradient accumulation: n microbatches give the full batch's loss, gradient and update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import toy_world
from tv2tv_jax import config as config_lib
from tv2tv_jax import resume_check, sharding, synthetic, train_step
from tv2tv_jax.model import TV2TV

B = 16  # rows: B / n must still split over the 8 devices' data axis for n = 2
U = 2.0 ** -24  # float32 unit roundoff


def _with_accum(exp, n, batch_size=B):
  return dataclasses.replace(exp, train=dataclasses.replace(
      exp.train, batch_size=batch_size, grad_accum_steps=n))


def _uneven_batch(exp):
  """B rows alternating between rows with few text targets (one example, no chunk
  texts) and rows with many (up to 3 examples with texts), so the strided microbatches
  (rows m, m + n, ...) hold very different target counts."""
  sparse = synthetic.random_batch(0, exp.seq, exp.model, B // 2, max_examples_per_row=1,
                                  max_text_len=0)
  dense = synthetic.random_batch(1, exp.seq, exp.model, B // 2, max_examples_per_row=3,
                                 max_text_len=3)
  return {k: np.stack([sparse[k], dense[k]], 1).reshape(B, *sparse[k].shape[1:])
          for k in sparse}


def _recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx`, with the gradient it was given kept in its state: (grads, tx state)."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params), tx.init(params)
  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state[1], params)
    return updates, (grads, inner)
  return optax.GradientTransformation(init, update)


_TX = {}


def _state(model, exp):
  """A fresh state at the end of warmup (step 0 has learning rate 0: no update to
  compare) whose optimizer records the gradient the step computed."""
  if exp.optim not in _TX:  # one tx per optimizer config: jit caches on the static tx
    _TX[exp.optim] = _recording(train_step.make_optimizer(exp.optim))
  tx = _TX[exp.optim]
  state = train_step.create_train_state(model, exp, jax.random.key(0))
  return state.replace(step=jnp.asarray(exp.optim.warmup_steps, jnp.int32),
                       opt_state=tx.init(state.params), tx=tx)


def _result(state, metrics):
  grads = state.opt_state[0]
  return ({k: float(v) for k, v in metrics.items()},
          [np.asarray(x) for x in jax.tree.leaves(grads)],
          [np.asarray(x) for x in jax.tree.leaves(state.params)])


@pytest.fixture(scope="module")
def exp():
  return config_lib.experiment_from_config_dict(toy_world.get_config("tiny"))


@pytest.fixture(scope="module")
def batch(exp):
  return _uneven_batch(exp)


@pytest.fixture(scope="module")
def reference(exp, batch):
  """The unaccumulated step (n = 1) on one device: (metrics, grads, params)."""
  e = _with_accum(exp, 1)
  model = TV2TV(e.model)
  step = train_step.make_train_step(model, e)
  return _result(*step(_state(model, e), batch, jax.random.key(1)))


def _check_matches(got, reference, row_len):
  """Tolerances from float32 rounding. Accumulation sums the same per-token terms in
  another order (per microbatch, then across microbatches). Reordering a float32 sum of
  k terms moves it by at most (k - 1)·u·sum|terms| (u = 2^-24).
    metrics: sums of k <= 2·B·L non-negative terms (NLLs, squared errors; L = row_len,
      64 slots), so sum|terms| is the sum itself: rtol = 2·B·L·u ≈ 1.2e-4 bounds it; the
      counts are integers, exact.
    grads: each element sums over the k = B·L positions; taking sum|terms| at the
      leaf's largest |gradient| gives atol = B·L·u·max|g| ≈ 6e-5·max|g|.
    params: one AdamW step after clipping (a scale Adam divides out) moves an element by
      lr·g/(|g| + eps) with eps = 1e-8: ±lr whenever |g| is far above the gradient's
      rounding, so the gradient's rounding reaches a parameter only through elements
      with |g| within rounding of 0 (none here); rtol = 1e-5 leaves room for the
      rounding of p - lr·(...) itself.
  Measured (n = 2, 4, and n = 2 on 8 devices): metrics within 2e-7 relative, gradients
  within 7e-7·max|g| per leaf, parameters bit-identical."""
  (m, g, p), (m1, g1, p1) = got, reference
  k = B * row_len
  for key in ("loss", "text_ce", "video_mse", "grad_norm"):
    assert m[key] == pytest.approx(m1[key], rel=2 * k * U), key
  for key in ("text_targets", "noisy_chunks", "skipped", "learning_rate"):
    assert m[key] == m1[key], key
  assert m["skipped"] == 0
  for a, a1 in zip(g, g1):
    np.testing.assert_allclose(a, a1, rtol=0, atol=k * U * np.abs(a1).max())
  for a, a1 in zip(p, p1):
    np.testing.assert_allclose(a, a1, rtol=1e-5, atol=0)


def test_microbatches_hold_unequal_target_counts(batch):
  """The equality tests below would pass with a mean of microbatch means only if every
  microbatch held the same numbers of targets; this batch does not."""
  for n in (2, 4):
    for key in ("text_target_mask", "noisy_valid"):
      counts = batch[key].reshape(B // n, n, -1).sum(axis=(0, 2))  # rows m, m + n, ...
      assert counts.max() > counts.min(), (n, key, counts)
  text = batch["text_target_mask"].reshape(B // 2, 2, -1).sum(axis=(0, 2))
  assert text.max() > 1.5 * text.min()  # 80 vs 43 text targets


def test_microbatches_are_strided():
  x = jnp.arange(8 * 3).reshape(8, 3)
  mb = train_step.microbatches(x, 4)
  assert mb.shape == (4, 2, 3)
  np.testing.assert_array_equal(mb[1], x[1::4])


# n = 4 compiles once more for the same property: the slow tier (CI runs it).
@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_accumulated_step_equals_full_batch_step(exp, batch, reference, n):
  e = _with_accum(exp, n)
  model = TV2TV(e.model)
  step = train_step.make_train_step(model, e)
  _check_matches(_result(*step(_state(model, e), batch, jax.random.key(1))), reference,
                 e.row_len)


def test_sharded_accumulated_step_equals_full_batch_step(exp, batch, reference):
  """n = 2 on a data-parallel mesh of 8 devices: the same step as n = 1 on one device,
  and the microbatch split moves no rows between devices."""
  assert jax.device_count() == 8
  e = _with_accum(exp, 2)
  model = TV2TV(e.model)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  sharding.check_divisibility(e, mesh)
  rules = sharding.rules_from_config(toy_world.get_config("tiny"))
  shardings = sharding.state_shardings(model, e, mesh, rules)
  state = _state(model, e)
  shardings = shardings.replace(opt_state=(shardings.params, shardings.opt_state),
                                tx=state.tx)
  step = sharding.make_sharded_train_step(model, e, mesh, rules, shardings)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, shardings)
    placed = sharding.put_batch(batch, mesh)
    compiled = step.lower(state, placed, jax.random.key(1)).compile()
    got = _result(*compiled(state, placed, jax.random.key(1)))
  _check_matches(got, reference, e.row_len)
  # Params are replicated on a pure data-parallel mesh: the only collectives are the
  # reductions of gradients, metrics and norms. A split that put a microbatch's rows
  # on other devices would show up as an all-to-all, all-gather or permute.
  hlo = compiled.as_text()
  for op in ("all-to-all", "all-gather", "collective-permute"):
    assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op


@pytest.mark.parametrize("batch_size,n,words", [
    (8, 0, "integer >= 1"),
    (8, 3, "must divide train.batch_size=8"),
])
def test_bad_grad_accum_steps_is_named(batch_size, n, words):
  cfg = toy_world.get_config("tiny")
  cfg.train.update(batch_size=batch_size, grad_accum_steps=n)
  with pytest.raises(config_lib.ConfigError, match=words) as err:
    config_lib.experiment_from_config_dict(cfg)
  assert err.value.field == "train.grad_accum_steps"


def test_microbatch_that_does_not_split_over_the_mesh_is_named(exp):
  """16 rows split over 8 devices, but 4 microbatches of 4 rows do not."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
  sharding.check_divisibility(_with_accum(exp, 2), mesh)
  with pytest.raises(config_lib.ConfigError, match="4 microbatches of 4 rows") as err:
    sharding.check_divisibility(_with_accum(exp, 4), mesh)
  assert err.value.field == "train.grad_accum_steps"


def test_grad_accum_steps_may_change_on_resume():
  saved = toy_world.get_config("tiny").to_dict()
  del saved["train"]["grad_accum_steps"]  # a checkpoint from before the field existed
  requested = toy_world.get_config("tiny").to_dict()
  assert resume_check.check_resume(saved, requested, step=4) == []
  requested["train"]["grad_accum_steps"] = 4
  assert resume_check.check_resume(saved, requested, step=4) == [
      "train.grad_accum_steps: 1 -> 4"]
