"""Clip scores (data_pipelines/clip_scores.py) and the toy-world policy helpers they use.

Ground truth is the fixed point: true clips scored against their own texts read back as
the oracle reads them, valid with zero tolerances, continuous. Every other test corrupts
something and checks the score notices.
"""

import hashlib

import numpy as np
import pytest

from data_pipelines import clip_scores as cs
from data_pipelines import oracle
from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action, ToyWorldConfig

SEEDS = (5_000_000, 5_000_001, 5_000_002)


def _layout_ids(clip):
  return oracle.quantise(clip.frames[:1])[0]


# --------------------------------------------------------------------------- toy_world additions

def test_unforced_clips_are_bit_identical_to_before():
  # Digest of these clips as generated before `forced` existed (frames, states, texts), in
  # the world of that time (2x2 projectiles 1 px from the agent; the defaults since are 4x4, 2 px).
  h = hashlib.sha256()
  then = tw.ToyWorldConfig(projectile_size=2, projectile_gap=1)
  for s in (0, 1, 7, 123, 5_000_000):
    c = tw.generate_clip(s, 16, then)
    h.update(c.frames.tobytes())
    h.update(c.states.tobytes())
    h.update(" ".join(c.texts).encode())
  assert h.hexdigest() == "3f91ddd13edc149e15815e3b86b5448b08d6e171f728d7b90c272285d32f0a75"
  a, b = tw.generate_clip(9, 6), tw.generate_clip(9, 6, forced={})
  assert a.frames.tobytes() == b.frames.tobytes() and a.texts == b.texts


def test_forced_action_is_played_exactly_when_allowed():
  """allowed_actions agrees with what generate_clip really lets a forced action do."""
  cfg = ToyWorldConfig()
  checked = 0
  for seed in (3, 11, 5_000_003):
    base = tw.generate_clip(seed, 5, cfg)
    for i in (0, 2):
      x, y, facing = base.states[cfg.frames_per_chunk * i]
      allowed = tw.allowed_actions(_layout_ids(base), x, y, facing, cfg)
      assert Action("stop", False) in allowed and base.actions[i] in allowed
      for a in tw.ACTIONS:
        clip = tw.generate_clip(seed, 5, cfg, forced={i: a})
        assert (clip.actions[i] == a) == (a in allowed), (seed, i, a)
        # The random stream is untouched: chunks before the forced one are unchanged.
        assert clip.actions[:i] == base.actions[:i]
        np.testing.assert_array_equal(clip.frames[:1 + 4 * i], base.frames[:1 + 4 * i])
        checked += 1
  assert checked == 60
  # A forced action the world allows reads back from the frames.
  clip = tw.generate_clip(3, 5, cfg, forced={2: Action("stop", True)})
  if clip.actions[2] == Action("stop", True):
    assert oracle.classify_chunks(clip.frames)[2] == Action("stop", True)


def test_forced_errors_name_the_entry():
  with pytest.raises(ValueError, match=r"forced\[5\]"):
    tw.generate_clip(0, 3, forced={5: Action("left", False)})
  with pytest.raises(ValueError, match=r"forced\[1\]"):
    tw.generate_clip(0, 3, forced={1: Action("jump", False)})


def test_unknown_facing_allows_fire_only_if_every_facing_does():
  mixed = 0
  for seed in range(5_000_000, 5_000_010):
    clip = tw.generate_clip(seed, 4)
    ids = _layout_ids(clip)
    for x, y, _ in clip.states[::4]:
      per = [tw.allowed_moves(ids, x, y, f) for f in range(4)]
      unknown = tw.allowed_moves(ids, x, y, None)
      assert unknown["stop"] == all(p["stop"] for p in per)
      mixed += len({p["stop"] for p in per}) > 1  # a state where facing matters
      for m in unknown:
        if m != "stop":
          assert unknown[m] == per[0][m]
  assert mixed >= 1
  # An agent inside a wall allows nothing, not even stop.
  assert tw.allowed_moves(ids, 0, 0, 0) == {}


@pytest.mark.parametrize("prev,blocked_fire", [
    (None, False), (Action("left", True), False), (Action("up", False), True),
    (Action("stop", True), True)])
def test_policy_distribution_is_the_policys(prev, blocked_fire):
  """Monte Carlo of `_choose` against `policy_distribution` (4 standard errors)."""
  cfg = ToyWorldConfig()
  allowed = {"left": True, "up": not blocked_fire, "stop": not blocked_fire, "down": True}
  dist = tw.policy_distribution(allowed, prev, cfg)
  assert abs(sum(dist.values()) - 1) < 1e-12
  rng = np.random.default_rng(0)
  n = 20_000
  counts: dict = {}
  for _ in range(n):
    a = tw._choose(rng, cfg, prev, allowed)
    counts[a] = counts.get(a, 0) + 1
  assert set(counts) <= set(dist)
  for a, p in dist.items():
    se = np.sqrt(p * (1 - p) / n)
    assert abs(counts.get(a, 0) / n - p) <= 4 * se + 1e-9, (a, counts.get(a, 0) / n, p)


# --------------------------------------------------------------------------- ground truth

def test_ground_truth_scores_are_the_oracles_reading():
  for seed in SEEDS:
    clip = tw.generate_clip(seed, 12)
    read = cs.read_actions(clip.frames)
    sc = cs.self_consistency(read, clip.texts)
    assert sc["consistent"] == oracle.instruction_accuracy(clip.frames, clip.texts) == 1.0
    assert sc["unparseable"] == 0.0 and sc["chunks"] == 12
    vis = cs.visual_scores(clip.frames, clip.frames[0], cs.ZERO_TOLERANCES)
    for key in cs.VISUAL_KEYS:
      assert vis[key] == 1.0, (seed, key)
    assert vis["invalid_reasons"] == {}
    for i in range(12):
      assert cs.intervention_following(read, i, clip.texts[i]) == {
          "movement": 1.0, "fire": 1.0, "both": 1.0}


def test_self_consistency_counts_unparseable_texts_apart():
  clip = tw.generate_clip(SEEDS[0], 4)
  read = cs.read_actions(clip.frames)
  texts = list(clip.texts)
  texts[0] = "jump around"
  other = [a for a in tw.ACTIONS if a != clip.actions[1]][0]
  texts[1] = tw.action_text(other)
  sc = cs.self_consistency(read, texts)
  assert sc == {"consistent": 0.5, "unparseable": 0.25, "chunks": 4}
  with pytest.raises(ValueError):
    cs.self_consistency(read, texts[:3])


def test_visual_scores_notice_corruption():
  clip = tw.generate_clip(SEEDS[1], 4)
  frames = clip.frames.copy()
  frames[3] = clip.layout                     # agent gone
  frames[5, 30:34, 10:14] = tw.AGENT          # a second agent
  frames[7, 0:2, 20:30] = tw.BACKGROUND       # border wall broken
  vis = cs.visual_scores(frames, clip.frames[0])
  n = len(frames) - 1
  assert vis["valid"] == (n - 3) / n
  assert vis["agent_present"] == vis["agent_intact"] == (n - 2) / n
  assert vis["layout_preserved"] == (n - 1) / n
  # Frame 3 has no agent: transitions 2->3 and 3->4 break; frame 5's extra blob is
  # smaller or equal, so the largest-blob track may or may not jump there.
  assert vis["track_continuity"] <= (n - 2) / n
  assert vis["invalid_reasons"]["N agent blobs"] == 2
  assert vis["invalid_reasons"]["border wall broken"] == 1


def test_track_continuity_threshold():
  cfg = ToyWorldConfig()  # speed 2: a jump of up to 4 px is continuous
  c = np.array([[10, 10], [12, 10], [16, 10], [16, 14.5], [np.nan, np.nan], [16, 14]], float)
  np.testing.assert_array_equal(cs.track_continuity(c, cfg), [True, True, False, False, False])
  clip = tw.generate_clip(SEEDS[2], 6)
  cent = oracle.agent_centroids(oracle.quantise(clip.frames))
  assert cs.track_continuity(cent, cfg).all()
  moving = [i for i, a in enumerate(clip.actions) if a.movement != "stop"]
  if moving:  # a whole chunk's motion in one frame is a jump
    i = moving[0]
    skipped = np.delete(cent, [4 * i + 1, 4 * i + 2, 4 * i + 3], axis=0)
    assert not cs.track_continuity(skipped, cfg).all()


# --------------------------------------------------------------------------- tolerances

def _noisy_reconstruction(frames, rng, bad_every=7):
  """A stand-in VAE reconstruction: colour noise, plus on some frames blurred-looking
  damage (unknown pixels, an agent pixel lost, a wall pixel lost)."""
  out = (frames.astype(np.int16) + rng.integers(-10, 11, frames.shape)).clip(0, 255)
  out = out.astype(np.uint8)
  for t in range(1, len(out), bad_every):
    k = int(rng.integers(1, 4))
    out[t, 20:20 + k, 40] = (128, 0, 128)  # far from every palette colour
    out[t, 0, 30:30 + k] = tw.BACKGROUND
  return out


def test_measurements_mirror_frame_validity():
  """Each tolerance-controlled check fails exactly when its measurement exceeds it."""
  rng = np.random.default_rng(0)
  clip = tw.generate_clip(SEEDS[0], 3)
  frames = _noisy_reconstruction(clip.frames, rng, bad_every=2)
  frames[4, 30:32, 30:32] = tw.AGENT  # a second agent blob: no agent size to measure
  m = cs.frame_measurements(frames, clip.frames[0])
  loose = {"max_unknown": 10**6, "max_layout_diff": 10**6, "agent_size_tol": 10**6,
           "background_tol": 1e6}
  pairs = {"max_unknown": "unknown", "max_layout_diff": "layout_diff",
           "agent_size_tol": "agent_size_dev", "background_tol": "background_dist"}
  for t in range(len(frames)):
    for key, q in pairs.items():
      if not np.isfinite(m[q][t]):
        continue
      at = dict(loose, **{key: m[q][t]})
      ok, _ = oracle.frame_validity(frames[t:t + 1], clip.frames[0], **at)
      assert ok[0] == (m["agent_blobs"][t] == 1 and m["projectiles_ok"][t] == 1), (t, key)
      if m[q][t] > 0:
        below = dict(loose, **{key: m[q][t] - (1 if key != "background_tol" else 0.01)})
        ok, _ = oracle.frame_validity(frames[t:t + 1], clip.frames[0], **below)
        assert not ok[0], (t, key)


def test_fitted_tolerances_pass_reconstructions():
  rng = np.random.default_rng(1)
  trues = [tw.generate_clip(s, 4).frames for s in SEEDS]
  recons = [_noisy_reconstruction(f, rng) for f in trues]
  tol = cs.fit_validity_tolerances(recons, trues)
  assert set(tol) == set(cs.TOLERANCE_KEYS)
  assert tol["max_unknown"] >= 1 and tol["max_layout_diff"] >= 1
  valid = np.concatenate([oracle.frame_validity(r[1:], t[0], **tol)[0]
                          for r, t in zip(recons, trues)])
  assert valid.mean() >= 0.99
  # Fitted on exact frames, the tolerances are zero.
  assert cs.fit_validity_tolerances(trues, trues) == cs.ZERO_TOLERANCES
  with pytest.raises(ValueError, match="equally many"):
    cs.fit_validity_tolerances(recons[:1], trues)


def test_fitted_tolerance_is_the_quantile():
  """Not loose: with 1% of frames damaged, the 99.75% quantile is a damaged frame's value,
  and with none damaged it is zero."""
  trues = [tw.generate_clip(s, 25).frames for s in SEEDS[:2]]  # 200 scored frames
  recons = [f.copy() for f in trues]
  recons[0][5, 20:23, 40] = (128, 0, 128)   # 3 unknown px on one frame of 200
  assert cs.fit_validity_tolerances(recons, trues)["max_unknown"] == 3
  assert cs.fit_validity_tolerances(recons, trues, target=0.5)["max_unknown"] == 0


# --------------------------------------------------------------------------- state, choice, chance

def test_chunk_state_of_ground_truth():
  cfg = ToyWorldConfig()
  clip = tw.generate_clip(SEEDS[1], 8)
  read = cs.read_actions(clip.frames)
  for i in range(8):
    st = cs.chunk_state(clip.frames, i, _layout_ids(clip), cfg, read)
    x, y, facing = clip.states[4 * i]
    assert (st.x, st.y) == (x, y)
    moved = [a for a in clip.actions[:i] if a.movement != "stop"]
    assert st.facing == (facing if moved else None)
    assert st.prev == (clip.actions[i - 1] if i else None)
    assert tw.permits(st.allowed, clip.actions[i])
  gone = clip.frames.copy()
  gone[8] = clip.layout
  st = cs.chunk_state(gone, 2, _layout_ids(clip), cfg)
  assert st.allowed is None and st.x is None
  assert st.to_json()["allowed"] is None


def test_choose_intervention():
  clip = tw.generate_clip(SEEDS[2], 6)
  st = cs.chunk_state(clip.frames, 3, _layout_ids(clip))
  own = clip.texts[3]
  picks = [cs.choose_intervention(own, st, np.random.default_rng(s)) for s in range(300)]
  allowed = {tw.action_text(a) for a in tw.ACTIONS if tw.permits(st.allowed, a)}
  assert all(p.text != own and p.text in allowed and p.feasible for p in picks)
  assert {p.text for p in picks} == allowed - {own}  # uniform over them: all appear
  assert picks[0].candidates == len(allowed - {own})
  again = cs.choose_intervention(own, st, np.random.default_rng(0))
  assert again == picks[0]
  # No agent: any action but the model's own, flagged infeasible.
  none = cs.ChunkState(3, None, None, None, None, None)
  p = cs.choose_intervention("left", none, np.random.default_rng(0))
  assert not p.feasible and p.text != "left" and p.candidates == 9
  # An unparseable own text excludes nothing.
  assert cs.choose_intervention("blah", none, np.random.default_rng(0)).candidates == 10


def test_chance_reads_the_true_state():
  """On ground truth, chance is the policy's probability in the clip's true state (true
  position, facing and previous action), wherever the facing is visible."""
  cfg = ToyWorldConfig()
  compared = 0
  for seed in SEEDS:
    clip = tw.generate_clip(seed, 10, cfg)
    ids = _layout_ids(clip)
    read = cs.read_actions(clip.frames, cfg)
    for i in range(1, 10):
      st = cs.chunk_state(clip.frames, i, ids, cfg, read)
      if st.facing is None:
        continue
      x, y, facing = clip.states[4 * i]
      dist = tw.policy_distribution(tw.allowed_moves(ids, x, y, facing, cfg),
                                    clip.actions[i - 1], cfg)
      for a in tw.ACTIONS:
        assert cs.chance(st, a, cfg)["both"] == pytest.approx(dist.get(a, 0.0)), (seed, i, a)
      compared += 1
  assert compared >= 10


def test_chance_is_the_policy_probability():
  cfg = ToyWorldConfig()
  clip = tw.generate_clip(SEEDS[0], 6)
  st = cs.chunk_state(clip.frames, 4, _layout_ids(clip), cfg)
  dist = tw.policy_distribution(st.allowed, st.prev, cfg)
  total = {k: 0.0 for k in ("movement", "fire", "both")}
  for a in tw.ACTIONS:
    c = cs.chance(st, a, cfg)
    assert c["both"] == pytest.approx(dist.get(a, 0.0))
    assert c["both"] <= min(c["movement"], c["fire"])
    total["both"] += c["both"]
  assert total["both"] == pytest.approx(1.0)
  moves = {m: cs.chance(st, Action(m, False), cfg)["movement"] for m in tw.MOVES}
  assert sum(moves.values()) == pytest.approx(1.0)
  none = cs.ChunkState(0, None, None, None, None, None)
  assert cs.chance(none, Action("left", True), cfg) == pytest.approx(
      {"movement": 0.2, "fire": 0.5, "both": 0.1})


# --------------------------------------------------------------------------- plausibility

def test_plausibility_tells_a_frozen_player_from_the_world():
  truth = [cs.read_actions(tw.generate_clip(s, 8).frames) for s in range(5_000_100, 5_000_124)]
  same = [cs.read_actions(tw.generate_clip(s, 8).frames) for s in range(5_000_200, 5_000_212)]
  frozen = [[Action("left", False)] * 8 for _ in range(12)]
  lost = [[Action(oracle.UNKNOWN, False)] * 8 for _ in range(12)]
  p_same = cs.plausibility(same, truth, num_resamples=200)
  p_frozen = cs.plausibility(frozen, truth, num_resamples=200)
  p_lost = cs.plausibility(lost, truth, num_resamples=200)
  assert p_same["distance"]["tv_movement"]["value"] < 0.25
  assert p_frozen["distance"]["tv_movement"]["value"] > 0.6
  assert p_frozen["generated"]["persistence"] == 1.0 and p_frozen["generated"]["fire_rate"] == 0
  assert p_lost["generated"]["unknown_rate"] == 1.0
  assert p_lost["distance"]["unknown_rate"]["value"] == pytest.approx(1.0)
  d = p_frozen["distance"]["tv_action"]
  assert d["lo"] <= d["value"] <= d["hi"]


# --------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_covers_the_mean_and_is_deterministic():
  rng = np.random.default_rng(0)
  covered = 0
  for _ in range(200):
    x = rng.binomial(1, 0.3, size=32).astype(float)
    mean, lo, hi = cs.bootstrap_ci(x, num_resamples=500, seed=1)
    assert lo <= mean <= hi and mean == x.mean()
    covered += lo <= 0.3 <= hi
  # Nominal 95%; the percentile bootstrap at n = 32 runs a little short of it.
  assert 0.85 <= covered / 200 <= 0.995, covered
  x = rng.normal(size=40)
  assert cs.bootstrap_ci(x, seed=3) == cs.bootstrap_ci(x, seed=3)
  assert cs.bootstrap_ci(x, seed=3) != cs.bootstrap_ci(x, seed=4)
  assert cs.bootstrap_ci(np.array([1.0, np.nan, 0.0]), seed=0)[0] == 0.5
  assert np.isnan(cs.bootstrap_ci(np.array([np.nan])) [0])
  assert cs.bootstrap_ci(np.array([0.7]), num_resamples=10) == (0.7, 0.7, 0.7)
  wide, narrow = cs.bootstrap_ci(x, level=0.99), cs.bootstrap_ci(x, level=0.5)
  assert wide[1] < narrow[1] and narrow[2] < wide[2]


def test_summarise():
  recs = [{"a": 1.0, "b": None}, {"a": 0.0, "b": 1.0}, {"a": 1.0, "b": float("nan")}]
  s = cs.summarise(recs, ["a", "b"], num_resamples=100)
  assert s["a"]["mean"] == pytest.approx(2 / 3) and s["a"]["n"] == 3
  assert s["b"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 1}
