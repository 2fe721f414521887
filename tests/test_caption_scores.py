"""Sparse captions in the generation evaluation (data_pipelines/caption_scores.py): what
captions say per chunk, the forced caption's plan, the snapping of intervention chunks.

The world is the fixed point again: true clips against their own captions are
consistent, and a plan chosen in a true clip's state is played by the world exactly.
"""

import numpy as np
import pytest

from data_pipelines import caption_scores as caps
from data_pipelines import clip_scores as cs
from data_pipelines import oracle
from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action

L, R, S, F = Action("left", False), Action("right", False), Action("stop", False), \
    Action("stop", True)


def _layout_ids(clip):
  return oracle.quantise(clip.frames[:1])[0]


def test_said_expands_captions_to_the_chunks_they_describe():
  plan = caps.TextFormat("caption", 3)
  texts = ["moved left twice then stood still", "", "", "fired", "", "nonsense"]
  assert plan.said(texts) == [L, L, S, F, None, None]
  report = caps.TextFormat("caption", 2, "report")
  assert report.said(["", "moved left then moved right", "", "fired"]) == [L, R, None, F]
  # Overlapping captions (a model may write one anywhere): the later one wins.
  assert plan.said(["moved left three times", "moved right", ""]) == [L, R, L]
  assert caps.ACTION_TEXTS.said(["left", "", "fire", "moved left"]) == [L, None, F, None]


def test_true_texts_are_the_world_s_captions_and_consistent():
  for every in (1, 4, 5):
    for placement in tw.CAPTION_PLACEMENTS:
      fmt = caps.TextFormat("caption", every, placement)
      for seed in (5_000_000, 5_000_001):
        clip = tw.generate_clip(seed, 13)
        texts = fmt.texts_of(clip.actions)
        assert texts == tw.caption_clip(clip, every, 0.0, seed, placement)
        read = cs.read_actions(clip.frames)
        got = caps.consistency(read, texts, fmt)
        # Report captions leave trailing chunks undescribed; plan captions cover all.
        covered = 1.0 - got["uncovered"]
        assert got["consistent"] == pytest.approx(covered) and got["unparseable"] == 0.0
        assert got["uncovered"] == (0.0 if placement == "plan" else (13 % every) / 13)
  clip = tw.generate_clip(5_000_002, 12)
  read = cs.read_actions(clip.frames)
  assert caps.consistency(read, clip.texts) == cs.self_consistency(read, clip.texts)


def test_wrong_captions_are_inconsistent_where_they_differ():
  fmt = caps.TextFormat("caption", 4)
  clip = tw.generate_clip(5_000_003, 12)
  wrong = tw.caption_clip(clip, 4, 1.0, seed=1)
  read = cs.read_actions(clip.frames)
  said = fmt.said(wrong)
  expect = np.mean([s == a for s, a in zip(said, clip.actions)])
  assert expect < 1.0
  assert caps.consistency(read, wrong, fmt)["consistent"] == pytest.approx(expect)
  got = caps.consistency(read, ["", "moved sideways", "", "", "fired"] + [""] * 7, fmt)
  assert got["unparseable"] == 0.5 and got["uncovered"] == 11 / 12


def _state(clip, chunk):
  return cs.chunk_state(clip.frames, chunk, _layout_ids(clip))


def test_one_chunk_plan_is_the_dense_choice():
  """With every = 1 the forced caption's action is the one the dense protocol inserts."""
  fmt = caps.TextFormat("caption", 1)
  for seed in range(5_000_000, 5_000_006):
    clip = tw.generate_clip(seed, 6)
    for chunk in (0, 2, 5):
      state = _state(clip, chunk)
      dense = cs.choose_intervention(clip.texts[chunk], state, np.random.default_rng([0, chunk]))
      plan = caps.choose_plan(fmt.texts_of(clip.actions), state, _layout_ids(clip), fmt, 6,
                              np.random.default_rng([0, chunk]))
      assert plan.actions == (tw.parse_action_text(dense.text),)
      assert plan.text == tw.summarise_actions(plan.actions)
      assert (plan.chunk, plan.feasible, plan.candidates) == (dense.chunk, dense.feasible,
                                                              dense.candidates)


def test_plans_are_played_exactly_by_the_world():
  """Every action of a plan chosen in a true clip's state is allowed where the plan
  reaches, so the world plays the whole plan; the first differs from the clip's own."""
  played = 0
  for every in (4, 8, 16):
    fmt = caps.TextFormat("caption", every)
    for seed in range(5_000_000, 5_000_008):
      clip = tw.generate_clip(seed, 16)
      for chunk in range(0, 16, every):
        rng = np.random.default_rng([seed, chunk])
        plan = caps.choose_plan(fmt.texts_of(clip.actions), _state(clip, chunk),
                                _layout_ids(clip), fmt, 16, rng)
        assert plan.chunk == chunk and len(plan.actions) == min(every, 16 - chunk)
        assert plan.feasible and plan.actions[0] != clip.actions[chunk]
        assert tw.parse_summary(plan.text) == list(plan.actions)
        forced = fmt.forced_actions(chunk, plan.text, 16)
        again = tw.generate_clip(seed, 16, forced=forced)
        assert again.actions[chunk:chunk + len(plan.actions)] == list(plan.actions)
        played += len(plan.actions)
  assert played == 3 * 8 * 16
  # Deterministic in the rng.
  clip = tw.generate_clip(5_000_000, 16)
  fmt = caps.TextFormat("caption", 8)
  a, b = (caps.choose_plan(fmt.texts_of(clip.actions), _state(clip, 8), _layout_ids(clip),
                           fmt, 16, np.random.default_rng(3)) for _ in range(2))
  assert a == b


def test_plan_without_an_agent_is_not_feasible():
  clip = tw.generate_clip(5_000_000, 8)
  frames = clip.frames.copy()
  frames[:] = tw.BACKGROUND  # no agent anywhere
  state = cs.chunk_state(frames, 4, _layout_ids(clip))
  fmt = caps.TextFormat("caption", 4)
  plan = caps.choose_plan([""] * 8, state, _layout_ids(clip), fmt, 8, np.random.default_rng(0))
  assert not plan.feasible and len(plan.actions) == 4 and plan.candidates == 10


def test_intervention_chunks_move_to_the_caption_that_plans_them():
  plan = {"rule": "r", "chunks": {"intervene_1s": 3, "intervene_3s": 11}}
  got = caps.caption_plan(plan, caps.TextFormat("caption", 4))
  assert got["chunks"] == {"intervene_1s": 0, "intervene_3s": 8} and got["merged"] == {}
  assert got["time_chunks"] == plan["chunks"] and got["caption_every"] == 4
  got = caps.caption_plan(plan, caps.TextFormat("caption", 16))
  assert got["chunks"] == {"intervene_1s": 0} and got["merged"] == {"intervene_3s":
                                                                     "intervene_1s"}
  assert caps.caption_plan(plan, caps.TextFormat("caption", 1))["chunks"] == plan["chunks"]
  assert not caps.TextFormat("caption", 4, "report").can_intervene


def test_text_format_validation():
  with pytest.raises(ValueError, match="kind"):
    caps.TextFormat("speech")
  with pytest.raises(ValueError, match="every"):
    caps.TextFormat("caption", tw.MAX_CAPTION_EVERY + 1)
  with pytest.raises(ValueError, match="placement"):
    caps.TextFormat("caption", 4, "after")
  with pytest.raises(ValueError, match="action texts"):
    caps.TextFormat("action", 4)
