"""Scores of toy-world clips, generated or true: the generation evaluation's measures.

Pure NumPy, no model: everything is read back from frames by the oracle
(`data_pipelines.oracle`, by colour). `tv2tv_jax.generation_eval` runs a trained model and
calls these; docs/evaluation.md defines every score. Frames are uint8[1 + 4k, H, W, 3]
(frame 0 is the given first frame, chunk i covers frames 4i+1 .. 4i+4); texts are one
string per chunk.

  following       did the video do the action inserted at chunk i (`intervention_following`)
  consistency     per chunk, did the video do what its own text says (`self_consistency`)
  visual          per generated frame: valid, agent present / intact, track continuous,
                  layout preserved (`visual_scores`), with tolerances fitted on VAE
                  reconstructions of true clips (`fit_validity_tolerances`)
  plausibility    oracle-read action statistics against true clips (`plausibility`)
  chance          what a player that ignores the text scores (`chance`)
  intervention    which action to insert (`chunk_state`, `choose_intervention`)
  bootstrap       95% intervals over clips (`bootstrap_ci`, `summarise`)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipelines import oracle
from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action, ToyWorldConfig

TOLERANCE_KEYS = ("max_unknown", "max_layout_diff", "agent_size_tol", "background_tol")
# Ground truth passes with these: every pixel is an exact palette colour.
ZERO_TOLERANCES = {"max_unknown": 0, "max_layout_diff": 0, "agent_size_tol": 0,
                   "background_tol": 0.0}
MOVE_CATEGORIES = (*tw.MOVES, oracle.UNKNOWN)  # what the oracle can read as a movement
VISUAL_KEYS = ("valid", "agent_present", "agent_intact", "layout_preserved", "track_continuity")


def _uint8(frames: np.ndarray, field: str = "frames") -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"{field} must be uint8[T, H, W, 3], got {frames.dtype}{list(frames.shape)}")
  return frames


def _parse(text: str) -> Action | None:
  try:
    return tw.parse_action_text(text)
  except ValueError:
    return None


# --------------------------------------------------------------------------- frames

def frame_measurements(frames: np.ndarray, reference_frame: np.ndarray,
                       config: ToyWorldConfig = ToyWorldConfig(),
                       threshold: float = 40.0) -> dict[str, np.ndarray]:
  """Per frame, the quantities `oracle.frame_validity` compares with its tolerances.

  Args:
    frames: uint8[T, H, W, 3]; reference_frame: uint8[H, W, 3] whose walls and objects
      every frame should show (the given first frame).
  Returns (float64[T] each, NaN where undefined):
    unknown: pixels far from every palette colour (vs max_unknown);
    layout_diff: the largest of border-wall, wall and object pixel differences from the
      reference (vs max_layout_diff);
    agent_blobs: number of agent-coloured blobs;
    agent_size_dev: max(|pixels - agent_size^2|, extent - agent_size) of the single agent
      blob (vs agent_size_tol); NaN unless exactly one blob;
    background_dist: RGB distance of the mean background pixel from the palette's
      (vs background_tol); NaN without background pixels;
    projectiles_ok: 1 when no projectile blob is larger than a projectile;
    centroid_x, centroid_y: the largest agent blob's centroid (the oracle's track).
  Mirrors `oracle.frame_validity` check for check (tests hold the two together).
  """
  frames = _uint8(frames)
  cfg, a = config, config.agent_size
  ids = oracle.quantise(frames, threshold)
  ref = oracle.quantise(np.asarray(reference_frame)[None], threshold)[0]
  ref_wall, ref_obj = ref == tw.WALL_ID, np.isin(ref, tw.OBJECT_IDS)
  t_ = cfg.wall_thickness
  border = np.zeros_like(ref_wall)
  border[:t_, :] = border[-t_:, :] = border[:, :t_] = border[:, -t_:] = True
  bg = np.asarray(tw.BACKGROUND, np.float32)
  out = {k: np.full(len(frames), np.nan) for k in (
      "unknown", "layout_diff", "agent_blobs", "agent_size_dev", "background_dist",
      "projectiles_ok", "centroid_x", "centroid_y")}
  for t, frame in enumerate(ids):
    out["unknown"][t] = (frame == oracle.UNKNOWN_ID).sum()
    out["layout_diff"][t] = max(
        (border & (frame != tw.WALL_ID)).sum(), ((frame == tw.WALL_ID) != ref_wall).sum(),
        ((frame != ref) & (ref_obj | np.isin(frame, tw.OBJECT_IDS))).sum())
    agents = oracle.components(frame == tw.AGENT_ID)
    out["agent_blobs"][t] = len(agents)
    if len(agents) == 1:
      ext = agents[0].max(0) - agents[0].min(0) + 1
      out["agent_size_dev"][t] = max(abs(len(agents[0]) - a * a), int(ext.max()) - a)
    if agents:
      yx = max(agents, key=len).mean(0)
      out["centroid_x"][t], out["centroid_y"][t] = yx[1], yx[0]
    p = cfg.projectile_size
    shots = oracle.components(frame == tw.PROJECTILE_ID)
    out["projectiles_ok"][t] = all(((b.max(0) - b.min(0) + 1) <= p).all() for b in shots)
    bg_px = frames[t][frame == tw.BG_ID].astype(np.float32)
    if len(bg_px):
      out["background_dist"][t] = np.linalg.norm(bg_px.mean(0) - bg)
  return out


def track_continuity(centroids: np.ndarray,
                     config: ToyWorldConfig = ToyWorldConfig()) -> np.ndarray:
  """centroids: float[T, 2] (x, y), NaN where no agent -> bool[T - 1]: frame t-1 -> t continuous.

  Continuous: both frames show an agent and its centroid moved at most 2 * speed px on
  each axis (Chebyshev). The world moves the agent exactly `speed` px per frame along
  one axis, so the true track jumps by speed or 0; the extra `speed` px absorbs the
  centroid shift of a deformed blob (a few pixels gained or lost move a 4x4 blob's
  centroid by under 1 px), while anything beyond is a jump the world cannot make:
  the agent teleported, vanished, or another blob took over as the largest. A chunk's
  whole motion (frames_per_chunk * speed = 8 px) in one frame fails, as it should.
  """
  c = np.asarray(centroids, np.float64)
  step = np.abs(np.diff(c, axis=0)).max(-1)  # NaN when either frame has no agent
  return np.nan_to_num(step, nan=np.inf) <= 2 * config.speed


def _reason_kind(reason: str) -> str:
  return re.sub(r"\d+(\.\d+)?", "N", reason.split(":")[0].split(" of ")[0]).strip()


def visual_scores(frames: np.ndarray, reference_frame: np.ndarray,
                  tolerances: Mapping[str, float] = ZERO_TOLERANCES,
                  config: ToyWorldConfig = ToyWorldConfig()) -> dict[str, Any]:
  """Per clip, the share of generated frames (1 .. T-1; frame 0 is given) that pass each proxy.

  Args:
    frames: uint8[1 + 4k, H, W, 3]; reference_frame: uint8[H, W, 3] the given first frame;
    tolerances: the four `oracle.frame_validity` tolerances (TOLERANCE_KEYS).
  Returns:
    valid: `oracle.frame_validity` against reference_frame with `tolerances`;
    agent_present: exactly one agent blob;
    agent_intact: present, and the blob's size and extent within agent_size_tol;
    layout_preserved: walls and objects within max_layout_diff pixels of the reference;
    track_continuity: share of the T-1 frame transitions (from frame 0) that are
      continuous (`track_continuity`);
    invalid_reasons: {kind of failed check: frames}.
  """
  frames = _uint8(frames)
  missing = [k for k in TOLERANCE_KEYS if k not in tolerances]
  if missing:
    raise ValueError(f"tolerances lacks {missing}")
  tol = {k: tolerances[k] for k in TOLERANCE_KEYS}
  valid, reasons = oracle.frame_validity(frames, reference_frame, config, **tol)
  m = frame_measurements(frames, reference_frame, config)
  gen = slice(1, None)
  present = m["agent_blobs"][gen] == 1
  intact = present & (np.nan_to_num(m["agent_size_dev"][gen], nan=np.inf)
                      <= tol["agent_size_tol"])
  kinds: dict[str, int] = {}
  for r in reasons[1:]:
    for kind in sorted({_reason_kind(x) for x in r}):
      kinds[kind] = kinds.get(kind, 0) + 1
  mean = lambda x: float(np.mean(x)) if len(x) else float("nan")
  cont = track_continuity(np.stack([m["centroid_x"], m["centroid_y"]], -1), config)
  return {"valid": mean(valid[gen]), "agent_present": mean(present),
          "agent_intact": mean(intact),
          "layout_preserved": mean(m["layout_diff"][gen] <= tol["max_layout_diff"]),
          "track_continuity": mean(cont), "invalid_reasons": kinds}


def fit_validity_tolerances(recon_clips: Sequence[np.ndarray], true_clips: Sequence[np.ndarray],
                            config: ToyWorldConfig = ToyWorldConfig(),
                            target: float = 0.99) -> dict[str, float]:
  """The `oracle.frame_validity` tolerances that VAE reconstructions of true clips pass.

  Args:
    recon_clips, true_clips: equally many uint8[1 + 4k, H, W, 3] clips, reconstruction
      and original; each reconstruction is measured (`frame_measurements`, frames 1 ..
      T-1, as scored) against its original's first frame.
    target: the share of reconstructed frames the fitted tolerances should pass.
  Returns:
    {max_unknown, max_layout_diff, agent_size_tol, background_tol}: each the
    1 - (1 - target) / 4 quantile of its quantity over all measured frames (an observed
    value, i.e. rounded up to a frame's; background_tol rounded up to 0.1), so that by the
    union bound at least `target` of the frames pass all four together. Checks without a
    tolerance (one agent blob, projectile sizes) are not loosened.
  """
  if len(recon_clips) != len(true_clips) or not len(recon_clips):
    raise ValueError(f"recon_clips ({len(recon_clips)}) and true_clips ({len(true_clips)}) "
                     f"must be equally many, at least one")
  if not 0 < target < 1:
    raise ValueError(f"target must be in (0, 1), got {target}")
  pooled: dict[str, list[np.ndarray]] = {k: [] for k in (
      "unknown", "layout_diff", "agent_size_dev", "background_dist")}
  for k, (recon, true) in enumerate(zip(recon_clips, true_clips)):
    recon, true = _uint8(recon, f"recon_clips[{k}]"), _uint8(true, f"true_clips[{k}]")
    if recon.shape != true.shape:
      raise ValueError(f"recon_clips[{k}] has shape {recon.shape}, true_clips[{k}] {true.shape}")
    m = frame_measurements(recon[1:], true[0], config)
    for key in pooled:
      pooled[key].append(m[key])
  q = 1.0 - (1.0 - target) / len(TOLERANCE_KEYS)

  def quantile(key: str) -> float:
    x = np.concatenate(pooled[key])
    x = x[np.isfinite(x)]
    return float(np.quantile(x, q, method="higher")) if len(x) else 0.0

  return {"max_unknown": int(quantile("unknown")),
          "max_layout_diff": int(quantile("layout_diff")),
          "agent_size_tol": int(quantile("agent_size_dev")),
          "background_tol": float(np.ceil(quantile("background_dist") * 10 - 1e-9) / 10)}


# --------------------------------------------------------------------------- actions

def read_actions(frames: np.ndarray, config: ToyWorldConfig = ToyWorldConfig()) -> list[Action]:
  """uint8[1 + 4k, H, W, 3] -> k Actions read by the oracle (movement may be 'unknown')."""
  return oracle.classify_chunks(_uint8(frames), config)


def self_consistency(read: Sequence[Action], texts: Sequence[str]) -> dict[str, float]:
  """Per chunk, does the read action equal the action its own text says?

  read: k Actions read from the frames; texts: the k chunk texts (TV2TV: text_i; Think2V:
  plan item i). A text that is not an action text (`toy_world.parse_action_text` raises)
  counts as inconsistent and, separately, as unparseable.
  Returns {consistent, unparseable}: shares of the k chunks (NaN when k = 0), and chunks.
  """
  if len(read) != len(texts):
    raise ValueError(f"{len(read)} read actions, {len(texts)} texts")
  if not texts:
    return {"consistent": float("nan"), "unparseable": float("nan"), "chunks": 0}
  said = [_parse(t) for t in texts]
  ok = [s is not None and s == Action(*r) for s, r in zip(said, read)]
  return {"consistent": float(np.mean(ok)),
          "unparseable": float(np.mean([s is None for s in said])), "chunks": len(texts)}


def intervention_following(read: Sequence[Action], chunk: int, text: str) -> dict[str, float]:
  """Did chunk `chunk` of a clip whose read actions are `read` do the inserted action `text`?

  Returns {movement, fire, both}: 1.0 or 0.0 each (`oracle.action_agreement` on that chunk).
  """
  if not 0 <= chunk < len(read):
    raise ValueError(f"chunk {chunk} is outside the clip's {len(read)} chunks")
  agree = oracle.action_agreement([read[chunk]], [tw.parse_action_text(text)])
  return {k: agree[k] for k in ("movement", "fire", "both")}


# --------------------------------------------------------------------------- state, chance

@dataclasses.dataclass(frozen=True)
class ChunkState:
  """The world's state at the start of chunk `chunk`, read off a clip's frames.

  x, y: the agent's top-left corner (px) in the frame before the chunk (None: no agent);
  facing: index into toy_world.DIRECTIONS of the last movement read before the chunk
  (None: none yet, e.g. chunk 0, whose true facing is drawn at random and invisible);
  prev: the action read for chunk - 1 (None for chunk 0 or an unknown movement);
  allowed: `toy_world.allowed_moves` in this state (None without an agent).
  """
  chunk: int
  x: int | None
  y: int | None
  facing: int | None
  prev: Action | None
  allowed: dict[str, bool] | None

  def to_json(self) -> dict[str, Any]:
    return {"chunk": self.chunk, "x": self.x, "y": self.y,
            "facing": None if self.facing is None else tw.DIRECTIONS[self.facing],
            "prev": None if self.prev is None else tw.action_text(self.prev),
            "allowed": None if self.allowed is None else [
                tw.action_text(a) for a in tw.ACTIONS if tw.permits(self.allowed, a)]}


def chunk_state(frames: np.ndarray, chunk: int, layout_ids: np.ndarray,
                config: ToyWorldConfig = ToyWorldConfig(),
                read: Sequence[Action] | None = None) -> ChunkState:
  """The state at the start of chunk `chunk` of `frames` (uint8[1 + 4k, H, W, 3]).

  layout_ids: int[H, W] palette ids whose walls and objects block (the given first
  frame, quantised); read: the clip's read actions if already computed.
  """
  frames = _uint8(frames)
  read = read_actions(frames, config) if read is None else read
  if not 0 <= chunk < len(read):
    raise ValueError(f"chunk {chunk} is outside the clip's {len(read)} chunks")
  t = config.frames_per_chunk * chunk
  cx, cy = oracle.agent_centroids(oracle.quantise(frames[t:t + 1]))[0]
  facing = next((tw.DIRECTIONS.index(r.movement) for r in reversed(read[:chunk])
                 if r.movement in tw.DIRECTIONS), None)
  prev = read[chunk - 1] if chunk and read[chunk - 1].movement != oracle.UNKNOWN else None
  if np.isnan(cx):
    return ChunkState(chunk, None, None, facing, prev, None)
  # The centroid of an agent_size square at x is x + (agent_size - 1) / 2.
  x, y = (int(round(float(v) - (config.agent_size - 1) / 2)) for v in (cx, cy))
  allowed = tw.allowed_moves(layout_ids, x, y, facing, config)
  return ChunkState(chunk, x, y, facing, None if prev is None else Action(*prev), allowed)


def chance(state: ChunkState, inserted: Action,
           config: ToyWorldConfig = ToyWorldConfig()) -> dict[str, float]:
  """The floor: P(an action the toy world's policy draws in `state` matches `inserted`).

  The policy ignoring the text: `toy_world.policy_distribution(state.allowed, state.prev)`
  (repeat the previous action with probability `persistence` if still allowed, else a
  uniform allowed movement with fire at `fire_prob` where allowed). Where the state
  allows nothing (no agent, or an agent on blocked cells) the draw is uniform over the
  10 actions. Returns {movement, fire, both}: P(same movement), P(same fire), P(same action).
  """
  dist = tw.policy_distribution(state.allowed, state.prev, config) if state.allowed else {}
  if not dist:
    dist = {a: 1.0 / len(tw.ACTIONS) for a in tw.ACTIONS}
  ins = Action(*inserted)
  return {"movement": float(sum(p for a, p in dist.items() if a.movement == ins.movement)),
          "fire": float(sum(p for a, p in dist.items() if a.fire == ins.fire)),
          "both": float(dist.get(ins, 0.0))}


@dataclasses.dataclass(frozen=True)
class Intervention:
  """An inserted action: chunk index, its text, the model's own text there (free run),
  whether it was drawn among the actions allowed in the state, and how many there were."""
  chunk: int
  text: str
  own_text: str
  feasible: bool
  candidates: int

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def choose_intervention(free_text: str, state: ChunkState, rng: np.random.Generator,
                        config: ToyWorldConfig = ToyWorldConfig()) -> Intervention:
  """The action to insert at chunk `state.chunk`: uniform over the allowed action texts
  whose action differs from the one the model wrote there itself (`free_text`).

  Allowed: `toy_world.permits` in `state` (facing unknown: "fire" only if allowed for
  every facing). When nothing allowed differs (no agent found, or only the model's own
  action is allowed) the draw is over all 10 actions except the model's own, and
  `feasible` is False. An unparseable `free_text` excludes nothing. One `rng.integers`
  draw: deterministic in the rng.
  """
  del config  # the state's `allowed` already holds the world's rules
  own = _parse(free_text)
  allowed = [a for a in tw.ACTIONS if state.allowed and tw.permits(state.allowed, a)]
  cands = [a for a in allowed if a != own]
  feasible = bool(cands)
  if not feasible:
    cands = [a for a in tw.ACTIONS if a != own]
  pick = cands[int(rng.integers(len(cands)))]
  return Intervention(state.chunk, tw.action_text(pick), free_text, feasible, len(cands))


# --------------------------------------------------------------------------- plausibility

_NUM_JOINT = 2 * len(MOVE_CATEGORIES)  # (movement category, fire)


def action_counts(read: Sequence[Action]) -> np.ndarray:
  """k read Actions -> float[2 * 6 + 2]: joint (movement category, fire) counts (index
  2 * MOVE_CATEGORIES.index(movement) + fire), then repeated and comparable chunk pairs.

  Persistence pairs are consecutive chunks whose movements are both known; a pair
  repeats when both actions are equal.
  """
  out = np.zeros(_NUM_JOINT + 2)
  for r in read:
    out[2 * MOVE_CATEGORIES.index(r.movement) + int(r.fire)] += 1
  for a, b in zip(read, read[1:]):
    if oracle.UNKNOWN not in (a.movement, b.movement):
      out[_NUM_JOINT] += Action(*a) == Action(*b)
      out[_NUM_JOINT + 1] += 1
  return out


def action_stats(counts: np.ndarray) -> dict[str, Any]:
  """Summed `action_counts` -> movement distribution, fire rate, persistence, unknown rate."""
  joint = counts[:_NUM_JOINT]
  n = joint.sum()
  move = joint.reshape(-1, 2).sum(1) / max(n, 1)
  return {"chunks": int(n), "movement": dict(zip(MOVE_CATEGORIES, move.tolist())),
          "fire_rate": float(joint[1::2].sum() / max(n, 1)),
          "persistence": float(counts[_NUM_JOINT] / max(counts[_NUM_JOINT + 1], 1)),
          "unknown_rate": float(move[-1])}


def _tv(p: np.ndarray, q: np.ndarray) -> float:
  return 0.5 * float(np.abs(p - q).sum())


def plausibility(generated: Sequence[Sequence[Action]], truth: Sequence[Sequence[Action]],
                 num_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
  """Oracle-read action statistics of generated clips against true clips (no text needed).

  generated, truth: per clip, its read Actions. Distances, each with a 95% bootstrap CI
  over the generated clips (truth held fixed): tv_movement, the total-variation distance
  of the movement distributions (left/right/up/down/stop/unknown); tv_action, of the
  joint (movement, fire) distributions; fire_rate, persistence and unknown_rate, the
  absolute differences of those rates.
  """
  if not generated or not truth:
    raise ValueError("plausibility needs at least one generated and one true clip")
  gen = np.stack([action_counts(r) for r in generated])
  true_counts = np.stack([action_counts(r) for r in truth]).sum(0)
  true_stats = action_stats(true_counts)
  true_joint = true_counts[:_NUM_JOINT] / max(true_counts[:_NUM_JOINT].sum(), 1)

  def distances(rows: np.ndarray) -> dict[str, float]:
    c = rows.sum(0)
    s = action_stats(c)
    joint = c[:_NUM_JOINT] / max(c[:_NUM_JOINT].sum(), 1)
    return {"tv_movement": _tv(joint.reshape(-1, 2).sum(1), true_joint.reshape(-1, 2).sum(1)),
            "tv_action": _tv(joint, true_joint),
            "fire_rate": abs(s["fire_rate"] - true_stats["fire_rate"]),
            "persistence": abs(s["persistence"] - true_stats["persistence"]),
            "unknown_rate": abs(s["unknown_rate"] - true_stats["unknown_rate"])}

  out = {"generated": action_stats(gen.sum(0)), "truth": true_stats, "distance": {}}
  for key in distances(gen):
    stat = lambda rows, key=key: distances(rows)[key]
    mean, lo, hi = bootstrap_ci(gen, num_resamples, seed, statistic=stat)
    out["distance"][key] = {"value": mean, "lo": lo, "hi": hi}
  return out


# --------------------------------------------------------------------------- bootstrap

def bootstrap_ci(values: Any, num_resamples: int = 2000, seed: int = 0, level: float = 0.95,
                 statistic: Callable[[np.ndarray], float] | None = None
                 ) -> tuple[float, float, float]:
  """Percentile bootstrap over clips: (statistic, lo, hi).

  values: float[N] one value per clip (NaN clips dropped: a score undefined for them),
    or [N, ...] rows with `statistic(rows) -> float` (default: the mean of float[N]).
  The unit of resampling is the clip: each resample draws N clips with replacement
  (`np.random.default_rng(seed)`, deterministic). Returns NaNs when no clip is left.
  """
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  if num_resamples < 1:
    raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
  x = np.asarray(values, np.float64)
  if statistic is None and x.ndim != 1:
    raise ValueError(f"values must be float[N] without a statistic, got shape {x.shape}")
  if statistic is None:
    x = x[np.isfinite(x)]
  if not len(x):
    return float("nan"), float("nan"), float("nan")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(x), size=(num_resamples, len(x)))
  if statistic is None:
    point, stats = float(x.mean()), x[idx].mean(1)
  else:
    point, stats = float(statistic(x)), np.array([statistic(x[i]) for i in idx])
  alpha = (1 - level) / 2
  return point, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def summarise(records: Sequence[Mapping[str, Any]], keys: Sequence[str],
              num_resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
  """Per key, {mean, lo, hi, n} of the per-clip values `records[c][key]` (NaN/None dropped)."""
  out = {}
  for key in keys:
    vals = np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])
    mean, lo, hi = bootstrap_ci(vals, num_resamples, seed)
    out[key] = {"mean": mean, "lo": lo, "hi": hi, "n": int(np.isfinite(vals).sum())}
  return out
