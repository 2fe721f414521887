"""The model with `attention_impl='pallas'` (interpret mode) trains like the XLA reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tv2tv_jax import flow, synthetic, train_step
from tv2tv_jax.model import TV2TV


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.slow  # the train step in Pallas interpret mode: ~70 s
def test_train_step_with_pallas_matches_xla(tiny_exp):
  exp_xla = dataclasses.replace(
      tiny_exp, model=dataclasses.replace(tiny_exp.model, attention_impl="xla"),
      flow=dataclasses.replace(tiny_exp.flow, cfg_drop_prob=0.5))  # exercise the CFG mask
  exp_pl = dataclasses.replace(exp_xla, model=dataclasses.replace(exp_xla.model,
                                                                  attention_impl="pallas"))
  batch = synthetic.random_batch(3, exp_xla.seq, exp_xla.model, 2)
  sample = flow.sample_flow(jax.random.key(4), batch["latents"].shape, exp_xla.flow)
  assert bool(jnp.any(sample.cfg_drop))
  state = train_step.create_train_state(TV2TV(exp_xla.model), exp_xla, jax.random.key(0))

  def step(exp):
    fn = jax.jit(lambda s, b: train_step.train_step(s, b, jax.random.key(1), model=TV2TV(exp.model),
                                                    exp=exp, sample=sample))
    return fn(state, batch)

  new_xla, m_xla = step(exp_xla)
  new_pl, m_pl = step(exp_pl)
  for key in ("loss", "text_ce", "video_mse", "grad_norm"):
    assert _rel(m_pl[key], m_xla[key]) < 1e-5, (key, float(m_pl[key]), float(m_xla[key]))
  # The updated parameters agree leaf by leaf (one AdamW step from the same state, so the
  # update direction ~ sign of the gradient: this also compares the gradients).
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new_pl.params)[0],
                          jax.tree.leaves(new_xla.params), strict=True):
    assert np.isfinite(np.asarray(a)).all(), path
    assert _rel(a, b) < 1e-5, (jax.tree_util.keystr(path), _rel(a, b))


@pytest.mark.slow
def test_loss_gradients_with_pallas_match_xla(tiny_exp):
  # Leaf-by-leaf gradients (the test above sees them only through
  # grad_norm and the first AdamW update, which is close to lr * sign(g)).
  from tv2tv_jax import losses
  exp_xla = dataclasses.replace(tiny_exp, flow=dataclasses.replace(tiny_exp.flow,
                                                                   cfg_drop_prob=0.5))
  exp_pl = dataclasses.replace(exp_xla, model=dataclasses.replace(exp_xla.model,
                                                                  attention_impl="pallas"))
  batch = synthetic.random_batch(5, exp_xla.seq, exp_xla.model, 2, layout="think2v")
  sample = flow.sample_flow(jax.random.key(6), batch["latents"].shape, exp_xla.flow)
  params = train_step.create_train_state(TV2TV(exp_xla.model), exp_xla,
                                         jax.random.key(0)).params

  def grads(exp):
    fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
    return jax.jit(lambda p, b: fn(p, TV2TV(exp.model), b, sample, exp))(params, batch)

  (loss_x, _), g_x = grads(exp_xla)
  (loss_p, _), g_p = grads(exp_pl)
  assert _rel(loss_p, loss_x) < 1e-5
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_p)[0], jax.tree.leaves(g_x),
                          strict=True):
    assert _rel(a, b) < 1e-4, (jax.tree_util.keystr(path), _rel(a, b))
