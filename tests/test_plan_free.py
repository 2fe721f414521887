"""The plan-free CFG branch (`sampling.plan_free`): a second cache in which no plan is written.

What it must do: the unconditional velocity depends on nothing of the plan (bit-identical for
any plan, of any length), it is the conditional velocity of the same request with every plan
item empty, and guidance combines it with the main cache's conditional velocity.
"""

import dataclasses
import re

import numpy as np
import pytest

from tv2tv_jax.model import TV2TV
from tv2tv_jax.sampling import plan_free, sampler
from tv2tv_jax.sampling.decoding import Request, RequestError, SamplerConfig
from test_sampler import _live_params  # initial params plus noise on every leaf

PROMPT = [5, 6, 7]
# Two plans that differ in every item and in every item's length, so that a leak through
# content or through RoPE positions would both show.
PLAN_A = {0: [20, 21], 1: [30], 2: [40, 41, 42]}
PLAN_B = {0: [50], 1: [60, 61, 62], 2: [70, 71]}
EMPTY = {0: [], 1: [], 2: []}


@pytest.fixture(scope="module")
def setup(tiny_exp):
  model = TV2TV(tiny_exp.model)
  return tiny_exp, model, _live_params(model, tiny_exp)


def _request(exp, plan, num_chunks=3):
  first = np.random.default_rng(11).standard_normal(exp.model.latent_shape).astype(np.float32)
  return Request(prompt=PROMPT, num_chunks=num_chunks, first_frame=first, seed=4,
                 interventions={i: t for i, t in plan.items() if i < num_chunks})


def _sc(layout, cfg_scale, uncond, steps=3):
  return SamplerConfig(steps=steps, cfg_scale=cfg_scale, layout=layout, uncond=uncond,
                       max_text_tokens=3)


@pytest.mark.parametrize("layout", ["think2v", "tv2tv"])
def test_plan_free_branch_is_blind_to_the_whole_plan(setup, layout):
  """At cfg_scale 0 a generated chunk is the unconditional branch's alone (v = v_u exactly):
  plan-free, every chunk is bit-identical under two plans that differ in content and length;
  through the mask drop, the Think2V chunks move (its leak) and the TV2TV ones move through
  the RoPE positions the dropped text's length shifts."""
  exp, model, params = setup
  out = {}
  for uncond in ("plan_free", "mask"):
    out[uncond] = [sampler.sample(model, params, exp, _request(exp, plan),
                                  _sc(layout, 0.0, uncond)) for plan in (PLAN_A, PLAN_B)]
  a, b = out["plan_free"]
  assert [t["text"] for t in a.transcript] == [PLAN_A[i] for i in range(3)]
  np.testing.assert_array_equal(a.chunks, b.chunks)
  ma, mb = out["mask"]
  assert np.max(np.abs(ma.chunks - mb.chunks)) > 1e-4


@pytest.mark.parametrize("layout", ["think2v", "tv2tv"])
def test_plan_free_branch_is_the_empty_plan_conditional(setup, layout):
  """The shadow cache is the row of an example with every plan item empty (what training's
  data.plan_drop_rate shows the model): at cfg_scale 0, plan-free sampling of any plan
  equals conditional sampling (cfg_scale 1) of the request whose items are all forced
  empty, within the float noise of two differently fused computations."""
  exp, model, params = setup
  got = sampler.sample(model, params, exp, _request(exp, PLAN_A), _sc(layout, 0.0, "plan_free"))
  want = sampler.sample(model, params, exp, _request(exp, EMPTY), _sc(layout, 1.0, "mask"))
  scale = np.max(np.abs(want.chunks))
  np.testing.assert_allclose(got.chunks, want.chunks, atol=1e-5 * scale, rtol=0)


def test_guidance_combines_main_conditional_and_plan_free_velocities(setup):
  """One Euler step on one chunk: x1(s) = x0 + v_u + s·(v_c − v_u) is affine in the CFG
  scale s, with x1(0) the plan-free branch and x1(1) the conditional one."""
  exp, model, params = setup
  x1 = {s: sampler.sample(model, params, exp, _request(exp, PLAN_A, num_chunks=1),
                          _sc("think2v", s, "plan_free", steps=1)).chunks[0]
        for s in (0.0, 1.0, 2.5)}
  scale = np.max(np.abs(x1[2.5]))
  np.testing.assert_allclose(x1[2.5], x1[0.0] + 2.5 * (x1[1.0] - x1[0.0]),
                             atol=1e-5 * scale, rtol=0)
  assert np.max(np.abs(x1[1.0] - x1[0.0])) > 1e-4  # the two branches do differ


def test_plan_free_at_scale_one_is_the_plain_conditional_sampler(setup):
  """cfg_scale 1 has no second branch: plan_free and mask give the same generation."""
  exp, model, params = setup
  req = _request(exp, PLAN_A)
  a = sampler.sample(model, params, exp, req, _sc("think2v", 1.0, "plan_free"))
  b = sampler.sample(model, params, exp, req, _sc("think2v", 1.0, "mask"))
  np.testing.assert_array_equal(a.chunks, b.chunks)


def test_plan_text_goes_to_the_main_cache_only(setup):
  """The shadow gets the prompt, EOFs, BOFs and clean chunks, never plan text."""
  exp, model, params = setup
  calls = []

  class Spy:
    batch = 1

    def __init__(self, name):
      self.name = name

    def append_text(self, tokens, plans):
      calls.append((self.name, [None if t is None else list(map(int, t)) for t in tokens],
                    list(plans)))

  backend = plan_free.PlanFreeBackend(Spy("main"), Spy("shadow"), exp.seq.bof_id)
  backend.append_text([np.asarray([30, 31])], [2])  # plan item 1
  backend.append_text([np.asarray([exp.seq.bof_id])], [2])  # BOF_1
  backend.append_text([np.asarray([exp.seq.eof_id])], [0])
  backend.append_text([None], [0])
  shadow = [c[1] for c in calls if c[0] == "shadow"]
  assert shadow == [[None], [[exp.seq.bof_id]], [[exp.seq.eof_id]], [None]]
  assert [c[1] for c in calls if c[0] == "main"] == [[[30, 31]], [[exp.seq.bof_id]],
                                                      [[exp.seq.eof_id]], [None]]


@pytest.mark.parametrize("change, needle", [
    (dict(uncond="nothing"), "SamplerConfig.uncond must be one of"),
    (dict(uncond="plan_free", sliding_window=True), "SamplerConfig.uncond 'plan_free'"),
])
def test_bad_uncond_settings_name_the_field(setup, change, needle):
  exp, model, params = setup
  sc = dataclasses.replace(_sc("think2v", 2.0, "mask"), **change)
  with pytest.raises(RequestError, match=re.escape(needle)):
    sampler.sample(model, params, exp, _request(exp, PLAN_A), sc)
