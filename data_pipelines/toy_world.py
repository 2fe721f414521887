"""The toy world: a procedural 2D arena game, the project's CS:GO stand-in (docs/design.md, section 5).

Pure NumPy, deterministic in its seed (`np.random.default_rng(seed)`). One clip::

    clip = generate_clip(seed=3, num_chunks=16)       # ToyWorldConfig() defaults
    clip.frames   # uint8[1 + 4*16, 64, 64, 3], 16 fps
    clip.texts    # ["left", "left fire", "stop", "fire", ...], one per chunk

World. A 64x64 arena: a border wall, `num_walls` interior wall segments (horizontal or
vertical bars, `wall_thickness` px thick) and `num_objects` static square objects
(colours cycle through OBJECT_COLOURS), all drawn from the seed. An agent (a square of
`agent_size` px, its own colour) moves `speed` px per frame; projectiles (squares of
`projectile_size` px, their own colour) fly `projectile_speed` px per frame in the
direction the agent faces when it fires, and vanish when their path touches a wall or
an object. Every colour in PALETTE is used by exactly one kind of thing, so an oracle
can read the state back by colour (`data_pipelines.oracle`).

Time. A clip has 1 + 4k frames (the video VAE's 1 + 4k -> 1 + k latents): frame 0 is
the first frame (no action); chunk i (i = 1..k) covers frames 4(i-1)+1 .. 4i and holds
one Action for its 4 frames. Actions change only at chunk boundaries. Per frame t >= 1:
(1) the agent moves one step; (2) live projectiles advance (and vanish if blocked);
(3) on the first frame of a firing chunk one projectile spawns beside the agent, in the
facing direction, `projectile_gap` px from it; (4) the frame is rendered (static layout,
then projectiles, then agent). The agent faces its last movement direction (a random
direction before its first move); "stop" keeps the facing.

Policy. With probability `persistence` the previous chunk's action is repeated, else a
new one is drawn: a movement uniform over the allowed ones, fire with probability
`fire_prob`. A movement is allowed only if the agent stays inside free cells (no wall,
no object) at every frame of the chunk; fire is allowed only if the spawned projectile
lands on free cells. So the text always says what the frames show: the agent really
moves 4 * speed px in the written direction and a written fire really shows a new
projectile. A repeated action that is no longer allowed is redrawn. "stop" is always
allowed.

Forced actions: `generate_clip(..., forced={i: Action})` plays the given action at chunk
i when it is allowed there (a scripted player, for evaluation tests). `allowed_moves`,
`allowed_actions` and `policy_distribution` expose the policy's rules for a state read
off frames (data_pipelines/clip_scores.py).

Text template (one string per chunk): `"<move>"`, `"<move> fire"`, `"stop"`, or `"fire"`
(stop + fire), with <move> in left/right/up/down. Words: ACTION_WORDS.

Caption mode (sports-like, sparse): `caption_clip` writes a caption only on every
k-th chunk. By default (placement "plan") the caption before chunk i summarises chunks
i .. i+k-1, so, like TV2TV's text, it is read before the video it describes; placement
"report" keeps the old contrast (the caption before chunk i summarises chunks
i-k+1 .. i, mostly the past). See `caption_spans` and `summarise_actions`.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

import numpy as np

# Movements and their unit steps (dx, dy) in image coordinates: x = column, y = row (down).
MOVES = ("left", "right", "up", "down", "stop")
DIRECTIONS = ("left", "right", "up", "down")  # facing values; index = facing code in states
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "stop": (0, 0)}

# Per-chunk action text words, and the caption words; VOCAB is every word either can use.
ACTION_WORDS = ("left", "right", "up", "down", "stop", "fire")
COUNT_WORDS = ("", "", "twice", "three times", "four times", "five times", "six times",
               "seven times", "eight times", "nine times", "ten times", "eleven times",
               "twelve times")  # COUNT_WORDS[n] for a run of n; a run of 1 has no count
MAX_RUN = len(COUNT_WORDS) - 1  # the longest run one count word can name
# A caption summarises at most this many chunks; a run longer than MAX_RUN is written as
# several runs ("moved left twelve times then moved left twice"), so no new count words
# (and no change to VOCAB or to the tokenizer corpus built from it) are needed.
MAX_CAPTION_EVERY = 16
CAPTION_PLACEMENTS = ("plan", "report")
CAPTION_WORDS = tuple(sorted(
    {"moved", "stood", "still", "and", "fired", "then", *DIRECTIONS}
    | {w for c in COUNT_WORDS for w in c.split()}))
VOCAB = tuple(sorted(set(ACTION_WORDS) | set(CAPTION_WORDS)))

# RGB palette. Colours are far apart (min pairwise distance > 100) so that noisy frames
# can be quantised to the nearest palette colour (oracle).
BACKGROUND = (24, 24, 32)
WALL = (140, 140, 140)
AGENT = (60, 120, 255)
PROJECTILE = (255, 220, 40)
OBJECT_COLOURS = ((210, 50, 50), (40, 190, 80))
PALETTE = np.array([BACKGROUND, WALL, AGENT, PROJECTILE, *OBJECT_COLOURS], np.uint8)
BG_ID, WALL_ID, AGENT_ID, PROJECTILE_ID = 0, 1, 2, 3
OBJECT_IDS = tuple(range(4, 4 + len(OBJECT_COLOURS)))


class Action(NamedTuple):
  """One chunk's action: movement in MOVES, and whether a projectile is fired."""
  movement: str
  fire: bool


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
  """Toy-world parameters. Sizes and speeds are in pixels and pixels per frame."""
  fps: int = 16
  size: int = 64
  frames_per_chunk: int = 4  # the VAE's temporal factor: one latent frame per chunk
  agent_size: int = 4
  speed: int = 2
  # 4x4 projectiles 2 px from the agent: a 2x2 one 1 px away is smeared into the agent by
  # a spatial-factor-4 VAE, which then reads fire back from only ~0.93 of chunks (docs/vae.md).
  projectile_size: int = 4
  projectile_speed: int = 4
  projectile_gap: int = 2   # px between the agent and a newly spawned projectile
  persistence: float = 0.7  # probability of repeating the previous chunk's action
  fire_prob: float = 0.3    # probability of fire in a newly drawn action
  num_walls: int = 3
  wall_thickness: int = 2
  min_wall_len: int = 12
  max_wall_len: int = 28
  num_objects: int = 4
  object_size: int = 5

  def __post_init__(self):
    if self.projectile_speed <= self.speed:
      # The oracle tells a new projectile from an old one by its distance to the agent,
      # which only grows if projectiles outrun the agent.
      raise ValueError("projectile_speed must exceed speed")
    if self.speed > self.agent_size or self.speed > self.wall_thickness:
      raise ValueError("speed must not exceed agent_size or wall_thickness (no tunnelling)")
    if not 0.0 <= self.persistence <= 1.0 or not 0.0 <= self.fire_prob <= 1.0:
      raise ValueError("persistence and fire_prob are probabilities")
    if self.max_wall_len < self.min_wall_len or self.max_wall_len > self.size - 4 * self.wall_thickness:
      raise ValueError("wall lengths must satisfy min <= max <= size - 4 * wall_thickness")

  @property
  def spawn_distance(self) -> float:
    """Centre-to-centre distance (px, along the facing axis) of a new projectile."""
    return self.agent_size / 2 + self.projectile_gap + self.projectile_size / 2


@dataclasses.dataclass(frozen=True)
class Clip:
  """One generated clip.

  Attributes:
    frames: uint8[1 + 4k, size, size, 3] RGB frames; frame 0 precedes every action.
    actions: k Actions; actions[i] is held over frames 4i+1 .. 4i+4.
    texts: k strings, texts[i] = action_text(actions[i]).
    states: int32[1 + 4k, 3] per frame (x, y, facing): the agent's top-left corner and
      its facing as an index into DIRECTIONS.
    num_projectiles: int32[1 + 4k] live projectiles per frame.
    layout: uint8[size, size, 3] the static arena (background, walls, objects).
    seed: the seed the clip was generated from.
  """
  frames: np.ndarray
  actions: list[Action]
  texts: list[str]
  states: np.ndarray
  num_projectiles: np.ndarray
  layout: np.ndarray
  seed: int

  @property
  def num_chunks(self) -> int:
    return len(self.actions)


def action_text(action: Action) -> str:
  """The per-chunk text: "left", "left fire", "stop", "fire" (= stop + fire)."""
  if action.movement == "stop":
    return "fire" if action.fire else "stop"
  return f"{action.movement} fire" if action.fire else action.movement


def parse_action_text(text: str) -> Action:
  """Inverse of `action_text`; raises ValueError on anything it did not write."""
  words = text.split()
  fire = bool(words) and words[-1] == "fire"
  if fire:
    words = words[:-1]
  if not words and fire:
    return Action("stop", True)
  if len(words) != 1 or words[0] not in MOVES or (words[0] == "stop" and fire):
    raise ValueError(f"not an action text: {text!r}")
  return Action(words[0], fire)


# --------------------------------------------------------------------------- the arena

def _make_layout(rng: np.random.Generator, cfg: ToyWorldConfig) -> tuple[np.ndarray, np.ndarray]:
  """Draws the static arena. Returns ids: int8[size, size] palette ids, blocked: bool[size, size]."""
  n, t = cfg.size, cfg.wall_thickness
  ids = np.full((n, n), BG_ID, np.int8)
  ids[:t, :] = ids[-t:, :] = ids[:, :t] = ids[:, -t:] = WALL_ID
  for _ in range(cfg.num_walls):
    length = int(rng.integers(cfg.min_wall_len, cfg.max_wall_len + 1))
    # Keep a corridor of 2t between interior walls and the border so rooms stay reachable.
    a = int(rng.integers(2 * t, n - 2 * t - length + 1))
    b = int(rng.integers(2 * t, n - 3 * t + 1))
    if rng.random() < 0.5:
      ids[b:b + t, a:a + length] = WALL_ID  # horizontal
    else:
      ids[a:a + length, b:b + t] = WALL_ID  # vertical
  s = cfg.object_size
  for k in range(cfg.num_objects):
    for _ in range(100):  # rejection sampling: an object keeps 1 px clear of other blockers
      x, y = (int(v) for v in rng.integers(t + 1, n - t - s, size=2))
      if (ids[y - 1:y + s + 1, x - 1:x + s + 1] == BG_ID).all():
        ids[y:y + s, x:x + s] = OBJECT_IDS[k % len(OBJECT_IDS)]
        break
  return ids, ids != BG_ID


def _box_free(blocked: np.ndarray, x: int, y: int, w: int, h: int) -> bool:
  """Whether the box [y, y+h) x [x, x+w) lies inside the arena on free cells."""
  n = blocked.shape[0]
  if x < 0 or y < 0 or x + w > n or y + h > n:
    return False
  return not blocked[y:y + h, x:x + w].any()


def _spawn_position(cfg: ToyWorldConfig, x: int, y: int, facing: int) -> tuple[int, int]:
  """Top-left corner of a projectile spawned by an agent at (x, y) facing DIRECTIONS[facing]."""
  a, p, g = cfg.agent_size, cfg.projectile_size, cfg.projectile_gap
  off = (a - p) // 2  # centred across the facing axis
  d = DIRECTIONS[facing]
  if d == "left":
    return x - g - p, y + off
  if d == "right":
    return x + a + g, y + off
  if d == "up":
    return x + off, y - g - p
  return x + off, y + a + g


def _allowed(cfg: ToyWorldConfig, blocked: np.ndarray, x: int, y: int,
             facing: int) -> dict[str, bool]:
  """Movement -> whether fire is allowed with it, for every allowed movement this chunk."""
  out = {}
  for move in MOVES:
    dx, dy = STEP[move]
    ok = all(_box_free(blocked, x + dx * cfg.speed * s, y + dy * cfg.speed * s,
                       cfg.agent_size, cfg.agent_size)
             for s in range(1, cfg.frames_per_chunk + 1))
    if ok:
      f = DIRECTIONS.index(move) if move != "stop" else facing
      px, py = _spawn_position(cfg, x + dx * cfg.speed, y + dy * cfg.speed, f)
      out[move] = _box_free(blocked, px, py, cfg.projectile_size, cfg.projectile_size)
  return out


def _choose(rng: np.random.Generator, cfg: ToyWorldConfig, prev: Action | None,
            allowed: dict[str, bool]) -> Action:
  """The persistent policy: repeat `prev` with prob `persistence` (if allowed), else redraw."""
  repeat = rng.random() < cfg.persistence
  if (repeat and prev is not None and prev.movement in allowed
      and (allowed[prev.movement] or not prev.fire)):
    return prev
  moves = [m for m in MOVES if m in allowed]  # MOVES order keeps the draw deterministic
  move = moves[int(rng.integers(len(moves)))]
  fire = bool(rng.random() < cfg.fire_prob) and allowed[move]
  return Action(move, fire)


def _render(static: np.ndarray, cfg: ToyWorldConfig, x: int, y: int,
            projectiles: Sequence[Sequence[int]]) -> np.ndarray:
  frame = static.copy()
  p = cfg.projectile_size
  for px, py, _ in projectiles:
    frame[py:py + p, px:px + p] = PROJECTILE
  frame[y:y + cfg.agent_size, x:x + cfg.agent_size] = AGENT
  return frame


def _advance(cfg: ToyWorldConfig, blocked: np.ndarray,
             projectiles: list[list[int]]) -> list[list[int]]:
  """Moves every projectile one frame; drops those whose swept path leaves free cells."""
  p, v = cfg.projectile_size, cfg.projectile_speed
  live = []
  for px, py, f in projectiles:
    dx, dy = STEP[DIRECTIONS[f]]
    nx, ny = px + dx * v, py + dy * v
    # The swept box covers every cell crossed this frame, so thin walls cannot be tunnelled.
    x0, y0 = min(px, nx), min(py, ny)
    if _box_free(blocked, x0, y0, abs(nx - px) + p, abs(ny - py) + p):
      live.append([nx, ny, f])
  return live


def generate_clip(seed: int, num_chunks: int, config: ToyWorldConfig = ToyWorldConfig(),
                  forced: Mapping[int, Action] | None = None) -> Clip:
  """Generates one clip of `num_chunks` chunks (1 + 4 * num_chunks frames), deterministic in seed.

  forced: chunk index (0-based) -> Action played there instead of the policy's choice,
    when that action is allowed in the chunk's state (`permits`); otherwise the policy's
    choice stands (read `clip.actions` for what was played). The policy still draws its
    own choice first, so the random stream, hence every chunk before the first forced
    one, is the unforced clip's; an empty `forced` gives the unforced clip bit for bit.
  """
  cfg = config
  forced = _check_forced(forced or {}, num_chunks)
  rng = np.random.default_rng(seed)
  ids, blocked = _make_layout(rng, cfg)
  static = PALETTE[ids]
  a = cfg.agent_size
  free = [(x, y) for y in range(cfg.size - a + 1) for x in range(cfg.size - a + 1)
          if not blocked[y:y + a, x:x + a].any()]
  x, y = free[int(rng.integers(len(free)))]
  facing = int(rng.integers(len(DIRECTIONS)))

  num_frames = 1 + cfg.frames_per_chunk * num_chunks
  frames = np.empty((num_frames, cfg.size, cfg.size, 3), np.uint8)
  states = np.empty((num_frames, 3), np.int32)
  counts = np.zeros(num_frames, np.int32)
  projectiles: list[list[int]] = []
  frames[0], states[0] = _render(static, cfg, x, y, projectiles), (x, y, facing)
  actions: list[Action] = []
  prev = None
  for c in range(num_chunks):
    allowed = _allowed(cfg, blocked, x, y, facing)
    action = _choose(rng, cfg, prev, allowed)
    if c in forced and permits(allowed, forced[c]):
      action = forced[c]
    actions.append(action)
    dx, dy = STEP[action.movement]
    if action.movement != "stop":
      facing = DIRECTIONS.index(action.movement)
    for s in range(cfg.frames_per_chunk):
      x, y = x + dx * cfg.speed, y + dy * cfg.speed
      projectiles = _advance(cfg, blocked, projectiles)
      if s == 0 and action.fire:
        projectiles.append([*_spawn_position(cfg, x, y, facing), facing])
      t = 1 + c * cfg.frames_per_chunk + s
      frames[t] = _render(static, cfg, x, y, projectiles)
      states[t], counts[t] = (x, y, facing), len(projectiles)
    prev = action
  return Clip(frames=frames, actions=actions, texts=[action_text(a) for a in actions],
              states=states, num_projectiles=counts, layout=static, seed=seed)


def _check_forced(forced: Mapping[int, Action], num_chunks: int) -> dict[int, Action]:
  out = {}
  for i, action in forced.items():
    if not isinstance(i, (int, np.integer)) or not 0 <= i < num_chunks:
      raise ValueError(f"forced[{i!r}]: chunk index must be in [0, num_chunks={num_chunks})")
    if not isinstance(action, tuple) or len(action) != 2 or action[0] not in MOVES:
      raise ValueError(f"forced[{i}]: expected an Action(movement in {MOVES}, fire), "
                       f"got {action!r}")
    out[int(i)] = Action(action[0], bool(action[1]))
  return out


# --------------------------------------------------------------------------- policy and state
# Public views of the policy for evaluation (data_pipelines/clip_scores.py): what the
# world allows in a state read off frames, and the exact distribution `_choose` draws from.

# Every action, in a fixed order (MOVES, each without then with fire): 10 action texts.
ACTIONS = tuple(Action(m, f) for m in MOVES for f in (False, True))


def blocked_cells(layout_ids: np.ndarray) -> np.ndarray:
  """layout_ids: int[size, size] palette ids (a quantised frame) -> bool[size, size] cells
  the agent may not enter: walls and objects. Agent, projectile and unknown pixels are
  free: they cover free cells in any valid frame."""
  return np.isin(np.asarray(layout_ids), (WALL_ID, *OBJECT_IDS))


def allowed_moves(layout_ids: np.ndarray, x: int, y: int, facing: int | None,
                  config: ToyWorldConfig = ToyWorldConfig()) -> dict[str, bool]:
  """Movement -> whether fire is allowed with it, for the movements allowed in a state.

  layout_ids: int[size, size] palette ids whose walls and objects block (`blocked_cells`);
  x, y: the agent's top-left corner (px); facing: index into DIRECTIONS, or None when
  unknown: then "stop" may fire only if it may for every facing, so that anything called
  allowed is allowed whatever the true facing. Empty when the agent itself stands on
  blocked cells (not a state the world reaches), otherwise it holds at least "stop".
  """
  blocked = blocked_cells(layout_ids)
  if facing is not None:
    return _allowed(config, blocked, int(x), int(y), int(facing))
  per_facing = [_allowed(config, blocked, int(x), int(y), f) for f in range(len(DIRECTIONS))]
  out = per_facing[0]
  for other in per_facing[1:]:
    out = {m: out[m] and other[m] for m in out}  # movements do not depend on facing
  return out


def permits(allowed: Mapping[str, bool], action: Action) -> bool:
  """Whether `action` is allowed under `allowed` (from `allowed_moves`)."""
  return action.movement in allowed and (allowed[action.movement] or not action.fire)


def next_state(x: int, y: int, facing: int | None, action: Action,
               config: ToyWorldConfig = ToyWorldConfig()) -> tuple[int, int, int | None]:
  """The agent's (x, y, facing) after a chunk that plays `action` (which must be allowed
  there: `permits`): frames_per_chunk steps of `speed` px; a movement sets the facing,
  "stop" keeps it (None stays unknown). Projectiles never block the agent."""
  dx, dy = STEP[action.movement]
  n = config.frames_per_chunk * config.speed
  if action.movement != "stop":
    facing = DIRECTIONS.index(action.movement)
  return int(x) + dx * n, int(y) + dy * n, facing


def allowed_actions(layout_ids: np.ndarray, x: int, y: int, facing: int | None,
                    config: ToyWorldConfig = ToyWorldConfig()) -> list[Action]:
  """The Actions allowed in a state (see `allowed_moves` for the arguments), ACTIONS order."""
  allowed = allowed_moves(layout_ids, x, y, facing, config)
  return [a for a in ACTIONS if permits(allowed, a)]


def policy_distribution(allowed: Mapping[str, bool], prev: Action | None,
                        config: ToyWorldConfig = ToyWorldConfig()) -> dict[Action, float]:
  """The probability of each action `_choose` returns, given `allowed` and the previous action.

  Exactly `_choose`: with probability `persistence` the previous action is kept if still
  allowed; otherwise (and always when it is not) a movement is drawn uniformly from the
  allowed ones and fire added with probability `fire_prob` where fire is allowed. Returns
  only actions of non-zero probability; empty when nothing is allowed.
  """
  moves = [m for m in MOVES if m in allowed]
  if not moves:
    return {}
  keep = config.persistence if prev is not None and permits(allowed, prev) else 0.0
  probs: dict[Action, float] = {}
  for m in moves:
    pf = config.fire_prob if allowed[m] else 0.0
    for fire, p in ((False, 1.0 - pf), (True, pf)):
      if p > 0:
        probs[Action(m, fire)] = (1.0 - keep) * p / len(moves)
  if keep:
    prev = Action(prev.movement, bool(prev.fire))
    probs[prev] = probs.get(prev, 0.0) + keep
  return probs


# --------------------------------------------------------------------------- captions

def _event(action: Action) -> str:
  if action.movement == "stop":
    return "fired" if action.fire else "stood still"
  return f"moved {action.movement} and fired" if action.fire else f"moved {action.movement}"


_EVENTS = {_event(a): a for a in (Action(m, f) for m in MOVES for f in (False, True))}
_COUNTS = {w: n for n, w in enumerate(COUNT_WORDS) if w}


def summarise_actions(actions: Sequence[Action]) -> str:
  """The caption template: one event per chunk, runs of equal events merged with a count.

  Event per chunk: "moved <dir>", "moved <dir> and fired", "stood still", "fired" (stop +
  fire). A run of n equal events gets COUNT_WORDS[n] appended ("twice", "three times",
  ...); runs are joined by " then ". E.g. [left, left, stop+fire] ->
  "moved left twice then fired". A run longer than MAX_RUN (12) is split into runs of
  at most MAX_RUN, the longest first. `parse_summary` inverts it.
  """
  if not actions or len(actions) > MAX_CAPTION_EVERY:
    raise ValueError(f"can summarise 1..{MAX_CAPTION_EVERY} actions, got {len(actions)}")
  runs: list[list] = []
  for e in map(_event, actions):
    if runs and runs[-1][0] == e and runs[-1][1] < MAX_RUN:
      runs[-1][1] += 1
    else:
      runs.append([e, 1])
  return " then ".join(f"{e} {COUNT_WORDS[n]}" if n > 1 else e for e, n in runs)


def parse_summary(text: str) -> list[Action]:
  """Inverse of `summarise_actions`: a caption -> one Action per chunk it describes.

  Raises ValueError on anything the template does not write (an empty string included).
  """
  actions: list[Action] = []
  for run in text.split(" then "):
    n = 1
    for word, count in _COUNTS.items():
      if run.endswith(" " + word):
        run, n = run[:-len(word) - 1], count
        break
    if run not in _EVENTS:
      raise ValueError(f"not a caption: {text!r} (no event {run!r})")
    actions += [_EVENTS[run]] * n
  # Only the template's own spelling: runs merged as it merges them, at most
  # MAX_CAPTION_EVERY chunks.
  if len(actions) > MAX_CAPTION_EVERY or summarise_actions(actions) != text:
    raise ValueError(f"not a caption as summarise_actions writes it: {text!r}")
  return actions


def caption_spans(num_chunks: int, every_k: int,
                  placement: str = "plan") -> list[tuple[int, int, int]]:
  """Where captions go: [(chunk whose text holds the caption, first, end)], the caption
  describing chunks first .. end-1, in chunk order.

  plan: a caption before chunk i for i = 0, k, 2k, ... describes chunks i .. i+k-1; the
    last one describes only the chunks left (num_chunks - i, possibly fewer than k).
  report: a caption before chunk i for i = k-1, 2k-1, ... describes chunks i-k+1 .. i,
    of which k-1 are already generated when it is read; trailing chunks after the last
    multiple of k get none.
  """
  if not 1 <= every_k <= MAX_CAPTION_EVERY:
    raise ValueError(f"every_k must be in 1..{MAX_CAPTION_EVERY}")
  if placement == "plan":
    return [(i, i, min(i + every_k, num_chunks)) for i in range(0, num_chunks, every_k)]
  if placement == "report":
    return [(end - 1, end - every_k, end)
            for end in range(every_k, num_chunks + 1, every_k)]
  raise ValueError(f"placement must be one of {CAPTION_PLACEMENTS}, got {placement!r}")


def caption_clip_with_truth(clip: Clip, every_k: int, wrong_rate: float, seed: int,
                            placement: str = "plan") -> tuple[list[str], list[bool]]:
  """`caption_clip`, plus per chunk whether its caption is a hallucinated (wrong) one."""
  spans = caption_spans(clip.num_chunks, every_k, placement)
  rng = np.random.default_rng(seed)
  captions, wrong = [""] * clip.num_chunks, [False] * clip.num_chunks
  # One draw per caption in chunk order (then the hallucination's own draws), so the
  # report placement's stream is the one it always had.
  for at, first, end in spans:
    truth = summarise_actions(clip.actions[first:end])
    if rng.random() < wrong_rate:
      # A hallucination: a well-formed summary of random actions that says something else.
      while True:
        fake = [Action(MOVES[int(rng.integers(len(MOVES)))], bool(rng.random() < 0.3))
                for _ in range(end - first)]
        text = summarise_actions(fake)
        if text != truth:
          break
      captions[at], wrong[at] = text, True
    else:
      captions[at] = truth
  return captions, wrong


def caption_clip(clip: Clip, every_k: int, wrong_rate: float, seed: int,
                 placement: str = "plan") -> list[str]:
  """Sparse sports-like captions: one string per chunk, "" except where a caption goes.

  placement "plan" (the default): chunk i with i % every_k == 0 gets `summarise_actions`
  of chunks i .. i+every_k-1, the caption read before the chunks it describes; the
  clip's last caption describes only the chunks left. "report": chunk i with
  (i+1) % every_k == 0 gets the summary of chunks i-every_k+1 .. i (`caption_spans`).
  With probability `wrong_rate` a caption is replaced by a well-formed summary of as
  many random actions that differs from the truth. Deterministic in `seed`.
  """
  return caption_clip_with_truth(clip, every_k, wrong_rate, seed, placement)[0]
