"""The KV-cached sampler: cache vs from-scratch recompute, masks, interventions, errors."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tv2tv_jax import flow, masks, sequence, train_step
from tv2tv_jax.model import TV2TV
from tv2tv_jax.sampling import decoding, kv_cache, recompute, sampler, window
from tv2tv_jax.sampling.decoding import Request, RequestError, SamplerConfig
import mask_recorder  # CachedBackend recording every pass's attention mask

PROMPT = [5, 6, 7]


def _live_params(model, exp, seed=0):
  """Initial params plus noise everywhere (zero-initialised output convs would make
  every velocity 0 and hide any difference between the paths)."""
  params = train_step.create_train_state(model, exp, jax.random.key(seed)).params
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup(tiny_exp):
  model = TV2TV(tiny_exp.model)
  return tiny_exp, model, _live_params(model, tiny_exp)


def _first_frame(exp, seed=11):
  return np.random.default_rng(seed).standard_normal(exp.model.latent_shape).astype(np.float32)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# Top-k sampling (not greedy) so that the token comparison is a real test of the
# logits; short texts keep the oracle's rows small.
SC = SamplerConfig(steps=3, cfg_scale=2.5, top_k=16, temperature=1.3, max_text_tokens=2)
REQ = Request(prompt=PROMPT, num_chunks=3, interventions={1: [9, 10]}, seed=4)


def _recompute(model, params, exp, req, sc):
  return sampler.generate(recompute.oracle(model, params, exp, layout=sc.layout), req, exp, sc)


def _assert_same(cached, oracle):
  assert cached.transcript == oracle.transcript
  assert cached.stop_reason == oracle.stop_reason
  assert cached.chunks.shape == oracle.chunks.shape and len(cached.chunks) > 0
  assert _rel(cached.chunks, oracle.chunks) < 1e-5


def test_cache_matches_recompute_with_intervention_and_cfg(setup):
  exp, model, params = setup
  req = dataclasses.replace(REQ, first_frame=_first_frame(exp))
  cached = sampler.sample(model, params, exp, req, SC)
  oracle = _recompute(model, params, exp, req, SC)
  _assert_same(cached, oracle)
  assert cached.transcript[1] == {"chunk": 1, "text": [9, 10], "forced": True, "replaced": False}
  assert not cached.transcript[0]["forced"] and cached.transcript[0]["text"]


def test_cached_logits_and_velocity_match_recompute_step_by_step(setup):
  """The outputs themselves (not just the decisions) agree at every query."""
  exp, model, params = setup
  cached = sampler.CachedBackend(model, params, exp)
  oracle = recompute.RecomputeBackend(model, params, exp)
  x = np.random.default_rng(0).standard_normal(exp.model.latent_shape).astype(np.float32)

  def text(tokens, plan):
    cached.append_text([np.asarray(tokens, np.int32)], [plan])
    oracle.append_text(np.asarray(tokens, np.int32), plan)

  text(PROMPT, 0)
  assert _rel(cached.logits()[0], oracle.logits()) < 1e-5
  text([20, 21], 1)
  assert _rel(cached.logits()[0], oracle.logits()) < 1e-5
  text([exp.seq.bof_id], 1)  # BOF_0 carries chunk 0's plan id, as the loop writes it
  v_c, v_o = cached.velocities(x[None], 0.3, 0, 2)[0], oracle.velocities(x, 0.3, 0, 2)
  assert _rel(v_c, v_o) < 1e-5
  # The text drop must matter, or the CFG comparison above proves nothing.
  assert _rel(v_c[0], v_c[1]) > 1e-3
  cached.append_chunk([x], 0)
  oracle.append_chunk(x, 0)
  text([exp.seq.eof_id], 0)
  assert _rel(cached.logits()[0], oracle.logits()) < 1e-5


class Lockstep:
  """Runs every backend call on the cached backend (one row) and on the oracle; returns
  the cached outputs (so the loop follows the cache) and records each output's relative
  error: logits, every velocity along the oracle's ODE path (the cached one-step
  velocity at the same x and t), and the chunk from the cached fused ODE loop."""

  def __init__(self, cached, oracle):
    self.cached, self.oracle, self.errors = cached, oracle, []

  def append_text(self, tokens, plans):
    self.cached.append_text(tokens, plans)
    self.oracle.append_text(tokens[0], plans[0])

  def append_chunk(self, latents, chunk):
    self.cached.append_chunk(latents, chunk)
    self.oracle.append_chunk(latents[0], chunk)

  def logits(self, rows):
    got = self.cached.logits(rows)
    self.errors.append(("logits", _rel(got[0], self.oracle.logits())))
    return got

  def denoise(self, x, chunk, rows, sc, grid):
    reps = 1 if sc.cfg_scale == 1.0 else 2

    def guided(y, t):
      want = self.oracle.velocities(y, t, chunk, reps)
      self.errors.append(("velocity", _rel(self.cached.velocities(y[None], t, chunk,
                                                                   reps)[0], want)))
      return flow.guided_velocity(want, sc.cfg_scale)

    y = jnp.asarray(x[0])
    for t0, t1 in zip(grid[:-1], grid[1:]):
      y = flow.ode_step(guided, y, float(t0), float(t1), sc.solver)
    got = self.cached.denoise(x, chunk, rows, sc, grid)
    self.errors.append(("chunk", _rel(got[0], y)))
    return got


def test_every_logit_and_velocity_matches_recompute_along_a_generation(setup):
  exp, model, params = setup
  req = dataclasses.replace(REQ, first_frame=_first_frame(exp))
  both = Lockstep(sampler.CachedBackend(model, params, exp),
                  recompute.RecomputeBackend(model, params, exp))
  gen = sampler.generate(both, req, exp, SC)
  kinds = {k for k, _ in both.errors}
  worst = max(e for _, e in both.errors)
  assert kinds == {"logits", "velocity", "chunk"} and worst < 1e-5, worst
  assert len([k for k, _ in both.errors if k == "velocity"]) == SC.steps * len(gen.chunks)
  json.dumps(gen.to_json())  # the transcript is plain JSON


def test_unrolled_params_and_heun_match_scanned_recompute(setup):
  """The cached forward reads unrolled stacks too: same generation as the scanned oracle."""
  exp, model, params = setup
  exp_u = dataclasses.replace(exp, model=dataclasses.replace(exp.model, scan_layers=False))
  layers = params["stack"]["layers"]
  stack_u = {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], layers)
             for i in range(exp.model.num_layers)}
  params_u = dict(params, stack=stack_u)
  sc = dataclasses.replace(SC, solver="heun", steps=2, cfg_scale=1.0)
  req = dataclasses.replace(REQ, num_chunks=2)
  cached = sampler.sample(TV2TV(exp_u.model), params_u, exp_u, req, sc)
  _assert_same(cached, _recompute(model, params, exp, req, sc))


def test_t2v_layout_matches_recompute(setup):
  exp, model, params = setup
  sc = dataclasses.replace(SC, layout="t2v")
  req = Request(prompt=PROMPT, num_chunks=2, first_frame=_first_frame(exp), seed=1)
  cached = sampler.sample(model, params, exp, req, sc)
  _assert_same(cached, _recompute(model, params, exp, req, sc))
  assert all(t["text"] == [] for t in cached.transcript)


THINK2V = dataclasses.replace(SC, layout="think2v")


def test_think2v_sampled_plan_matches_recompute_in_a_batch(setup):
  """Think2V: the plan written item by item (items 0 and 2 of row 0 sampled after the
  forced item 1; row 1 forces an empty item 0 and samples item 1), each closed by EOF,
  then the chunks (CFG drops each chunk's own item and its BOF); chunk 1 of row 0
  replaced by a given latent. Two rows of one cached batch vs two recompute oracles:
  same tokens, latents within 1e-5."""
  exp, model, params = setup
  given = np.random.default_rng(3).standard_normal(exp.model.latent_shape).astype(np.float32)
  reqs = [Request(prompt=PROMPT, num_chunks=3, first_frame=_first_frame(exp), seed=2,
                  interventions={1: [20, 21]}, replacements={1: given}),
          Request(prompt=[8, 9], num_chunks=2, seed=5, interventions={0: []})]
  cached = sampler.generate_batch(sampler.CachedBackend(model, params, exp, batch=2), reqs,
                                  exp, THINK2V)
  oracle = sampler.generate_batch(recompute.oracle(model, params, exp, "think2v", batch=2),
                                  reqs, exp, THINK2V)
  for c, o in zip(cached, oracle):
    _assert_same(c, o)
  a, b = cached
  assert [t["forced"] for t in a.transcript] == [False, True, False]
  assert [t["replaced"] for t in a.transcript] == [False, True, False]
  assert a.transcript[1]["text"] == [20, 21] and a.transcript[0]["text"]
  np.testing.assert_array_equal(a.chunks[1], given)
  assert [t["forced"] for t in b.transcript] == [True, False]
  assert b.transcript[0]["text"] == [] and b.transcript[1]["text"]
  assert [len(t) for t in a.texts] == [len(t["text"]) for t in a.transcript]
  assert a.stop_reason == b.stop_reason == "chunk_budget"


def test_think2v_intervention_at_item_k_keeps_the_items_before_k(setup):
  """Forcing plan item 1: item 0 is the free run's (same seed), item 1 is the forced text,
  and the items after it are sampled again (conditioned on it)."""
  exp, model, params = setup
  req = Request(prompt=PROMPT, num_chunks=3, first_frame=_first_frame(exp), seed=6)
  free = sampler.sample(model, params, exp, req, THINK2V)
  forced = [40, 41, 42]
  assert free.transcript[1]["text"] != forced
  got = sampler.sample(model, params, exp, dataclasses.replace(req, interventions={1: forced}),
                       THINK2V)
  assert got.transcript[0] == free.transcript[0]
  assert got.transcript[1]["text"] == forced and got.transcript[1]["forced"]
  np.testing.assert_array_equal(got.texts[1], forced)
  assert not got.transcript[2]["forced"] and len(got.chunks) == 3


def _generate_recorded(model, params, exp, req, sc):
  backend = mask_recorder.RecordingBackend(model, params, exp)
  return backend, sampler.generate(backend, req, exp, sc)


def test_noisy_chunk_never_enters_the_cache(setup):
  exp, model, params = setup
  req = dataclasses.replace(REQ, first_frame=_first_frame(exp))
  backend, gen = _generate_recorded(model, params, exp, req, SC)
  n = exp.model.tokens_per_chunk
  used = int(backend.cache.length[0])
  assert used == backend.used[0]
  modality = np.asarray(backend.cache.meta.modality[0])
  n_text = len(PROMPT) + 1 + sum(len(t) + 2 for t in gen.texts)  # first-frame EOF; BOF, EOF
  assert used == n_text + n * (len(gen.chunks) + 1)  # clean chunks and the first frame
  assert np.sum(modality == sequence.TEXT) == n_text
  assert np.sum(modality == sequence.CLEAN) == n * (len(gen.chunks) + 1)
  assert not np.any(modality == sequence.NOISY) and np.all(modality[used:] == sequence.PAD)
  noisy = [r for r in backend.records if r["kind"] == "noisy"]
  assert len(noisy) == len(gen.chunks)  # one fused ODE loop per chunk
  for rec in backend.records:
    assert not np.any(rec["k_modality"] == sequence.NOISY)


def test_sampling_mask_equals_oracle_mask_of_final_sequence(setup):
  exp, model, params = setup
  req = dataclasses.replace(REQ, first_frame=_first_frame(exp))
  backend, gen = _generate_recorded(model, params, exp, req, SC)
  ex = sequence.Example(prompt=np.asarray(PROMPT, np.int32), chunk_texts=gen.texts,
                        latents=np.concatenate([req.first_frame[None], gen.chunks]),
                        first_frame=True)
  row = sequence.pack_row([sequence.layout_example(ex, exp.seq, exp.model)], exp.seq, exp.model)
  batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
  noisy_slots = row["modality"] == sequence.NOISY
  oracle = {drop: np.asarray(masks.dense_mask(masks.SeqMeta.from_batch(
      batch, cfg_drop=(noisy_slots & drop)[None])))[0] for drop in (False, True)}
  slot_of = {int(o): s for s, o in enumerate(row["order"]) if row["segment_ids"][s] == 1}
  kinds = set()
  for rec in backend.records:
    assert not rec["unused_visible"]
    q = [slot_of[int(o)] for o in rec["q_order"]]
    k = [slot_of[int(o)] for o in rec["k_order"]]
    for r, drop in enumerate(rec["drop"]):
      np.testing.assert_array_equal(rec["mask"][r], oracle[bool(drop)][np.ix_(q, k)])
      kinds.add((rec["kind"], bool(drop)))
  assert kinds == {("text", False), ("clean", False), ("noisy", False), ("noisy", True)}


def test_intervention_at_chunk_i_changes_nothing_before_i(setup):
  exp, model, params = setup
  base = sampler.sample(model, params, exp, dataclasses.replace(REQ, interventions={}), SC)
  forced = [40, 41]
  assert base.transcript[2]["text"] != forced
  changed = sampler.sample(model, params, exp,
                           dataclasses.replace(REQ, interventions={2: forced}), SC)
  assert changed.transcript[:2] == base.transcript[:2]
  np.testing.assert_array_equal(changed.chunks[:2], base.chunks[:2])
  assert changed.transcript[2] == {"chunk": 2, "text": forced, "forced": True, "replaced": False}
  assert _rel(changed.chunks[2], base.chunks[2]) > 1e-4  # the forced text mattered


class _Probe:
  """A CachedBackend whose `denoise` of chunk `chunk` first records both CFG branches'
  velocities (`velocities`, reps=2: row 0 conditional, row 1 dropped) at a fixed (x, t)."""

  def __init__(self, cached, chunk, x, t):
    self.cached, self.chunk, self.x, self.t, self.v = cached, chunk, x, t, None

  def __getattr__(self, name):
    return getattr(self.cached, name)

  def denoise(self, x, chunk, rows, sc, grid):
    if chunk == self.chunk:
      self.v = np.asarray(self.cached.velocities(self.x[None], self.t, chunk, 2)[0])
    return self.cached.denoise(x, chunk, rows, sc, grid)


def test_dropped_branch_is_blind_to_its_chunk_text_in_the_cache(setup):
  """TV2TV through the KV-cached loop: the dropped branch of chunk 1 (which sees neither
  text_1 nor the BOF the loop writes after it) is bit-identical whatever text_1 says;
  the conditional branch moves."""
  exp, model, params = setup
  x = np.random.default_rng(4).standard_normal(exp.model.latent_shape).astype(np.float32)
  v = []
  for text_1 in ([30, 31], [50, 51]):  # same length: positions after it stay the same
    probe = _Probe(sampler.CachedBackend(model, params, exp), 1, x, 0.3)
    req = Request(prompt=PROMPT, num_chunks=2, first_frame=_first_frame(exp), seed=3,
                  interventions={0: [20, 21], 1: text_1})
    sampler.generate(probe, req, exp, SC)
    v.append(probe.v)
  np.testing.assert_array_equal(v[0][1], v[1][1])
  assert _rel(v[0][0], v[1][0]) > 1e-3


def test_determinism(setup):
  exp, model, params = setup
  req = dataclasses.replace(REQ, num_chunks=2)
  a = sampler.sample(model, params, exp, req, SC)
  b = sampler.sample(model, params, exp, req, SC)
  assert a.transcript == b.transcript
  np.testing.assert_array_equal(a.chunks, b.chunks)
  c = sampler.sample(model, params, exp, dataclasses.replace(req, seed=req.seed + 1), SC)
  assert not np.allclose(a.chunks, c.chunks)


@pytest.mark.parametrize("change, field", [
    (dict(interventions={3: [9]}), "interventions[3]"),
    (dict(interventions={-1: [9]}), "interventions[-1]"),
    (dict(prompt=[5, 128]), "prompt[1]"),
    (dict(prompt=[5, -2]), "prompt[1]"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[5, 1]), "prompt[1]"),  # BOF inside the prompt
    (dict(interventions={0: [9, 500]}), "interventions[0][1]"),
    (dict(first_frame=np.zeros((4, 4, 3), np.float32)), "first_frame"),
    (dict(first_frame=np.full((4, 4, 4), np.nan, np.float32)), "first_frame"),
    (dict(num_chunks=0), "num_chunks"),
    (dict(replacements={0: np.zeros((4, 4), np.float32)}), "replacements[0]"),
    (dict(replacements={5: np.zeros((4, 4, 4), np.float32)}), "replacements[5]"),
])
def test_bad_requests_name_the_field(setup, change, field):
  exp, model, params = setup
  with pytest.raises(RequestError, match="^" + re.escape(field)):
    sampler.sample(model, params, exp, dataclasses.replace(REQ, **change), SC)


@pytest.mark.parametrize("change, field", [
    (dict(steps=0), "steps"), (dict(solver="rk4"), "solver"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=1000), "top_k"), (dict(temperature=0.0), "temperature"),
    (dict(layout="think3v"), "layout"),
])
def test_bad_sampler_config_names_the_field(setup, change, field):
  exp, model, params = setup
  with pytest.raises(RequestError, match=f"SamplerConfig.{field} "):
    sampler.sample(model, params, exp, REQ, dataclasses.replace(SC, **change))


def test_cache_full_is_a_clear_error(setup):
  exp, model, params = setup
  with pytest.raises(sampler.CacheFullError, match="KV cache full"):
    sampler.sample(model, params, exp, REQ, dataclasses.replace(SC, capacity=12))


# ----------------------------------------------------------------------------------
# The shared loop and decoding rules, on a scripted backend (no model).


class ScriptedBackend:
  """Logits from a script (one f32[V] per query, last repeated); velocity = a constant."""

  def __init__(self, logits, vel=None):
    self.script, self.queries, self.appended = list(logits), 0, []
    self.vel = vel

  def append_text(self, tokens, plan):
    self.appended.append(("text", [int(t) for t in tokens], plan))

  def logits(self):
    out = self.script[min(self.queries, len(self.script) - 1)]
    self.queries += 1
    return jnp.asarray(out)

  def velocities(self, x, t, chunk, reps):
    return jnp.stack([self.vel(x, t), -self.vel(x, t)][:reps])

  def append_chunk(self, latent, chunk):
    self.appended.append(("chunk", chunk))


def _one_hot(exp, tok, value=20.0):
  return np.eye(exp.model.vocab_size, dtype=np.float32)[tok] * value


def test_text_stops_at_bof_and_eos_and_budget(tiny_exp):
  exp, seq = tiny_exp, tiny_exp.seq
  const = lambda x, t: jnp.ones_like(x)
  sc = SamplerConfig(steps=4, greedy=True, max_text_tokens=3)
  # Two tokens, then BOF: chunk 0 gets text [30, 31]; then EOS ends generation.
  b = ScriptedBackend([_one_hot(exp, 30), _one_hot(exp, 31), _one_hot(exp, seq.bof_id),
                       _one_hot(exp, seq.eos_id)], const)
  g = sampler.generate(sampler.RowwiseBackend([b]), Request(prompt=PROMPT, num_chunks=3),
                       exp, sc)
  assert g.transcript == [{"chunk": 0, "text": [30, 31], "forced": False, "replaced": False}]
  assert g.stop_reason == "eos" and len(g.chunks) == 1
  # Euler on a constant velocity 1 from t=0 to 1 moves x_0 by exactly 1.
  x0 = decoding.chunk_noise(0, 0, exp.model.latent_shape)
  np.testing.assert_allclose(g.chunks[0], np.asarray(x0) + 1.0, rtol=0, atol=1e-5)
  assert b.appended[-2:] == [("chunk", 0), ("text", [seq.eof_id], 0)]
  # A model that never emits BOF is cut at the budget and BOF is forced.
  b = ScriptedBackend([_one_hot(exp, 30)], const)
  g = sampler.generate(sampler.RowwiseBackend([b]), Request(prompt=PROMPT, num_chunks=2),
                       exp, sc)
  assert [t["text"] for t in g.transcript] == [[30, 30, 30]] * 2
  assert g.stop_reason == "chunk_budget"
  assert ("text", [seq.bof_id], 1) in b.appended  # BOF_0 carries chunk 0's plan id


def test_think2v_plan_items_end_at_eof_or_budget_on_scripted_rows(tiny_exp):
  """Think2V plan: a sampled item ends at EOF, or at the budget (EOF forced); BOF and EOS
  are never drawn there; a forced item is written with its plan id; each item is closed
  by EOF, then BOF (plan id i + 1) · chunk · EOF per chunk. Two rows with different
  token counts per item, run together, match their own runs call for call."""
  exp, seq = tiny_exp, tiny_exp.seq
  E, B = seq.eof_id, seq.bof_id
  const = lambda x, t: jnp.ones_like(x)
  sc = SamplerConfig(steps=2, greedy=True, max_text_tokens=3, layout="think2v")
  # BOF and EOS dominate but are banned in the plan: 33 is drawn instead.
  spiky = _one_hot(exp, B) + _one_hot(exp, seq.eos_id) + _one_hot(exp, 33, 10.0)
  scripts = [[_one_hot(exp, 30), _one_hot(exp, E), spiky],
             [_one_hot(exp, 31), _one_hot(exp, 31), _one_hot(exp, E)]]
  reqs = [Request(prompt=PROMPT, num_chunks=3, interventions={1: [40]}),
          Request(prompt=[4], num_chunks=2, seed=1)]
  rows = [ScriptedBackend(sc_, const) for sc_ in scripts]
  together = sampler.generate_batch(sampler.RowwiseBackend(rows), reqs, exp, sc)
  a, b = together
  assert [t["text"] for t in a.transcript] == [[30], [40], [33, 33, 33]]
  assert [t["forced"] for t in a.transcript] == [False, True, False]
  assert [t["text"] for t in b.transcript] == [[31, 31], []]
  assert a.stop_reason == b.stop_reason == "chunk_budget" and len(a.chunks) == 3
  assert rows[0].appended == [
      ("text", PROMPT, 0), ("text", [30], 1), ("text", [E], 0), ("text", [40], 2),
      ("text", [E], 0), ("text", [33], 3), ("text", [33], 3), ("text", [33], 3),
      ("text", [E], 0),
      ("text", [B], 1), ("chunk", 0), ("text", [E], 0), ("text", [B], 2), ("chunk", 1),
      ("text", [E], 0), ("text", [B], 3), ("chunk", 2), ("text", [E], 0)]
  for script, req, got, row in zip(scripts, reqs, together, rows):
    alone = ScriptedBackend(script, const)
    want = sampler.generate(sampler.RowwiseBackend([alone]), req, exp, sc)
    assert got.transcript == want.transcript
    np.testing.assert_array_equal(got.chunks, want.chunks)
    assert row.appended == alone.appended


def test_cfg_combination_and_heun(tiny_exp):
  exp = tiny_exp
  # Conditional v_c = x, unconditional v_u = -x: v = v_u + s (v_c - v_u) = (2s - 1) x.
  s = 1.5
  sc = SamplerConfig(steps=8, solver="heun", cfg_scale=s, max_text_tokens=0)
  b = ScriptedBackend([_one_hot(exp, 30)], lambda x, t: x)
  g = sampler.generate(sampler.RowwiseBackend([b]), Request(prompt=PROMPT, num_chunks=1,
                                                            seed=2), exp, sc)
  x0 = np.asarray(decoding.chunk_noise(2, 0, exp.model.latent_shape))
  # Heun on dx/dt = a x with step h multiplies by 1 + a h + (a h)^2 / 2 per step.
  a, h = 2 * s - 1, 1 / 8
  np.testing.assert_allclose(g.chunks[0], x0 * (1 + a * h + (a * h) ** 2 / 2) ** 8, rtol=1e-5)


def test_decoding_rules(tiny_exp):
  exp = tiny_exp
  logits = jnp.asarray(np.random.default_rng(0).standard_normal(exp.model.vocab_size) * 3,
                       jnp.float32)
  banned = (exp.seq.pad_id, exp.seq.eof_id)
  allowed = np.asarray(logits).copy()
  allowed[list(banned)] = -np.inf
  order = np.argsort(-allowed)
  keys = [jax.random.key(i) for i in range(200)]
  greedy = decoding.next_token(logits, keys[0], SamplerConfig(greedy=True), banned)
  assert int(greedy) == order[0]
  for sc, support in [(SamplerConfig(top_k=5), set(order[:5].tolist())),
                      (SamplerConfig(top_k=1), {int(order[0])}),
                      (SamplerConfig(top_p=1e-6), {int(order[0])})]:
    draws = {int(decoding.next_token(logits, k, sc, banned)) for k in keys}
    assert draws <= support and (len(support) == 1 or len(draws) > 1)
  # top_p keeps the smallest prefix with mass >= p.
  probs = np.exp(allowed[order] - allowed[order][0])
  probs /= probs.sum()
  want = int(np.searchsorted(np.cumsum(probs), 0.7) + 1)
  kept = np.isfinite(np.asarray(decoding.filter_logits(logits, SamplerConfig(top_p=0.7),
                                                       banned)))
  assert kept.sum() == want and set(np.nonzero(kept)[0]) == set(order[:want].tolist())
  # Banned ids are never drawn, even when they dominate.
  spiky = logits.at[exp.seq.eof_id].set(100.0)
  assert all(int(decoding.next_token(spiky, k, SamplerConfig(), banned)) != exp.seq.eof_id
             for k in keys[:20])


def test_cache_write_appends_at_length(tiny_exp):
  c = kv_cache.init_cache(tiny_exp.model, 2, 6)
  shape = (tiny_exp.model.num_layers, 2, 2, tiny_exp.model.num_kv_heads,
           tiny_exp.model.head_dim)
  meta = kv_cache.empty_meta(2, 2).replace(segment_ids=jnp.ones((2, 2), jnp.int32),
                                           order=jnp.asarray([[0, 1], [0, 1]]))
  c = kv_cache.write(c, jnp.ones(shape), 2 * jnp.ones(shape), meta)
  meta2 = meta.replace(order=jnp.asarray([[2, 3], [2, 3]]))
  c = kv_cache.write(c, 3 * jnp.ones(shape), 4 * jnp.ones(shape), meta2)
  assert np.asarray(c.length).tolist() == [4, 4]
  np.testing.assert_array_equal(np.asarray(c.k[0, 0, :, 0, 0]), [1, 1, 3, 3, 0, 0])
  np.testing.assert_array_equal(np.asarray(c.meta.order[1]), [0, 1, 2, 3, 0, 0])
  np.testing.assert_array_equal(np.asarray(c.meta.segment_ids[0]), [1, 1, 1, 1, 0, 0])


def test_sliding_window_keeps_prompt_and_matches_recompute_of_the_window(setup):
  """A cache too small for the whole video slides: the prompt and first frame stay, the
  oldest chunks go, and the rebuilt cache gives what recomputing the kept sequence gives."""
  exp, model, params = setup
  n = exp.model.tokens_per_chunk
  sc = dataclasses.replace(SC, sliding_window=True, capacity=28, cfg_scale=1.0)
  req = dataclasses.replace(REQ, first_frame=_first_frame(exp), num_chunks=4, interventions={})
  backend = window.SlidingWindow(lambda: sampler.CachedBackend(model, params, exp, sc.capacity),
                                 exp.seq.eof_id)
  gen = sampler.generate(backend, req, exp, sc)
  assert len(gen.chunks) == 4 and backend.slides and sum(backend.slides) >= 1
  assert int(backend.cache.length[0]) <= sc.capacity
  # The first chunk, made before any slide, is the unwindowed generation's (up to float
  # rounding: the capacity changes how many masked keys the softmax reduces over).
  full = sampler.sample(model, params, exp, req, dataclasses.replace(sc, sliding_window=False,
                                                                    capacity=None))
  assert full.transcript[0] == gen.transcript[0]
  assert _rel(gen.chunks[0], full.chunks[0]) < 1e-5
  # Replay what is kept (prompt, first frame, the last chunks) into the oracle.
  kept = len(gen.chunks) - sum(backend.slides)
  oracle = recompute.RecomputeBackend(model, params, exp)
  oracle.append_text(np.asarray(PROMPT, np.int32), 0)
  oracle.append_chunk(req.first_frame, None)
  oracle.append_text(np.asarray([exp.seq.eof_id], np.int32), 0)
  for j, i in enumerate(range(len(gen.chunks) - kept, len(gen.chunks))):
    if len(gen.texts[i]):
      oracle.append_text(gen.texts[i], j + 1)
    oracle.append_text(np.asarray([exp.seq.bof_id], np.int32), 0)
    oracle.append_chunk(gen.chunks[i], j)
    oracle.append_text(np.asarray([exp.seq.eof_id], np.int32), 0)
  assert backend.used[0] == 3 + n + 1 + sum(len(gen.texts[i]) + 2 + n
                                     for i in range(len(gen.chunks) - kept, len(gen.chunks)))
  assert _rel(backend.logits()[0], oracle.logits()) < 1e-5
  # Too small for even the prompt, first frame and one chunk: a clear error.
  with pytest.raises(sampler.CacheFullError, match="even after dropping"):
    sampler.sample(model, params, exp, req, dataclasses.replace(sc, capacity=10))


@pytest.mark.slow  # Pallas interpret mode on CPU: ~10 s on top of the default tier
def test_pallas_decode_path_matches_xla(setup):
  """attention_impl='pallas' routes the cached forward through the decode kernel
  (interpret mode on CPU): same velocity and logits as the XLA path."""
  exp, model, params = setup
  exp_p = dataclasses.replace(exp, model=dataclasses.replace(exp.model, attention_impl="pallas"))
  x = np.random.default_rng(5).standard_normal(exp.model.latent_shape).astype(np.float32)
  outs = []
  for e in (exp, exp_p):
    b = sampler.CachedBackend(TV2TV(e.model), params, e)
    b.append_text([np.asarray(PROMPT + [20, exp.seq.bof_id], np.int32)], [1])
    outs.append((b.velocities(x[None], 0.4, 0, 2), b.logits()))
  assert _rel(outs[1][0], outs[0][0]) < 1e-5 and _rel(outs[1][1], outs[0][1]) < 1e-5


# ----------------------------------------------------------------------------------
# Batched sampling: several requests as the rows of one cache.


def test_batch_equals_each_request_alone(setup):
  """Three requests of different prompt lengths, first frame or not, interventions,
  seeds and chunk budgets, generated together: each row is what that request gives
  alone (same tokens, latents rel. < 1e-5)."""
  exp, model, params = setup
  reqs = [dataclasses.replace(REQ, first_frame=_first_frame(exp)),
          Request(prompt=[8, 9, 10, 11, 12], num_chunks=2, seed=9, interventions={0: [30]}),
          Request(prompt=[13], num_chunks=3, seed=4, first_frame=_first_frame(exp, 3),
                  interventions={2: []})]
  together = sampler.sample(model, params, exp, reqs, SC)
  assert len(together) == 3
  for req, got in zip(reqs, together):
    _assert_same(got, sampler.sample(model, params, exp, req, SC))
  assert [len(g.chunks) for g in together] == [3, 2, 3]
  # The rows really differ (a batch of copies would pass the check above too).
  assert together[0].transcript != together[2].transcript


def test_batch_with_eos_and_budget_on_scripted_rows(tiny_exp):
  """A row that stops at EOS, one cut by its text budget and one with forced text run
  together; each matches its own run, and the finished row writes nothing more."""
  exp, seq = tiny_exp, tiny_exp.seq
  const = lambda x, t: jnp.ones_like(x)
  sc = SamplerConfig(steps=2, greedy=True, max_text_tokens=2)
  scripts = [[_one_hot(exp, 30), _one_hot(exp, seq.bof_id), _one_hot(exp, seq.eos_id)],
             [_one_hot(exp, 31)],
             [_one_hot(exp, 32), _one_hot(exp, seq.bof_id)]]
  reqs = [Request(prompt=PROMPT, num_chunks=3, seed=0),
          Request(prompt=PROMPT, num_chunks=2, seed=1),
          Request(prompt=[4], num_chunks=3, seed=2, interventions={1: [40, 41, 42]})]
  rows = [ScriptedBackend(s, const) for s in scripts]
  together = sampler.generate_batch(sampler.RowwiseBackend(rows), reqs, exp, sc)
  for script, req, got, row in zip(scripts, reqs, together, rows):
    alone = ScriptedBackend(script, const)
    want = sampler.generate(sampler.RowwiseBackend([alone]), req, exp, sc)
    assert got.transcript == want.transcript and got.stop_reason == want.stop_reason
    np.testing.assert_array_equal(got.chunks, want.chunks)
    assert row.appended == alone.appended
  assert together[0].stop_reason == "eos" and len(together[0].chunks) == 1
  assert [t["text"] for t in together[1].transcript] == [[31, 31], [31, 31]]
  assert together[2].transcript[1]["text"] == [40, 41, 42]


def test_batched_request_errors_name_the_row(setup):
  exp, model, params = setup
  bad = dataclasses.replace(REQ, prompt=[5, 500])
  with pytest.raises(RequestError, match=re.escape("requests[1].prompt[1]")):
    sampler.sample(model, params, exp, [REQ, bad], SC)
  with pytest.raises(RequestError, match="sliding_window"):
    sampler.sample(model, params, exp, [REQ, REQ], dataclasses.replace(SC, sliding_window=True))


def test_cache_write_skips_padding_past_count(tiny_exp):
  c = kv_cache.init_cache(tiny_exp.model, 2, 5)
  shape = (tiny_exp.model.num_layers, 2, 3, tiny_exp.model.num_kv_heads,
           tiny_exp.model.head_dim)
  meta = kv_cache.empty_meta(2, 3).replace(segment_ids=jnp.ones((2, 3), jnp.int32))
  c = kv_cache.write(c, jnp.ones(shape), jnp.ones(shape), meta, jnp.asarray([3, 1]))
  c = kv_cache.write(c, 2 * jnp.ones(shape), 2 * jnp.ones(shape), meta, jnp.asarray([0, 2]))
  assert np.asarray(c.length).tolist() == [3, 3]
  np.testing.assert_array_equal(np.asarray(c.k[0, :, :, 0, 0]), [[1, 1, 1, 0, 0],
                                                                 [1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(np.asarray(c.meta.segment_ids), [[1, 1, 1, 0, 0],
                                                                 [1, 1, 1, 0, 0]])
  # A write past the capacity is dropped, never clamped onto earlier slots.
  c = kv_cache.write(c, 3 * jnp.ones(shape), 3 * jnp.ones(shape), meta, jnp.asarray([3, 0]))
  np.testing.assert_array_equal(np.asarray(c.k[0, 0, :, 0, 0]), [1, 1, 1, 3, 3])


def test_cache_applies_llama3_rope_scaling(setup):
  """A model with Llama-3.1 RoPE scaling: the cached forward rotates with the scaled
  frequencies too (same logits and velocities as the oracle, different from plain RoPE)."""
  exp, _, params = setup
  # Scaled bands at the tiny head_dim 16 with positions up to ~30: original context 8.
  scaled = dataclasses.replace(exp.model, rope_type="llama3", rope_factor=8.0,
                               rope_original_max_position_embeddings=8, rope_theta=100.0)
  exp_s = dataclasses.replace(exp, model=scaled)
  model_s = TV2TV(scaled)
  outs = {}
  for name, (e, m) in {"scaled": (exp_s, model_s),
                       "plain": (dataclasses.replace(exp, model=dataclasses.replace(
                           scaled, rope_type="default", rope_factor=1.0,
                           rope_original_max_position_embeddings=8192)), None)}.items():
    m = m or TV2TV(e.model)
    cached = sampler.CachedBackend(m, params, e)
    oracle = recompute.RecomputeBackend(m, params, e)
    for tokens, plan in ((PROMPT + [20, 21, 22, 23, 24, 25], 0), ([30], 1),
                         ([exp.seq.bof_id], 1)):
      cached.append_text([np.asarray(tokens, np.int32)], [plan])
      oracle.append_text(np.asarray(tokens, np.int32), plan)
    x = np.random.default_rng(2).standard_normal(exp.model.latent_shape).astype(np.float32)
    outs[name] = (cached.logits()[0], cached.velocities(x[None], 0.5, 0, 1)[0])
    assert _rel(outs[name][0], oracle.logits()) < 1e-5
    assert _rel(outs[name][1], oracle.velocities(x, 0.5, 0, 1)) < 1e-5
  assert _rel(outs["scaled"][0], outs["plain"][0]) > 1e-4  # the scaling is in effect
