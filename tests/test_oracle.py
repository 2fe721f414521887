"""Oracle: action read-back and frame validity on ground truth, noisy frames and corrupted frames."""

import numpy as np
import pytest

from data_pipelines import oracle
from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action


def test_ground_truth_accuracy_and_validity():
  report = oracle.ground_truth_report(num_clips=50, num_chunks=16)
  print("oracle on ground truth:", report)
  assert report["chunks"] == 800 and report["frames"] == 50 * 65
  assert report["action_accuracy"] >= 0.99
  assert report["frame_validity"] == 1.0


def test_tolerates_colour_noise_and_float_frames():
  rng = np.random.default_rng(0)
  for seed in range(3):
    clip = tw.generate_clip(seed, 16)
    # Uniform noise of +-12 per channel is at most ~21 in RGB distance, under the threshold 40.
    noisy = (clip.frames + rng.uniform(-12, 12, clip.frames.shape)).clip(0, 255) / 255.0
    assert noisy.dtype == np.float64
    assert oracle.action_accuracy(noisy.astype(np.float32), clip.actions) == 1.0
    assert oracle.frame_validity(noisy)[0].all()
    # [-1, 1] frames via float_range.
    assert oracle.action_accuracy(noisy * 2 - 1, clip.actions, float_range=(-1.0, 1.0)) == 1.0


def test_accuracy_drops_for_wrong_actions():
  clip = tw.generate_clip(4, 16)
  assert oracle.instruction_accuracy(clip.frames, clip.texts) == 1.0
  flipped = [Action(a.movement, not a.fire) for a in clip.actions]
  assert oracle.action_accuracy(clip.frames, flipped) == 0.0
  opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "stop": "left"}
  moved = [Action(opposite[a.movement], a.fire) for a in clip.actions]
  assert oracle.action_accuracy(clip.frames, moved) == 0.0
  with pytest.raises(ValueError):
    oracle.action_accuracy(clip.frames, clip.actions[:-1])
  with pytest.raises(ValueError):
    oracle.classify_chunks(clip.frames[:-1])


def test_missing_agent_reads_unknown():
  clip = tw.generate_clip(1, 3)
  frames = clip.frames.copy()
  frames[8] = clip.layout  # chunk 2 ends without an agent
  read = oracle.classify_chunks(frames)
  assert read[1].movement == oracle.UNKNOWN
  assert read[0] == clip.actions[0]
  valid, reasons = oracle.frame_validity(frames)
  assert not valid[8] and "0 agent blobs" in reasons[8]


def test_components():
  mask = np.zeros((8, 8), bool)
  mask[0:2, 0:2] = True
  mask[2, 2] = True  # diagonal neighbour: same 8-connected blob
  mask[5:7, 5] = True
  blobs = sorted(oracle.components(mask), key=len)
  assert [len(b) for b in blobs] == [2, 5]
  assert {tuple(p) for p in blobs[0]} == {(5, 5), (6, 5)}
  assert oracle.components(np.zeros((4, 4), bool)) == []


def _free_spot(clip, size, avoid_agent_t):
  """Top-left of a size x size background square away from the agent at frame avoid_agent_t."""
  bg = np.all(clip.frames[avoid_agent_t] == tw.BACKGROUND, -1)
  for y in range(2, 60):
    for x in range(2, 60):
      if bg[y - 1:y + size + 1, x - 1:x + size + 1].all():
        return x, y
  raise AssertionError("no free spot")


def test_validity_catches_corrupted_frames():
  clip = tw.generate_clip(2, 8)
  cfg = tw.ToyWorldConfig()
  t = 10
  frames = np.repeat(clip.frames[t:t + 1], 5, axis=0)
  x, y = _free_spot(clip, cfg.agent_size, t)
  frames[1, y:y + 4, x:x + 4] = tw.AGENT                        # a second agent
  walls = np.argwhere(np.all(clip.layout == tw.WALL, -1))
  inner = walls[(walls > 4).all(1) & (walls < 59).all(1)]
  wy, wx = inner[len(inner) // 2]
  frames[2, wy, wx] = tw.BACKGROUND                             # a hole in an interior wall
  frames[3, 3, 0] = tw.BACKGROUND                               # a hole in the border
  frames[4, y + 1, x + 1] = (255, 0, 255)                       # a foreign colour
  valid, reasons = oracle.frame_validity(frames, reference_frame=clip.frames[0])
  assert valid.tolist() == [True, False, False, False, False], reasons
  assert "2 agent blobs" in reasons[1]
  assert any(r.startswith("walls changed") for r in reasons[2])
  assert any(r.startswith("border wall broken") for r in reasons[3])
  assert any(r.startswith("unknown colour") for r in reasons[4])


def test_validity_catches_layout_and_background_changes():
  clip = tw.generate_clip(5, 4)
  frames = clip.frames.copy()
  objs = np.argwhere(np.all(clip.layout == tw.OBJECT_COLOURS[0], -1))
  assert len(objs)
  oy, ox = objs[0]
  frames[3, oy, ox] = tw.OBJECT_COLOURS[1]                      # an object changes colour
  big = tw.ToyWorldConfig().projectile_size + 1
  x, y = _free_spot(clip, big, 5)
  frames[5, y:y + big, x:x + big] = tw.PROJECTILE               # an oversized projectile
  bg = np.all(frames[7] == tw.BACKGROUND, -1)
  frames[7][bg] = (44, 44, 52)                                  # background drifts
  frames[9, y:y + 2, x:x + 2] = tw.WALL                         # a new wall appears
  valid, reasons = oracle.frame_validity(frames)
  assert np.flatnonzero(~valid).tolist() == [3, 5, 7, 9], reasons
  assert any(r.startswith("objects changed") for r in reasons[3])
  assert any(r.startswith("projectile blob") for r in reasons[5])
  assert any(r.startswith("background off") for r in reasons[7])
  assert any(r.startswith("walls changed") for r in reasons[9])
