"""Sparse captions in the generation evaluation: what a run's texts say about each chunk,
which caption an intervention forces, and how every chunk it covers is scored.

A dense run writes one action text per chunk ("left fire"); `clip_scores` scores it and
nothing here changes that (`TextFormat()`, kind "action", routes straight to it). A run
trained on the toy world's caption mode (`toy_world.caption_clip`) writes a caption
(`toy_world.summarise_actions`, e.g. "moved left twice then fired") every `every`
chunks. With the plan placement the caption before chunk i describes chunks
i .. i+every-1, so a forced caption steers all of them:

  intervention chunk  the caption chunk that plans the chunk at the requested time:
                      every * (chunk // every) (`TextFormat.intervention_chunk`);
  forced caption      a plan of one action per covered chunk (`choose_plan`): the first
                      chosen exactly as the dense protocol chooses its action, the rest
                      drawn from the world's own policy in the state the plan reaches,
                      so the caption reads like a training caption;
  scores              each covered chunk read by the oracle against its planned action,
                      averaged over the covered chunks (`plan_scores`), chance and
                      kept-own likewise per chunk, each chunk's chance in the state the
                      intervened run reached there (`plan_states`).

With every = 1 a caption covers one chunk and the choice is the dense one. Captions in
the report placement describe chunks already generated, so they get no intervention.
Frames are uint8[1 + 4k, H, W, 3]; texts are k strings, "" where a chunk has none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines import clip_scores
from data_pipelines import toy_world as tw
from data_pipelines.toy_world import Action, ToyWorldConfig

TEXT_KINDS = ("action", "caption")


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """What a run's chunk texts are.

  kind: "action" (one `toy_world.action_text` per chunk: dense data) or "caption"
    (`toy_world.summarise_actions` every `every` chunks: the toy world's caption mode);
  every, placement: the caption period and placement (`toy_world.caption_spans`).
  """
  kind: str = "action"
  every: int = 1
  placement: str = "plan"

  def __post_init__(self):
    if self.kind not in TEXT_KINDS:
      raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {self.kind!r}")
    if self.kind == "action" and (self.every, self.placement) != (1, "plan"):
      raise ValueError("action texts come with every chunk: every = 1, placement 'plan'")
    tw.caption_spans(1, self.every, self.placement)  # validates every and placement

  @property
  def is_caption(self) -> bool:
    return self.kind == "caption"

  @property
  def can_intervene(self) -> bool:
    """False for report captions: a forced one would describe chunks already generated."""
    return self.placement == "plan"

  def parse(self, text: str) -> list[Action]:
    """One text -> the actions it says, one per chunk it describes; ValueError if it
    does not parse."""
    return tw.parse_summary(text) if self.is_caption else [tw.parse_action_text(text)]

  def texts_of(self, actions: Sequence[Action]) -> list[str]:
    """The true texts of a clip that played `actions` (captions: none wrong)."""
    if not self.is_caption:
      return [tw.action_text(a) for a in actions]
    out = [""] * len(actions)
    for at, first, end in tw.caption_spans(len(actions), self.every, self.placement):
      out[at] = tw.summarise_actions(actions[first:end])
    return out

  def said(self, texts: Sequence[str]) -> list[Action | None]:
    """Per chunk, the action its own text (action kind) or the caption describing it
    says; None where none does or the text does not parse. Plan captions describe the
    chunks from theirs on, report captions those up to theirs; where captions overlap
    (a model may write them anywhere) the later caption wins."""
    out: list[Action | None] = [None] * len(texts)
    for i, text in enumerate(texts):
      if not text and self.is_caption:
        continue
      try:
        actions = self.parse(text)
      except ValueError:
        continue
      first = i if self.placement == "plan" else i + 1 - len(actions)
      for j, a in enumerate(actions):
        if 0 <= first + j < len(texts):
          out[first + j] = a
    return out

  def forced_actions(self, chunk: int, text: str, num_chunks: int) -> dict[int, Action]:
    """A text forced before `chunk` -> chunk index -> the action it says there."""
    return {chunk + j: a for j, a in enumerate(self.parse(text)) if chunk + j < num_chunks}

  def intervention_chunk(self, chunk: int) -> int:
    """The caption chunk that plans `chunk` (itself for action texts)."""
    return self.every * (chunk // self.every)


ACTION_TEXTS = TextFormat()


def text_format(builder_config: Any) -> TextFormat:
  """The texts a toy-world TFDS builder config (`toy_world_tfds.ToyWorldBuilderConfig`)
  trains with; action texts when it is None or dense."""
  if builder_config is None or builder_config.caption_mode != "sports":
    return ACTION_TEXTS
  return TextFormat("caption", int(builder_config.caption_every),
                    builder_config.caption_placement)


def caption_plan(plan: Mapping[str, Any], fmt: TextFormat) -> dict[str, Any]:
  """`generation_eval.intervention_chunks`' plan with each chunk moved to the caption
  that plans it; times that land on the same caption keep the first name (`merged`)."""
  out = dict(plan)
  chunks: dict[str, int] = {}
  merged: dict[str, str] = {}
  for name, chunk in plan["chunks"].items():
    c = fmt.intervention_chunk(chunk)
    same = next((n for n, x in chunks.items() if x == c), None)
    if same is None:
      chunks[name] = c
    else:
      merged[name] = same
  out.update(rule=f"{plan['rule']}, then the caption that plans it: "
             f"{fmt.every} * (chunk // {fmt.every})",
             time_chunks=dict(plan["chunks"]), chunks=chunks, merged=merged,
             caption_every=fmt.every)
  return out


def consistency(read: Sequence[Action], texts: Sequence[str],
                fmt: TextFormat = ACTION_TEXTS) -> dict[str, float]:
  """Self-consistency. Action texts: `clip_scores.self_consistency`, unchanged. Captions:
  consistent, the share of the k chunks whose read action equals what the caption
  describing it says (a chunk no parseable caption describes counts inconsistent);
  unparseable, the share of written captions that do not parse (NaN when none is
  written); uncovered, the share of chunks no parseable caption describes."""
  if not fmt.is_caption:
    return clip_scores.self_consistency(read, texts)
  if len(read) != len(texts):
    raise ValueError(f"{len(read)} read actions, {len(texts)} texts")
  if not texts:
    return {"consistent": float("nan"), "unparseable": float("nan"),
            "uncovered": float("nan"), "chunks": 0}
  said = fmt.said(texts)
  written = [t for t in texts if t]
  bad = [t for t in written if not _parses(fmt, t)]
  return {"consistent": float(np.mean([s is not None and s == Action(*r)
                                       for s, r in zip(said, read)])),
          "unparseable": len(bad) / len(written) if written else float("nan"),
          "uncovered": float(np.mean([s is None for s in said])), "chunks": len(texts)}


def _parses(fmt: TextFormat, text: str) -> bool:
  try:
    fmt.parse(text)
    return True
  except ValueError:
    return False


@dataclasses.dataclass(frozen=True)
class PlanIntervention(clip_scores.Intervention):
  """A forced caption: `text` summarises `actions`, one per chunk from `chunk` on.
  `feasible`: every action was allowed in the state the plan reaches (from the state
  read at `chunk`); `candidates`: how many first actions the draw chose among."""
  actions: tuple[Action, ...]


def choose_plan(free_texts: Sequence[str], state: clip_scores.ChunkState,
                layout_ids: np.ndarray, fmt: TextFormat, num_chunks: int,
                rng: np.random.Generator,
                config: ToyWorldConfig = ToyWorldConfig()) -> PlanIntervention:
  """The caption to force at chunk `state.chunk`: one action per chunk it covers
  (min(every, num_chunks - chunk)).

  The first is `clip_scores.choose_intervention`'s: uniform over the allowed actions
  other than what the model's free run says for that chunk (`fmt.said(free_texts)`).
  Each later one is drawn (one `rng.choice`) from the world's policy
  (`toy_world.policy_distribution`, previous action = the plan's) in the state the plan
  reaches (`toy_world.next_state` from the state read at the chunk); once the state is
  unknown (no agent, or an action the world would not play) the draws are uniform over
  the 10 actions and the plan is not feasible. Deterministic in the rng.
  """
  c = state.chunk
  cover = min(fmt.every, num_chunks - c)
  own = fmt.said(free_texts)[c]
  first = clip_scores.choose_intervention("" if own is None else tw.action_text(own), state,
                                          rng, config)
  actions = [tw.parse_action_text(first.text)]
  feasible = first.feasible
  where = (state.x, state.y, state.facing) if feasible and state.x is not None else None
  for _ in range(1, cover):
    if where is not None:
      where = tw.next_state(*where, actions[-1], config)
      allowed = tw.allowed_moves(layout_ids, where[0], where[1], where[2], config)
      dist = tw.policy_distribution(allowed, actions[-1], config)
    else:
      dist = {}
    if not dist:
      where, feasible = None, False
      dist = {a: 1.0 / len(tw.ACTIONS) for a in tw.ACTIONS}
    acts = list(dist)
    actions.append(acts[int(rng.choice(len(acts), p=np.array([dist[a] for a in acts])))])
  own_text = free_texts[c] if c < len(free_texts) else ""
  return PlanIntervention(c, tw.summarise_actions(actions), own_text, feasible,
                          first.candidates, tuple(actions))


def plan_states(frames: np.ndarray, iv: PlanIntervention, first: clip_scores.ChunkState,
                layout_ids: np.ndarray, read: Sequence[Action],
                config: ToyWorldConfig = ToyWorldConfig()) -> list[clip_scores.ChunkState]:
  """Per covered chunk, the state chance is computed in: at the intervention chunk the
  free run's `first` (the runs agree up to there), later the intervened run's own
  (`clip_scores.chunk_state` of its frames uint8[1 + 4k, H, W, 3] and read actions)."""
  return [first] + [clip_scores.chunk_state(frames, iv.chunk + j, layout_ids, config, read)
                    for j in range(1, len(iv.actions))]


def plan_scores(iv: PlanIntervention, read: Sequence[Action],
                states: Sequence[clip_scores.ChunkState], free_read: Sequence[Action],
                config: ToyWorldConfig = ToyWorldConfig()) -> dict[str, Any]:
  """Per clip: movement, fire, both (`clip_scores.intervention_following` of each
  covered chunk against its planned action), chance_movement / _fire / _both
  (`clip_scores.chance` of each planned action in its state), kept_own (the chunk reads
  as in the free run), each the mean over the covered chunks; and per chunk the same,
  in lists under `per_chunk` (offset 0 = the intervention chunk)."""
  rows = []
  for j, (action, state) in enumerate(zip(iv.actions, states)):
    i = iv.chunk + j
    row = clip_scores.intervention_following(read, i, tw.action_text(action))
    row.update({f"chance_{k}": v for k, v in clip_scores.chance(state, action, config).items()})
    row["kept_own"] = float(Action(*read[i]) == Action(*free_read[i]))
    rows.append(row)
  keys = list(rows[0])
  out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
  out["covered"] = len(rows)
  out["plan"] = [tw.action_text(a) for a in iv.actions]
  out["per_chunk"] = {k: [r[k] for r in rows] for k in keys}
  return out
