"""The model itself: information flow follows the mask; routing keeps towers apart."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tv2tv_jax import flops, flow, losses, sequence, synthetic, train_step
from tv2tv_jax.model import TV2TV
from tv2tv_jax.sequence import TEXT


def _live_params(model, exp, seed=0):
  """Initial params plus noise everywhere: zero-initialised output layers would make
  every velocity 0 and hide any leak."""
  params = train_step.create_train_state(model, exp, jax.random.key(seed)).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _two_example_batch(exp):
  seq, model = exp.seq, exp.model
  rng = np.random.default_rng(7)
  exs = [sequence.layout_example(synthetic.random_example(
      rng, seq, model, num_chunks=chunks, first_frame=ff, prompt_len=3, max_text_len=2,
      name=f"ex{i}"), seq, model) for i, (chunks, ff) in enumerate([(2, True), (1, False)])]
  return sequence.pack_rows([exs], seq, model)


@pytest.fixture(scope="module")
def setup(tiny_exp):
  model = TV2TV(tiny_exp.model)
  params = _live_params(model, tiny_exp)
  batch = _two_example_batch(tiny_exp)
  sample = flow.sample_flow(jax.random.key(3), batch["latents"].shape, tiny_exp.flow)
  sample = sample.replace(cfg_drop=jnp.zeros_like(sample.cfg_drop))
  kwargs, _ = losses.model_inputs(batch, sample, tiny_exp.model.tokens_per_chunk)
  kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
  apply = jax.jit(lambda kw: model.apply({"params": params}, **kw))
  return tiny_exp, batch, kwargs, apply


def _outputs_by_slot(exp, batch, logits, velocity):
  """Per logical item: ('text', slot) -> logits row; ('noisy', copy) -> velocity."""
  out = {}
  for s in np.nonzero(batch["modality"][0][:exp.seq.text_len] == TEXT)[0]:
    out[("text", s)] = np.asarray(logits[0, s])
  for j in np.nonzero(batch["noisy_valid"][0])[0]:
    out[("noisy", j)] = np.asarray(velocity[0, j])
  return out


def _info(exp, batch, key):
  """(segment, order) of a logical item."""
  kind, idx = key
  T, n = exp.seq.text_len, exp.model.tokens_per_chunk
  slot = idx if kind == "text" else T + idx * n
  return batch["segment_ids"][0, slot], batch["order"][0, slot]


def _changed(a, b):
  return {k for k in a if not np.allclose(a[k], b[k], rtol=0, atol=1e-6)}


def test_noisy_chunk_contents_reach_nothing_else(setup):
  exp, batch, kwargs, apply = setup
  base = _outputs_by_slot(exp, batch, *apply(kwargs))
  for j in np.nonzero(batch["noisy_valid"][0])[0]:
    kw = dict(kwargs, noisy_latents=kwargs["noisy_latents"].at[0, j].add(3.0),
              noisy_t=kwargs["noisy_t"].at[0, j].set(0.5))
    moved = _changed(base, _outputs_by_slot(exp, batch, *apply(kw)))
    assert moved == {("noisy", j)}


def test_later_text_does_not_change_earlier_outputs(setup):
  exp, batch, kwargs, apply = setup
  base = _outputs_by_slot(exp, batch, *apply(kwargs))
  text_slots = np.nonzero(batch["modality"][0][:exp.seq.text_len] == TEXT)[0]
  for s in text_slots[::3]:
    tokens = kwargs["text_tokens"].at[0, s].set((kwargs["text_tokens"][0, s] + 17) % 100 + 5)
    moved = _changed(base, _outputs_by_slot(exp, batch, *apply(dict(kwargs,
                                                                    text_tokens=tokens))))
    seg, order = batch["segment_ids"][0, s], batch["order"][0, s]
    assert ("text", s) in moved
    for key in moved:
      k_seg, k_order = _info(exp, batch, key)
      assert k_seg == seg and k_order >= order, (s, key)


def test_packed_examples_do_not_see_each_other(setup):
  exp, batch, kwargs, apply = setup
  base = _outputs_by_slot(exp, batch, *apply(kwargs))
  T = exp.seq.text_len
  seg2_text = jnp.asarray(batch["segment_ids"][0, :T] == 2)
  seg2_clean = jnp.asarray(batch["clean_valid"][0]) & jnp.asarray(
      batch["segment_ids"][0, T + exp.seq.max_chunks * exp.model.tokens_per_chunk::
                           exp.model.tokens_per_chunk] == 2)
  kw = dict(kwargs,
            text_tokens=kwargs["text_tokens"].at[0].set(
                jnp.where(seg2_text, 50, kwargs["text_tokens"][0])),
            clean_latents=kwargs["clean_latents"].at[0].add(
                jnp.where(seg2_clean[:, None, None, None], 2.0, 0.0)))
  moved = _changed(base, _outputs_by_slot(exp, batch, *apply(kw)))
  assert moved, "changing example 2 changed nothing at all"
  assert {int(_info(exp, batch, key)[0]) for key in moved} == {2}


def _grads(exp, part):
  model = TV2TV(exp.model)
  params = _live_params(model, exp)
  batch = synthetic.random_batch(0, exp.seq, exp.model, 2)
  sample = flow.sample_flow(jax.random.key(1), batch["latents"].shape, exp.flow)
  def loss(p):
    return losses.compute_loss(p, model, batch, sample, exp)[1][part]
  return jax.grad(loss)(params)


def _norm(tree):
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_routing_keeps_gradients_in_their_tower(tiny_exp):
  g_txt = _grads(tiny_exp, "text_ce")
  g_vid = _grads(tiny_exp, "video_mse")
  layers_txt = g_txt["stack"]["layers"]
  layers_vid = g_vid["stack"]["layers"]
  last = lambda tree: jax.tree.map(lambda x: x[-1], tree)
  # The text loss reads only text outputs: the video output head and the video tower's
  # last-layer residual branch (output projection, FFN) cannot affect it.
  assert _norm(g_txt["up"]) == 0 and _norm(g_txt["video_norm"]) == 0
  for name in ("out", "ffn", "ffn_norm"):
    assert _norm(last(layers_txt["video"][name])) == 0, name
  # ...but video K/V feed text queries, so the video tower's attention gets gradient.
  assert _norm(layers_txt["video"]["qkv"]) > 0
  # Symmetrically for the video loss.
  assert _norm(g_vid["lm_head"]) == 0 and _norm(g_vid["text_norm"]) == 0
  for name in ("out", "ffn", "ffn_norm"):
    assert _norm(last(layers_vid["text"][name])) == 0, name
  assert _norm(layers_vid["text"]["qkv"]) > 0 and _norm(g_vid["embed"]) > 0
  # And each loss does train its own tower's last layer.
  assert _norm(last(layers_txt["text"]["ffn"])) > 0
  assert _norm(last(layers_vid["video"]["ffn"])) > 0


def test_step_flops_match_the_routed_count(tiny_exp):
  # Layers unrolled: XLA's cost analysis counts a scanned (while) body only once.
  exp = dataclasses.replace(tiny_exp, model=dataclasses.replace(tiny_exp.model,
                                                                scan_layers=False))
  model = TV2TV(exp.model)
  state = jax.eval_shape(lambda: train_step.create_train_state(model, exp, jax.random.key(0)))
  batch = jax.eval_shape(lambda: train_step.dummy_batch(exp))
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = train_step.make_train_step(model, exp).lower(state, batch, key).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
  routed = flops.train_step_flops(exp, exp.train.batch_size)
  both = flops.train_step_flops(exp, exp.train.batch_size, routed=False)
  assert abs(xla / routed - 1) < 0.15, (xla, routed)
  assert xla < 0.75 * both, (xla, both)


def test_output_shapes(setup):
  exp, batch, kwargs, apply = setup
  logits, velocity = apply(kwargs)
  assert logits.shape == (1, exp.seq.text_len, exp.model.vocab_size)
  assert velocity.shape == (1, exp.seq.max_chunks, *exp.model.latent_shape)
  assert logits.dtype == velocity.dtype == jnp.float32


def test_smaller_noisy_region_gives_the_same_outputs(setup):
  """seq.noisy_chunks < max_chunks only drops noisy padding: a row packed with 3 noisy
  copies (of 4 clean) gives the logits and velocities of the same row packed with 4."""
  exp, batch4, kwargs4, apply = setup
  exp3 = dataclasses.replace(exp, seq=dataclasses.replace(exp.seq, noisy_chunks=3))
  batch3 = _two_example_batch(exp3)
  assert batch3["segment_ids"].shape[1] == exp3.row_len == exp.row_len - exp.model.tokens_per_chunk
  assert batch4["noisy_valid"][0].tolist() == [True, True, True, False]
  sample4 = flow.sample_flow(jax.random.key(3), batch4["latents"].shape, exp.flow)
  sample4 = sample4.replace(cfg_drop=jnp.zeros_like(sample4.cfg_drop))
  sample3 = sample4.replace(noisy_t=sample4.noisy_t[:, :3], noise=sample4.noise[:, :3],
                            cfg_drop=sample4.cfg_drop[:, :3])
  kwargs3, _ = losses.model_inputs(batch3, sample3, exp.model.tokens_per_chunk)
  model3 = TV2TV(exp3.model)
  params = _live_params(model3, exp)
  out3 = model3.apply({"params": params}, **kwargs3)
  out4 = model3.apply({"params": params}, **kwargs4)
  np.testing.assert_allclose(out3[0], out4[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out3[1], out4[1][:, :3], rtol=1e-5, atol=1e-5)
  # And the losses the trainer reports.
  l3, m3 = losses.compute_loss(params, model3, batch3, sample3, exp3)
  l4, m4 = losses.compute_loss(params, model3, batch4, sample4, exp)
  np.testing.assert_allclose(l3, l4, rtol=1e-5)


def _rows_with_text(exp, text_1, layout="tv2tv"):
  """One example (first frame, 3 chunks) laid out twice in a batch of 2, with text_1 set."""
  rng = np.random.default_rng(5)
  ex = synthetic.random_example(rng, exp.seq, exp.model, num_chunks=3, first_frame=True)
  ex = dataclasses.replace(ex, chunk_texts=[np.array([20, 21]), np.asarray(text_1),
                                            np.array([40])])
  laid = sequence.layout_example(ex, exp.seq, exp.model, layout)
  return sequence.pack_rows([[laid], [laid]], exp.seq, exp.model)


def test_dropped_branch_is_blind_to_its_chunk_text(tiny_exp):
  """TV2TV, training forward (dense mask, XLA attention): the velocity of noisy chunk 1
  with its plan dropped (`cfg_drop`, row 1) is bit-identical whatever text_1 says, since
  it sees neither text_1 nor the BOF that closes it; the conditional one (row 0) moves."""
  exp = tiny_exp
  assert exp.model.attention_impl == "xla"
  model = TV2TV(exp.model)
  params = _live_params(model, exp)
  apply = jax.jit(lambda kw: model.apply({"params": params}, **kw))
  vel = []
  # Same length: the length of a dropped text still shows in later RoPE positions.
  for text_1 in ([30, 31], [50, 51]):
    batch = _rows_with_text(exp, text_1)
    sample = flow.sample_flow(jax.random.key(3), batch["latents"].shape, exp.flow)
    drop = np.zeros(sample.cfg_drop.shape, bool)
    drop[1, 1] = True  # row 1: noisy copy 1 (chunk 1) is the unconditional branch
    kwargs, _ = losses.model_inputs(batch, sample.replace(cfg_drop=jnp.asarray(drop)),
                                    exp.model.tokens_per_chunk)
    vel.append(np.asarray(apply(kwargs)[1][:, 1]))
  np.testing.assert_array_equal(vel[0][1], vel[1][1])
  assert np.abs(vel[0][0] - vel[1][0]).max() > 1e-2  # the text matters when it is seen
