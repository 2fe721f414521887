"""The toy-world oracle: reads the agent's state back from frames by colour segmentation.

Scores videos, ground truth or generated, against their texts (docs/design.md, section 5):
did the agent do what the text said, and is each frame a valid toy-world frame.

Colours. Every pixel is quantised to the nearest toy_world.PALETTE colour, or to UNKNOWN
(-1) when its RGB distance to that colour exceeds `threshold` (default 40; palette
colours are > 100 apart). This tolerates the colour noise of generated frames. Frames
may be uint8 in [0, 255] or floating in `float_range` (default [0, 1], a decoder's output).

Actions, per chunk i (frames 4(i-1)+1 .. 4i, see toy_world):
- movement: the displacement of the agent's centroid (its largest blob) from the frame
  before the chunk to the chunk's last frame. Under `move_threshold` px (default half
  the true 4 * speed) on both axes it is "stop"; otherwise the dominant axis and its
  sign give left/right/up/down. A frame without an agent gives UNKNOWN.
- fire: projectile pixels (>= `min_projectile_pixels`) within `fire_radius` px
  (Chebyshev, from the agent's centroid) in the chunk's first frame. A new projectile
  sits config.spawn_distance (6 px, centre to centre) from the agent there; projectiles
  outrun the agent, so an older one is at least spawn_distance + (projectile_speed -
  speed) * 4 = 14 px away at any chunk start. The default radius is the midpoint, 10 px.

Validity, per frame (`frame_validity`): no UNKNOWN pixels; walls and objects equal the
reference layout (frame 0's, or a given reference frame) and the border wall is whole;
exactly one agent blob with agent_size^2 pixels in an agent_size square; every
projectile blob no larger than a projectile; background pixels near the palette colour
on average.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action, ToyWorldConfig

UNKNOWN_ID = -1
UNKNOWN = "unknown"  # movement read from a chunk whose agent cannot be found


def to_rgb(frames: np.ndarray, float_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """frames: uint8 or float[..., 3] -> float32[..., 3] in [0, 255]."""
  frames = np.asarray(frames)
  if np.issubdtype(frames.dtype, np.floating):
    lo, hi = float_range
    return ((frames.astype(np.float32) - lo) * (255.0 / (hi - lo))).clip(0, 255)
  return frames.astype(np.float32)


def quantise(frames: np.ndarray, threshold: float = 40.0,
             float_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
  """frames: uint8|float[..., H, W, 3] -> int8[..., H, W] palette ids, UNKNOWN_ID if far from all."""
  rgb = to_rgb(frames, float_range)
  pal = tw.PALETTE.astype(np.float32)
  # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matmul: ~10x faster than broadcasting.
  d2 = (rgb * rgb).sum(-1, keepdims=True) - 2 * rgb @ pal.T + (pal * pal).sum(-1)
  ids = d2.argmin(-1).astype(np.int8)
  ids[d2.min(-1) > threshold ** 2] = UNKNOWN_ID
  return ids


def components(mask: np.ndarray) -> list[np.ndarray]:
  """mask: bool[H, W] -> one int[n, 2] array of (y, x) pixel coordinates per 8-connected blob.

  Label propagation: each pixel takes the min label of its 3x3 neighbourhood until
  nothing changes; iterations ~ the largest blob's diameter (small for agents and
  projectiles, which is all this is used for).
  """
  if not mask.any():
    return []
  # Work on the mask's bounding box (+1 px): blobs are small, frames mostly empty.
  ys, xs = np.nonzero(mask)
  y0, x0 = ys.min(), xs.min()
  mask = mask[y0:ys.max() + 1, x0:xs.max() + 1]
  h, w = mask.shape
  big = h * w + 1
  lab = np.where(mask, np.arange(h * w).reshape(h, w), big)
  while True:
    p = np.pad(lab, 1, constant_values=big)
    nb = np.min([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)
    new = np.where(mask, nb, big)
    if np.array_equal(new, lab):
      break
    lab = new
  ys, xs = np.nonzero(mask)
  labels = lab[ys, xs]
  return [np.stack([ys[labels == u] + y0, xs[labels == u] + x0], 1) for u in np.unique(labels)]


def agent_centroids(ids: np.ndarray) -> np.ndarray:
  """ids: int8[T, H, W] palette ids -> float32[T, 2] (x, y) centroid of the largest agent blob.

  NaN where a frame has no agent pixel. The largest blob, not all agent pixels, so that
  stray agent-coloured specks in generated frames do not drag the centroid.
  """
  out = np.full((ids.shape[0], 2), np.nan, np.float32)
  for t, frame in enumerate(ids):
    blobs = components(frame == tw.AGENT_ID)
    if blobs:
      yx = max(blobs, key=len).mean(0)
      out[t] = yx[1], yx[0]
  return out


def _check_length(num_frames: int, cfg: ToyWorldConfig) -> int:
  if num_frames < 1 or (num_frames - 1) % cfg.frames_per_chunk:
    raise ValueError(f"{num_frames} frames is not 1 + {cfg.frames_per_chunk}k")
  return (num_frames - 1) // cfg.frames_per_chunk


def classify_chunks(frames: np.ndarray, config: ToyWorldConfig = ToyWorldConfig(), *,
                    threshold: float = 40.0, float_range: tuple[float, float] = (0.0, 1.0),
                    move_threshold: float | None = None, fire_radius: float | None = None,
                    min_projectile_pixels: int | None = None) -> list[Action]:
  """Reads each chunk's action from its frames.

  Args:
    frames: uint8|float[1 + 4k, H, W, 3] a clip (frame 0 = first frame).
    config: the world the frames come from (sizes and speeds).
    move_threshold, fire_radius, min_projectile_pixels: see the module docstring;
      None = derived from config.
  Returns:
    k Actions; movement is UNKNOWN where the agent is missing before or at the chunk's end.
  """
  cfg = config
  k = _check_length(len(frames), cfg)
  f = cfg.frames_per_chunk
  move_threshold = cfg.speed * f / 2 if move_threshold is None else move_threshold
  if fire_radius is None:
    fire_radius = cfg.spawn_distance + (cfg.projectile_speed - cfg.speed) * f / 2
  if min_projectile_pixels is None:
    min_projectile_pixels = max(1, cfg.projectile_size ** 2 // 2)
  ids = quantise(frames, threshold, float_range)
  cent = agent_centroids(ids)
  actions = []
  for i in range(k):
    before, first, last = f * i, f * i + 1, f * (i + 1)
    d = cent[last] - cent[before]
    if np.isnan(d).any():
      move = UNKNOWN
    elif max(abs(d[0]), abs(d[1])) < move_threshold:
      move = "stop"
    elif abs(d[0]) >= abs(d[1]):
      move = "right" if d[0] > 0 else "left"
    else:
      move = "down" if d[1] > 0 else "up"
    fire = False
    if not np.isnan(cent[first]).any():
      ys, xs = np.nonzero(ids[first] == tw.PROJECTILE_ID)
      near = np.maximum(abs(xs - cent[first][0]), abs(ys - cent[first][1])) <= fire_radius
      fire = bool(near.sum() >= min_projectile_pixels)
    actions.append(Action(move, fire))
  return actions


def action_accuracy(frames: np.ndarray, actions: Sequence[Action],
                    config: ToyWorldConfig = ToyWorldConfig(), **kwargs) -> float:
  """Share of chunks whose read action (movement and fire) equals `actions` (k of them)."""
  read = classify_chunks(frames, config, **kwargs)
  if len(read) != len(actions):
    raise ValueError(f"{len(read)} chunks in frames, {len(actions)} actions")
  return float(np.mean([Action(*a) == r for a, r in zip(actions, read)])) if read else 1.0


def action_agreement(read: Sequence[Action], truth: Sequence[Action]) -> dict[str, float]:
  """Share of chunks where the read action matches the truth: movement, fire, and both.

  read, truth: equally long sequences of Actions (read from frames / what the text said).
  Returns {"movement", "fire", "both", "chunks"}; NaN accuracies when there are no chunks.
  """
  if len(read) != len(truth):
    raise ValueError(f"{len(read)} read actions, {len(truth)} true ones")
  if not read:
    return {"movement": float("nan"), "fire": float("nan"), "both": float("nan"), "chunks": 0}
  move = [r.movement == t.movement for r, t in zip(read, truth)]
  fire = [r.fire == t.fire for r, t in zip(read, truth)]
  return {"movement": float(np.mean(move)), "fire": float(np.mean(fire)),
          "both": float(np.mean([m and f for m, f in zip(move, fire)])), "chunks": len(read)}


def instruction_accuracy(frames: np.ndarray, texts: Sequence[str],
                         config: ToyWorldConfig = ToyWorldConfig(), **kwargs) -> float:
  """`action_accuracy` against per-chunk action texts ("left fire", ...): did the video obey?"""
  return action_accuracy(frames, [tw.parse_action_text(t) for t in texts], config, **kwargs)


def frame_validity(frames: np.ndarray, reference_frame: np.ndarray | None = None,
                   config: ToyWorldConfig = ToyWorldConfig(), *, threshold: float = 40.0,
                   float_range: tuple[float, float] = (0.0, 1.0), max_unknown: int = 0,
                   max_layout_diff: int = 0, agent_size_tol: int = 0,
                   background_tol: float = 20.0) -> tuple[np.ndarray, list[list[str]]]:
  """Checks each frame is a valid toy-world frame.

  Args:
    frames: uint8|float[T, H, W, 3].
    reference_frame: uint8|float[H, W, 3] whose walls and objects every frame must show;
      None = frames[0] (e.g. the given first frame of a generated clip).
    max_unknown, max_layout_diff, agent_size_tol: pixel tolerances (0 for ground truth).
    background_tol: max RGB distance of the mean background pixel from the palette's.
  Returns:
    valid: bool[T], and per frame a list of reasons (empty when valid).
  """
  cfg = config
  ids = quantise(frames, threshold, float_range)
  ref = ids[0] if reference_frame is None else quantise(reference_frame[None], threshold,
                                                        float_range)[0]
  ref_wall = ref == tw.WALL_ID
  ref_obj = np.isin(ref, tw.OBJECT_IDS)
  t_ = cfg.wall_thickness
  border = np.zeros_like(ref_wall)
  border[:t_, :] = border[-t_:, :] = border[:, :t_] = border[:, -t_:] = True
  rgb = to_rgb(frames, float_range)
  bg = np.asarray(tw.BACKGROUND, np.float32)
  a = cfg.agent_size
  reasons: list[list[str]] = []
  for t, frame in enumerate(ids):
    r = []
    n_unknown = int((frame == UNKNOWN_ID).sum())
    if n_unknown > max_unknown:
      r.append(f"unknown colour: {n_unknown} px")
    n_border = int((border & (frame != tw.WALL_ID)).sum())
    if n_border > max_layout_diff:
      r.append(f"border wall broken: {n_border} px")
    n_wall = int(((frame == tw.WALL_ID) != ref_wall).sum())
    if n_wall > max_layout_diff:
      r.append(f"walls changed: {n_wall} px")
    # Object pixels must keep their exact id (colour), not only their place.
    n_obj = int(((frame != ref) & (ref_obj | np.isin(frame, tw.OBJECT_IDS))).sum())
    if n_obj > max_layout_diff:
      r.append(f"objects changed: {n_obj} px")
    agents = components(frame == tw.AGENT_ID)
    if len(agents) != 1:
      r.append(f"{len(agents)} agent blobs")
    else:
      ext = agents[0].max(0) - agents[0].min(0) + 1
      if abs(len(agents[0]) - a * a) > agent_size_tol or (ext > a + agent_size_tol).any():
        r.append(f"agent blob of {len(agents[0])} px, {ext[1]}x{ext[0]}")
    p = cfg.projectile_size
    for blob in components(frame == tw.PROJECTILE_ID):
      ext = blob.max(0) - blob.min(0) + 1
      if (ext > p).any():
        r.append(f"projectile blob of {ext[1]}x{ext[0]}")
    bg_px = rgb[t][frame == tw.BG_ID]
    if not len(bg_px):
      r.append("no background")
    elif np.linalg.norm(bg_px.mean(0) - bg) > background_tol:
      r.append(f"background off by {np.linalg.norm(bg_px.mean(0) - bg):.1f}")
    reasons.append(r)
  return np.array([not r for r in reasons]), reasons


def ground_truth_report(num_clips: int = 50, num_chunks: int = 16,
                        config: ToyWorldConfig = ToyWorldConfig(), first_seed: int = 0) -> dict:
  """The oracle measured on generated ground truth (seeds first_seed .. first_seed+num_clips-1).

  Returns action accuracy (movement and fire together, and each alone) over all chunks,
  and the share of valid frames.
  """
  hits, move_hits, fire_hits, valid = [], [], [], []
  for seed in range(first_seed, first_seed + num_clips):
    clip = tw.generate_clip(seed, num_chunks, config)
    read = classify_chunks(clip.frames, config)
    hits += [a == r for a, r in zip(clip.actions, read)]
    move_hits += [a.movement == r.movement for a, r in zip(clip.actions, read)]
    fire_hits += [a.fire == r.fire for a, r in zip(clip.actions, read)]
    valid += list(frame_validity(clip.frames, None, config)[0])
  return {"clips": num_clips, "chunks": len(hits), "frames": len(valid),
          "action_accuracy": float(np.mean(hits)), "movement_accuracy": float(np.mean(move_hits)),
          "fire_accuracy": float(np.mean(fire_hits)), "frame_validity": float(np.mean(valid))}


if __name__ == "__main__":
  import argparse
  import json
  parser = argparse.ArgumentParser(description="Measure the oracle on toy-world ground truth.")
  parser.add_argument("--clips", type=int, default=50)
  parser.add_argument("--chunks", type=int, default=16)
  args = parser.parse_args()
  print(json.dumps(ground_truth_report(args.clips, args.chunks), indent=1))
