"""The attention plan: the kernel's block tables are built once per step, shared by every layer.

The model builds `attention.prepare(meta, 'pallas')` once per forward and broadcasts
it to the layers; the results must equal those of building the tables inside every
layer (the plan-less `attend`), bit for bit: the same kernels run on the same tables.
"""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tv2tv_jax import attention, flow, losses, synthetic, train_step
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.attention import kernel, kernel_plan
from tv2tv_jax.attention.kernel_forward import BlockSizes
from tv2tv_jax.model import TV2TV

from test_kernel import draw_meta, qkvo, sharded_case

# Distinct dk/dv blocks (two tables per plan) and several blocks per row of the tiny model.
SMALL_BLOCKS = BlockSizes(8, 16, 16, 8)


@pytest.fixture
def small_blocks(monkeypatch):
  """Plans built without explicit block sizes (the model's) use SMALL_BLOCKS."""
  monkeypatch.setattr(kernel_plan, "default_block_sizes", lambda: SMALL_BLOCKS)


@pytest.fixture
def count_tables(monkeypatch):
  """A list that gets one entry per `block_table.block_table` call (during tracing)."""
  calls = []
  real = bt.block_table

  def counted(*args, **kwargs):
    calls.append(args[2:])
    return real(*args, **kwargs)
  monkeypatch.setattr(bt, "block_table", counted)
  return calls


def _variant(exp, **model):
  return dataclasses.replace(exp, model=dataclasses.replace(exp.model, attention_impl="pallas",
                                                            **model))


def _loss_and_grads(exp, params, batch, sample):
  fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
  return jax.jit(lambda p, b: fn(p, TV2TV(exp.model), b, sample, exp))(params, batch)


def _inputs(exp, seed=3):
  batch = synthetic.random_batch(seed, exp.seq, exp.model, 2, layout="think2v")
  sample = flow.sample_flow(jax.random.key(seed + 1), batch["latents"].shape,
                            dataclasses.replace(exp.flow, cfg_drop_prob=0.5))
  return batch, sample


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_tables_built_once_per_step(tiny_exp, small_blocks, count_tables, scan_layers,
                                    num_layers):
  exp = _variant(tiny_exp, num_layers=num_layers, scan_layers=scan_layers, remat=True)
  model = TV2TV(exp.model)
  params = jax.eval_shape(lambda: train_step.create_train_state(model, exp,
                                                                jax.random.key(0)).params)
  batch, sample = _inputs(exp)
  count_tables.clear()  # init traced the model too; count one step only
  fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
  jaxpr = jax.make_jaxpr(lambda p: fn(p, model, batch, sample, exp))(params).jaxpr
  # One forward/dq table and one dk/dv table, whatever the number of layers.
  assert sorted(count_tables) == [(8, 16), (16, 8)]
  # And not inside the layer loop: the tables' visit lists are argsorts, and no scanned
  # body (forward, or backward with its remat recompute) sorts anything.
  scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
  assert bool(scans) == scan_layers
  assert not any(e.primitive.name == "sort" for s in scans for e in _eqns(s.params["jaxpr"]))
  assert any(e.primitive.name == "sort" for e in _eqns(jaxpr))


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, recursively into sub-jaxprs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          yield from _eqns(sub)


def test_model_with_plan_equals_tables_per_layer(tiny_exp, small_blocks, monkeypatch):
  exp = _variant(tiny_exp, num_layers=3, scan_layers=True, remat=True)
  batch, sample = _inputs(exp, seed=5)
  params = train_step.create_train_state(TV2TV(exp.model), exp, jax.random.key(0)).params
  (loss, _), grads = _loss_and_grads(exp, params, batch, sample)
  # The former design: no plan, so every layer's `attend` builds its own tables.
  monkeypatch.setattr(attention, "prepare", lambda meta, impl, cached=None, regions=None: None)
  (loss_old, _), grads_old = _loss_and_grads(exp, params, batch, sample)
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(loss_old))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(grads_old), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=jax.tree_util.keystr(path))


def _attend_fwd_and_grads(meta, plan, q, k, v, do):
  fn = lambda q, k, v: attention.attend(q, k, v, meta, impl="pallas", plan=plan)
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(do))


def test_attend_with_plan_equals_without(small_blocks):
  _, meta = draw_meta(9, "tv2tv", 3, 4, 3, 5, 2, 0.5)
  b, length = meta.segment_ids.shape
  q, k, v, do = qkvo(4, b, length, length, 4, 2, 16)
  plan = attention.prepare(meta, "pallas")
  assert isinstance(plan, kernel_plan.KernelPlan) and plan.dkv is not None
  got = jax.jit(_attend_fwd_and_grads)(meta, plan, q, k, v, do)
  want = jax.jit(_attend_fwd_and_grads)(meta, None, q, k, v, do)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def test_xla_has_no_plan_and_a_plan_must_fit():
  _, meta = draw_meta(1, "t2v", 2, 4, 1, 2, 1, 0.0)
  assert attention.prepare(meta, "xla") is None
  b, length = meta.segment_ids.shape
  q, k, v, _ = qkvo(0, b, length, length, 2, 1, 8)
  plan = attention.prepare(meta, "pallas")
  with pytest.raises(ValueError, match="takes no plan"):
    attention.attend(q, k, v, meta, impl="xla", plan=plan)
  with pytest.raises(ValueError, match="differ from the plan"):
    kernel.plan_attention(q[:, :-1], k, v, plan)


def test_sharded_plan_is_split_by_rows_and_equals_tables_per_shard(small_blocks):
  mesh, meta, q, k, v, do = sharded_case()

  def step(q, k, v, do, use_plan):
    plan = attention.prepare(meta, "pallas") if use_plan else None
    return _attend_fwd_and_grads(meta, plan, q, k, v, do), plan

  with jax.set_mesh(mesh):
    got, plan = jax.jit(lambda *a: step(*a, True))(q, k, v, do)
    want, _ = jax.jit(lambda *a: step(*a, False))(q, k, v, do)
  for leaf in jax.tree.leaves(plan):
    assert leaf.sharding.spec[0] == ("data", "fsdp")
  assert got[0].sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
  # A plan built on the whole batch (no shard_map) is split by rows all the same.
  whole = kernel_plan.self_plan(meta)
  fn = kernel.sharded_splash_attention(mesh)
  out = jax.jit(lambda q, k, v: fn(q, k, v, meta, plan=whole))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_cached_plan_attends_like_the_cross_mask(impl, small_blocks):
  """Decoding's plan (`prepare(meta, impl, cached=...)`): the queries of the row's last
  chunk copy against [the rest of the row as a cache | themselves] get exactly what the
  dense cross mask of `masks.against_cache` gives, with either implementation."""
  from tv2tv_jax import masks
  _, meta = draw_meta(3, "tv2tv", 2, 4, 2, 2, 2, 0.5)
  b, length = meta.segment_ids.shape
  lq = 4
  cached, new = meta.slice(0, length - lq), meta.slice(length - lq, length)
  q, k, v, _ = qkvo(1, b, lq, length, 4, 2, 8)
  plan = attention.prepare(new, impl, cached=cached)
  got = attention.attend(q, k, v, new, impl=impl, plan=plan)
  k_meta, q_slot, k_slot = masks.against_cache(cached, new)
  mask = masks.cross_mask(new, k_meta, q_slot, k_slot)
  # The keys are the row in its own slot order, so this is the row's own mask.
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(masks.dense_mask(meta))[:, -lq:])
  want = attention.masked_attention(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  if impl == "pallas":
    assert plan.dkv is None  # forward only: no dk/dv table
  with pytest.raises(ValueError, match="KV cache needs the plan"):
    attention.attend(q, k, v, new, impl=impl)
