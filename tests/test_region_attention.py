"""Region attention: the XLA path without the key blocks the storage layout makes invisible.

`reference.region_attention` must equal the dense `reference_attention` (forward and
gradients) on real packed rows of every layout: several examples per row, padding,
given first frames without a noisy twin (fewer noisy copies than clean ones) and CFG
drop flags. The pairs it skips must be invisible under `masks.visible` on those rows,
and the whole model's loss and gradients must not depend on which path ran.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tv2tv_jax import attention, flow, losses, masks, synthetic, train_step
from tv2tv_jax.attention import reference
from tv2tv_jax.config import LAYOUTS, ModelConfig, SequenceConfig
from tv2tv_jax.model import TV2TV

# n = 4 tokens per copy; 5 clean copies but 4 noisy ones, so a row with a given first
# frame is the only way to fill the clean region.
MODEL = ModelConfig(latent_shape=(4, 4, 4), patch_size=2)
SEQ = SequenceConfig(text_len=40, max_chunks=5, noisy_chunks=4)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _regions(batch, n):
  return masks.Regions(text=batch["text_tokens"].shape[1],
                       noisy=batch["noisy_valid"].shape[1] * n, block=n)


def _cfg_drop(batch, drop_copies, n):
  """bool[B, L]: the per-token flags `losses.model_inputs` builds from per-copy ones."""
  b, t = batch["text_tokens"].shape
  noisy = np.repeat(drop_copies & batch["noisy_valid"], n, axis=1)
  return np.concatenate([np.zeros((b, t), bool), noisy,
                         np.zeros((b, batch["clean_valid"].shape[1] * n), bool)], axis=1)


def _batch(layout, seed=0, rows=3):
  batch = synthetic.random_batch(seed, SEQ, MODEL, rows, layout=layout,
                                 max_examples_per_row=3, max_text_len=3)
  drop = np.random.default_rng(seed + 1).random(batch["noisy_valid"].shape) < 0.5
  meta = masks.SeqMeta.from_batch(batch, cfg_drop=_cfg_drop(batch, drop, MODEL.tokens_per_chunk))
  # What the case is meant to cover is there: packing, padding, a given first frame with
  # no noisy twin, and a drop flag that hides something.
  seg = batch["segment_ids"]
  assert seg.max() >= 2 and (seg == 0).any()
  assert (batch["clean_valid"].sum(1) > batch["noisy_valid"].sum(1)).any()
  no_drop = masks.SeqMeta.from_batch(batch)
  assert (np.asarray(masks.dense_mask(meta)) != np.asarray(masks.dense_mask(no_drop))).any()
  return batch, meta


@functools.partial(jax.jit, static_argnums=5)
def _both_paths(q, k, v, do, meta, regions):
  """(out, dq, dk, dv) of the region path and of the dense path."""
  def run(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))
  return (run(lambda q, k, v: reference.region_attention(q, k, v, meta, regions)),
          run(lambda q, k, v: reference.reference_attention(q, k, v, meta)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_region_attention_equals_dense(layout):
  batch, meta = _batch(layout, seed=LAYOUTS.index(layout))
  regions = _regions(batch, MODEL.tokens_per_chunk)
  b, length = meta.segment_ids.shape
  keys = jax.random.split(jax.random.key(7), 4)
  h, hkv, dh = 4, 2, 16  # grouped-query heads
  q, do = (jax.random.normal(kk, (b, length, h, dh)) for kk in keys[:2])
  k, v = (jax.random.normal(kk, (b, length, hkv, dh)) for kk in keys[2:])
  got, want = _both_paths(q, k, v, do, meta, regions)
  assert got[0].shape == (b, length, h, dh) and got[0].dtype == q.dtype
  assert _rel(got[0], want[0]) < 1e-6
  for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
    assert _rel(g, w) < 1e-5, name
  # Padding rows of the output (a padding slot attends to itself) match too, exactly
  # where the dense path gives exact values.
  pad = np.asarray(batch["segment_ids"]) == 0
  np.testing.assert_allclose(np.asarray(got[0])[pad], np.asarray(want[0])[pad], atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_skipped_pairs_are_never_visible(layout):
  batch, meta = _batch(layout, seed=10 + LAYOUTS.index(layout))
  regions = _regions(batch, MODEL.tokens_per_chunk)
  length = meta.segment_ids.shape[1]
  assert not bool(masks.skipped_pairs_visible(meta, regions))
  # The same through the dense oracle, and the formula of the skipped share.
  skipped = regions.skipped_pairs(length)
  assert not (np.asarray(masks.dense_mask(meta)) & skipped[None]).any()
  assert skipped.sum() == regions.skipped_count(length)
  assert regions.skipped_fraction(length) == pytest.approx(skipped.mean())


def test_the_check_sees_a_layout_that_breaks_the_guarantee():
  batch, meta = _batch("tv2tv", seed=4)  # a row with two chunks in one example
  regions = _regions(batch, MODEL.tokens_per_chunk)
  n, t = MODEL.tokens_per_chunk, regions.text
  clean0 = t + regions.noisy  # first clean copy's slots share noisy copy 0's chunk id
  chunk = np.array(batch["chunk_ids"])
  assert batch["noisy_valid"][0, 0] and batch["clean_valid"][0, 0]
  chunk[0, clean0:clean0 + n] = chunk[0, t]
  assert bool(masks.skipped_pairs_visible(meta.replace(chunk_ids=jnp.asarray(chunk)), regions))
  # A noisy copy given the chunk id of the next one (same example): visible across blocks.
  valid = batch["noisy_valid"]
  seg = batch["segment_ids"][:, t::n][:, :valid.shape[1]]
  pairs = valid[:, :-1] & valid[:, 1:] & (seg[:, :-1] == seg[:, 1:])
  row, j = (int(i[0]) for i in np.nonzero(pairs))
  chunk = np.array(batch["chunk_ids"])
  chunk[row, t + (j + 1) * n:t + (j + 2) * n] = chunk[row, t + j * n]
  broken = meta.replace(chunk_ids=jnp.asarray(chunk))
  assert bool(masks.skipped_pairs_visible(broken, regions))


def test_profiled_shape_skips_about_forty_percent():
  # T = 96 text slots, Kn = K = 16 copies of n = 16 tokens: Kn·n·(L − n) / L².
  regions = masks.Regions(text=96, noisy=16 * 16, block=16)
  length = 96 + 32 * 16
  assert regions.skipped_fraction(length) == pytest.approx(256 * (length - 16) / length ** 2)
  assert 0.40 < regions.skipped_fraction(length) < 0.42


def test_prepare_plans_regions_for_xla_only():
  batch, meta = _batch("t2v")
  regions = _regions(batch, MODEL.tokens_per_chunk)
  assert attention.prepare(meta, "xla") is None  # no regions: the dense path, as before
  plan = attention.prepare(meta, "xla", regions=regions)
  assert isinstance(plan, attention.RegionPlan) and plan.regions == regions
  assert jax.tree.leaves(plan) == []  # static: broadcasts through nn.scan as a constant
  from tv2tv_jax.attention import kernel_plan
  assert isinstance(attention.prepare(meta, "pallas", regions=regions), kernel_plan.KernelPlan)
  with pytest.raises(ValueError, match="KV cache"):
    attention.prepare(meta.slice(40, 44), "xla", cached=meta.slice(0, 40), regions=regions)
  with pytest.raises(ValueError, match="do not describe"):
    attention.prepare(meta, "xla", regions=dataclasses.replace(regions, block=3))


def _loss_and_grads(exp, model, params, batch, sample):
  fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
  return jax.jit(lambda p: fn(p, model, batch, sample, exp))(params)


def test_model_loss_and_grads_equal_the_dense_path(tiny_exp, monkeypatch):
  # Fewer noisy copies than clean ones (first frames), scanned and remat'd layers.
  exp = dataclasses.replace(
      tiny_exp, seq=dataclasses.replace(tiny_exp.seq, noisy_chunks=3),
      model=dataclasses.replace(tiny_exp.model, attention_impl="xla", scan_layers=True,
                                remat=True))
  batch = synthetic.random_batch(4, exp.seq, exp.model, 2, layout="tv2tv")
  assert (batch["segment_ids"] == 0).any()
  sample = flow.sample_flow(jax.random.key(3), batch["latents"].shape,
                            dataclasses.replace(exp.flow, cfg_drop_prob=0.5),
                            num_noisy=exp.seq.num_noisy)
  assert np.asarray(sample.cfg_drop & batch["noisy_valid"]).any()
  params = train_step.create_train_state(TV2TV(exp.model), exp, jax.random.key(0)).params
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)  # zero-initialised heads would hide a wrong velocity
  calls = []
  real = attention.region_attention
  monkeypatch.setattr(attention, "region_attention",
                      lambda *a: calls.append(1) or real(*a))
  (loss, aux), grads = _loss_and_grads(exp, TV2TV(exp.model), params, batch, sample)
  assert calls, "the model's training forward did not take the region path"
  calls.clear()
  (loss_d, aux_d), grads_d = _loss_and_grads(exp, TV2TV(exp.model, attention_regions=False),
                                             params, batch, sample)
  assert not calls
  assert float(aux["video_mse"]) > 0 and float(aux["text_ce"]) > 0
  np.testing.assert_allclose(float(loss), float(loss_d), rtol=1e-6)
  for key in ("text_ce", "video_mse"):
    np.testing.assert_allclose(float(aux[key]), float(aux_d[key]), rtol=1e-6)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for (path, g), w in zip(flat, jax.tree.leaves(grads_d), strict=True):
    assert _rel(g, w) < 1e-5 or float(jnp.abs(w).max()) < 1e-9, jax.tree_util.keystr(path)
