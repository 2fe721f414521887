r"""The generation evaluation: intervention following, consistency and visual quality of a
trained run's videos on held-out toy-world clips (docs/evaluation.md).

    python -m tv2tv_jax.generation_eval --workdir=<training run> --out=<dir> \
        --num_clips=32 --batch=8 [--checkpoint=<step>] [--cfg_scale=2] [--ode_steps=16] \
        [--times=1,3] [--seed=0] [--first_seed=5000000] [--num_chunks=<k>]

For N held-out clips (`toy_world.generate_clip(seed)`, seeds from --first_seed, checked
against every seed range the run's data and VAE were built from) the run's model
generates, from each clip's first frame and the run's prompt:
  free            no intervention;
  intervene_<t>s  the same generation (same sampler seed) with the chunk at time t
                  forced to an action the model did not write there itself, feasible
                  in the state the free run reached (`clip_scores.choose_intervention`).
The same protocol on VAE reconstructions of the true clips (a perfect model seen
through the run's VAE) gives the ceiling, and fits the frame-validity tolerances used
everywhere. Writes scores.json (settings, tolerances, per-clip scores and summaries
with 95% bootstrap CIs for the model, the ceiling and chance) and one contact sheet
PNG per condition into --out.

The evaluation takes any `Generator` (`generate(requests) -> [(texts, frames)]`):
`ModelGenerator` wraps the KV-cached sampler and the VAE decoder, `ToyWorldGenerator`
renders the world itself (the ceiling; tests script models with it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import numpy as np

from data_pipelines import caption_scores, clip_scores, oracle
from data_pipelines import toy_world as tw
from tv2tv_jax import eval_io
from tv2tv_jax.config import UNCOND_BRANCHES
# Re-exported: the command's inputs (seed checks, errors) and outputs live in eval_io.
from tv2tv_jax.eval_io import (FIRST_HELD_OUT_SEED, SHEET_CLIPS,  # noqa: F401
                               TRAINING_SEED_BOUND, EvalError, held_out_seeds,
                               trained_num_chunks, used_seed_ranges, write_outputs,
                               write_sheet)

DEFAULT_TIMES = (1.0, 3.0)


@dataclasses.dataclass(frozen=True)
class ClipRequest:
  """One generation: clip `clip_seed`'s first frame uint8[H, W, 3], `num_chunks` chunks,
  chunk index -> forced action text, and the sampler's seed."""
  clip_seed: int
  first_frame: np.ndarray
  num_chunks: int
  interventions: Mapping[int, str]
  sample_seed: int


class Generated(NamedTuple):
  """texts: k chunk texts ("" where none); frames: uint8[1 + 4k, H, W, 3] with frame 0 the
  (decoded) first frame; generated: chunks really generated (the rest padded black)."""
  texts: list[str]
  frames: np.ndarray
  generated: int


class Generator(Protocol):
  """What the evaluation needs from a model: its layout, optionally its chunk texts'
  format (`text_format`, default action texts), and a batch of generations."""
  layout: str

  def generate(self, requests: Sequence[ClipRequest]) -> list[Any]:
    """-> per request (texts: list[str], frames: uint8[1 + 4k, H, W, 3]) or a Generated."""


# --------------------------------------------------------------------------- generators

def vae_reconstruct(assets: Any, clips: Sequence[np.ndarray], batch: int = 8) -> list[np.ndarray]:
  """uint8[1 + 4k, H, W, 3] clips -> their VAE reconstructions (encode, then decode the means)."""
  from tv2tv_jax.vae import video_tokenizer
  out = []
  for s in range(0, len(clips), batch):
    x = video_tokenizer.to_float(np.stack(clips[s:s + batch]))
    rec = assets.video.decode(assets.video.encode(x))
    out += list(video_tokenizer.to_uint8(rec))
  return out


class ToyWorldGenerator:
  """The world itself as a model: renders `generate_clip(clip_seed, forced=interventions)`.

  A perfect model: free requests give the true clip; a forced action is played when the
  world allows it (a forced caption: each action it describes, on its chunk).
  `reconstruct` (e.g. `vae_reconstruct`) maps the frames, batch by batch, through the
  run's VAE: the ceiling. Texts are the played actions' in `text_format` (the forced
  text where forced); none for the t2v layout.
  """

  def __init__(self, layout: str, config: tw.ToyWorldConfig = tw.ToyWorldConfig(),
               reconstruct: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
               text_format: caption_scores.TextFormat = caption_scores.ACTION_TEXTS):
    self.layout, self.config, self.reconstruct = layout, config, reconstruct
    self.text_format = text_format

  def generate(self, requests: Sequence[ClipRequest]) -> list[Generated]:
    clips, texts = [], []
    for r in requests:
      forced = {}
      for i, t in r.interventions.items():
        forced.update(self.text_format.forced_actions(i, t, r.num_chunks))
      clip = tw.generate_clip(r.clip_seed, r.num_chunks, self.config, forced)
      said = [dict(r.interventions).get(i, t)
              for i, t in enumerate(self.text_format.texts_of(clip.actions))]
      texts.append([""] * r.num_chunks if self.layout == "t2v" else said)
      clips.append(clip.frames)
    if self.reconstruct is not None:
      clips = self.reconstruct(clips)
    return [Generated(t, f, len(t)) for t, f in zip(texts, clips)]


class ModelGenerator:
  """A trained run (`run_state.load_assets`) as a Generator: the KV-cached sampler in batches
  of `batch` rows, chunks decoded with the run's VAE.

  The t2v layout samples with cfg_scale 1: its CFG branch drops the chunk text, which t2v
  does not have, so both branches agree and guidance only doubles the work. `uncond` is
  `SamplerConfig.uncond` (the CFG branch: 'mask' or 'plan_free'). `text_format`: what the
  run's chunk texts are (`eval_io.text_format` of its config).
  """

  def __init__(self, assets: Any, prompt: str, *, cfg_scale: float, ode_steps: int,
               batch: int, solver: str = "euler", temperature: float = 1.0,
               max_text_tokens: int = 16, uncond: str = UNCOND_BRANCHES[0],
               text_format: caption_scores.TextFormat = caption_scores.ACTION_TEXTS):
    from tv2tv_jax import video_samples
    self.assets, self.batch, self.text_format = assets, batch, text_format
    self.layout = assets.run.exp.seq.layout
    self.prompt_ids = video_samples.encode_text(assets, prompt, "data.prompt")
    self.cfg_scale = 1.0 if self.layout == "t2v" else float(cfg_scale)
    self.settings = dict(steps=ode_steps, solver=solver, cfg_scale=self.cfg_scale,
                         temperature=temperature, max_text_tokens=max_text_tokens,
                         layout=self.layout, uncond=uncond)

  def generate(self, requests: Sequence[ClipRequest]) -> list[Generated]:
    from tv2tv_jax import video_samples
    from tv2tv_jax.sampling import Request, SamplerConfig, sample
    a, exp = self.assets, self.assets.run.exp
    out = []
    for s in range(0, len(requests), self.batch):
      part = requests[s:s + self.batch]
      forced = [{i: video_samples.encode_text(a, t, f"interventions[{i}]")
                 for i, t in r.interventions.items()} for r in part]
      longest: dict[int, np.ndarray] = {}
      for f in forced:
        for i, ids in f.items():
          longest[i] = ids if len(ids) > len(longest.get(i, ())) else longest[i]
      k = max(r.num_chunks for r in part)
      capacity = video_samples.cache_capacity(exp, len(self.prompt_ids), k,
                                              self.settings["max_text_tokens"], longest)
      sc = SamplerConfig(**self.settings, capacity=capacity,
                         text_vocab=min(a.text.vocab_size, exp.model.vocab_size))
      latents = [video_samples.first_frame_latent(a, r.first_frame, r.sample_seed)[0]
                 for r in part]
      gens = sample(a.run.model, a.params, exp,
                    [Request(prompt=self.prompt_ids, num_chunks=r.num_chunks, first_frame=z,
                             interventions=f, seed=r.sample_seed)
                     for r, z, f in zip(part, latents, forced)], sc)
      for r, z, g in zip(part, latents, gens):
        frames = video_samples.decode_frames(a, z, g.chunks)
        texts = [video_samples.decode_text(a, t) for t in g.texts]
        n = len(texts)
        # A generation that ended early (EOS) is padded with black frames (not a palette
        # colour: the oracle reads no agent) and empty texts, so it scores as failing.
        pad = 1 + a.video.temporal_factor * r.num_chunks - len(frames)
        frames = np.concatenate([frames, np.zeros((pad, *frames.shape[1:]), np.uint8)])
        out.append(Generated(texts + [""] * (r.num_chunks - n), frames, n))
    return out


# --------------------------------------------------------------------------- protocol

def intervention_chunks(times: Sequence[float], num_chunks: int,
                        fps: int = 16, frames_per_chunk: int = 4) -> dict[str, Any]:
  """Where the interventions go: the chunk at each time, times scaled to short clips.

  Rule: the chunk at time t is `outputs.chunk_at_time(t * scale)` with
  scale = min(1, s_last / max(times)), s_last = (1 + frames_per_chunk * (k - 1)) / fps
  the start of the last chunk. Clips long enough keep the times; shorter ones map the
  latest time to the last chunk and the others proportionally (k = 3: 1 s, 3 s ->
  chunks 0, 2; k = 16: chunks 3, 11).
  Returns {rule, requested_s, scale, effective_s, chunks: {condition name: chunk}}.
  """
  from tv2tv_jax.sampling import outputs
  times = [float(t) for t in times]
  if not times or min(times) < 0 or num_chunks < 1:
    raise EvalError(f"--times must be >= 0 seconds and the clip must have chunks, got "
                    f"times {times}, {num_chunks} chunks")
  last_start = (1 + frames_per_chunk * (num_chunks - 1)) / fps
  scale = min(1.0, last_start / max(times)) if max(times) > 0 else 1.0
  chunks = {f"intervene_{t:g}s": outputs.chunk_at_time(t * scale, fps, frames_per_chunk)
            for t in times}
  return {"rule": "chunk_at_time(t * min(1, start of last chunk / max time))",
          "requested_s": times, "scale": scale, "effective_s": [t * scale for t in times],
          "chunks": chunks}


def _checked(outputs_: Sequence[Any], requests: Sequence[ClipRequest],
             frames_per_chunk: int) -> list[Generated]:
  if len(outputs_) != len(requests):
    raise EvalError(f"generator returned {len(outputs_)} outputs for {len(requests)} requests")
  out = []
  for c, (o, r) in enumerate(zip(outputs_, requests)):
    texts, frames = list(o[0]), np.asarray(o[1])
    want = 1 + frames_per_chunk * r.num_chunks
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) != want:
      raise EvalError(f"generator output [{c}] (clip {r.clip_seed}): frames "
                      f"{frames.dtype}{list(frames.shape)}, expected uint8[{want}, H, W, 3]")
    if len(texts) != r.num_chunks:
      raise EvalError(f"generator output [{c}] (clip {r.clip_seed}): {len(texts)} texts for "
                      f"{r.num_chunks} chunks")
    out.append(Generated(texts, frames, int(o[2]) if len(o) > 2 else r.num_chunks))
  return out


def run_protocol(generator: Generator, clips: Sequence[tw.Clip], chunks: Mapping[str, int],
                 seed: int = 0, config: tw.ToyWorldConfig = tw.ToyWorldConfig()
                 ) -> dict[str, list[dict[str, Any]]]:
  """Generates the free run of every clip, then each intervention condition.

  clips: the true clips (first frames, seeds, layouts); chunks: condition name -> chunk.
  Clip c is sampled with seed `seed + c` in every condition, so an intervened run equals
  the free run up to the intervened chunk. Returns condition -> per clip {generated
  (Generated), read (read Actions)}, plus for interventions {intervention, state}, and
  for a caption run's forced captions `states`, one per chunk the caption covers
  (`caption_scores.plan_states`).
  """
  k = clips[0].num_chunks
  fmt = getattr(generator, "text_format", caption_scores.ACTION_TEXTS)

  def run(interventions: Sequence[Mapping[int, str]]) -> list[dict[str, Any]]:
    reqs = [ClipRequest(c.seed, c.frames[0], k, iv, seed + n)
            for n, (c, iv) in enumerate(zip(clips, interventions))]
    gens = _checked(generator.generate(reqs), reqs, config.frames_per_chunk)
    return [{"generated": g, "read": clip_scores.read_actions(g.frames, config)} for g in gens]

  out = {"free": run([{}] * len(clips))}
  for name, chunk in chunks.items():
    plans = []
    for c, free in zip(clips, out["free"]):
      layout_ids = oracle.quantise(c.frames[:1])[0]
      state = clip_scores.chunk_state(free["generated"].frames, chunk, layout_ids, config,
                                      free["read"])
      rng = np.random.default_rng([seed, c.seed, chunk])
      if fmt.is_caption:
        iv = caption_scores.choose_plan(free["generated"].texts, state, layout_ids, fmt, k,
                                        rng, config)
      else:
        iv = clip_scores.choose_intervention(free["generated"].texts[chunk], state, rng,
                                             config)
      plans.append((iv, state, layout_ids))
    runs = run([{iv.chunk: iv.text} for iv, _, _ in plans])
    for r, (iv, state, layout_ids) in zip(runs, plans):
      r.update(intervention=iv, state=state)
      if fmt.is_caption:
        r["states"] = caption_scores.plan_states(r["generated"].frames, iv, state, layout_ids,
                                                 r["read"], config)
    out[name] = runs
  return out


def score_condition(runs: Sequence[dict[str, Any]], clips: Sequence[tw.Clip],
                    free: Sequence[dict[str, Any]], layout: str,
                    tolerances: Mapping[str, float], truth_reads: Sequence[Sequence[tw.Action]],
                    config: tw.ToyWorldConfig = tw.ToyWorldConfig(),
                    num_resamples: int = 2000, seed: int = 0,
                    text_format: caption_scores.TextFormat = caption_scores.ACTION_TEXTS
                    ) -> dict[str, Any]:
  """Per-clip scores and their summary ({mean, lo, hi, n} per score) for one condition.

  free: the free condition's runs (what an intervened chunk showed without the
  intervention); truth_reads: the true clips' read actions (plausibility's reference).
  A caption run's forced caption is scored on every chunk it covers
  (`caption_scores.plan_scores`: means over them, and `per_chunk` lists).
  """
  records = []
  for run, clip, fr in zip(runs, clips, free):
    g, read = run["generated"], run["read"]
    rec = {"clip_seed": clip.seed, "texts": g.texts, "read": [eval_io.read_text(a) for a in read],
           "generated_chunks": g.generated}
    if layout != "t2v":
      rec.update(caption_scores.consistency(read, g.texts, text_format))
    vis = clip_scores.visual_scores(g.frames, clip.frames[0], tolerances, config)
    rec.update(vis)
    iv = run.get("intervention")
    if iv is not None:
      rec.update(chunk=iv.chunk, inserted=iv.text, own_text=iv.own_text,
                 feasible=iv.feasible, candidates=iv.candidates, state=run["state"].to_json())
    if iv is not None and text_format.is_caption:
      rec.update(caption_scores.plan_scores(iv, read, run["states"], fr["read"], config))
    elif iv is not None:
      inserted = tw.parse_action_text(iv.text)
      rec.update(clip_scores.intervention_following(read, iv.chunk, iv.text))
      rec.update({f"chance_{k}": v
                  for k, v in clip_scores.chance(run["state"], inserted, config).items()})
      rec["kept_own"] = float(tw.Action(*read[iv.chunk]) == tw.Action(*fr["read"][iv.chunk]))
    records.append(rec)
  keys = list(clip_scores.VISUAL_KEYS)
  if layout != "t2v":
    keys += ["consistent", "unparseable"] + (["uncovered"] if text_format.is_caption else [])
  if runs and "intervention" in runs[0]:
    keys += ["movement", "fire", "both", "chance_movement", "chance_fire", "chance_both",
             "kept_own", "feasible"]
  summary = clip_scores.summarise(records, keys, num_resamples, seed)
  if runs and "intervention" in runs[0]:
    by_action: dict[str, list] = {}
    for r in records:  # a forced caption counts under its first action
      by_action.setdefault(r.get("plan", [r["inserted"]])[0], []).append(r)
    summary["by_inserted_action"] = {
        text: {"n": len(rs), **{k: float(np.mean([r[k] for r in rs]))
                                for k in ("movement", "fire", "both", "chance_both")}}
        for text, rs in sorted(by_action.items())}
  else:
    summary["plausibility"] = clip_scores.plausibility([r["read"] for r in runs], truth_reads,
                                                       num_resamples, seed)
  return {"summary": summary, "clips": records}


def evaluate(generator: Generator, clips: Sequence[tw.Clip], *,
             times: Sequence[float] = DEFAULT_TIMES,
             ceiling: Generator | None = None, tolerances: Mapping[str, float] | None = None,
             reference: Sequence[tw.Clip] | None = None,
             config: tw.ToyWorldConfig = tw.ToyWorldConfig(), seed: int = 0,
             num_resamples: int = 2000) -> dict[str, Any]:
  """The whole evaluation of `generator` on `clips` (true clips of equal length).

  ceiling: the generator whose free run fits the tolerances (the VAE reconstruction of
  the true clips); its scores are reported as the ceiling. Without it, `tolerances`
  (default: zero, exact frames) are used and no ceiling is reported. reference: true
  clips, other than `clips`, whose read actions plausibility compares with (default:
  `clips` themselves). The t2v layout gets no intervention conditions (no text
  channel), nor do captions placed after the chunks they describe. A caption run
  (`generator.text_format`) intervenes at the caption that plans each time's chunk
  (`caption_scores.caption_plan`). Returns the scores.json document minus the run's
  settings.
  """
  if not clips:
    raise EvalError("--num_clips: at least one clip is needed")
  k = clips[0].num_chunks
  if any(c.num_chunks != k for c in clips):
    raise EvalError("clips must have equally many chunks")
  doc: dict[str, Any] = {"layout": generator.layout, "num_clips": len(clips), "num_chunks": k,
                         "clip_seeds": [c.seed for c in clips]}
  fmt = getattr(generator, "text_format", caption_scores.ACTION_TEXTS)
  doc["text_format"] = dataclasses.asdict(fmt)
  if generator.layout == "t2v":
    plan = {"chunks": {}}
    doc["interventions"] = {"skipped": "the t2v layout has no text channel to intervene on"}
  elif not fmt.can_intervene:
    plan = {"chunks": {}}
    doc["interventions"] = {"skipped": "captions placed after the chunks they describe "
                            "('report') cover chunks already generated when forced"}
  else:
    plan = intervention_chunks(times, k, config.fps, config.frames_per_chunk)
    if fmt.is_caption:
      plan = caption_scores.caption_plan(plan, fmt)
    doc["interventions"] = plan
  reference = clips if reference is None else reference
  truth_reads = [clip_scores.read_actions(c.frames, config) for c in reference]
  doc["reference_clip_seeds"] = [c.seed for c in reference]
  ceiling_runs = None
  if ceiling is not None:
    ceiling_runs = run_protocol(ceiling, clips, plan["chunks"], seed, config)
    tolerances = clip_scores.fit_validity_tolerances(
        [r["generated"].frames for r in ceiling_runs["free"]], [c.frames for c in clips],
        config)
    doc["tolerances"] = {**tolerances, "fitted_on": "VAE reconstructions of the true clips",
                         "target": 0.99}
  else:
    tolerances = dict(tolerances or clip_scores.ZERO_TOLERANCES)
    doc["tolerances"] = {**tolerances, "fitted_on": None}
  runs = run_protocol(generator, clips, plan["chunks"], seed, config)
  score = lambda rs, free: score_condition(rs, clips, free, generator.layout, tolerances,
                                           truth_reads, config, num_resamples, seed, fmt)
  doc["conditions"] = {name: score(rs, runs["free"]) for name, rs in runs.items()}
  if ceiling_runs is not None:
    doc["ceiling"] = {name: score(rs, ceiling_runs["free"]) for name, rs in ceiling_runs.items()}
    doc["_ceiling_runs"] = ceiling_runs
    doc["tolerances"]["ceiling_valid"] = doc["ceiling"]["free"]["summary"]["valid"]["mean"]
  doc["chance"] = {name: {k: doc["conditions"][name]["summary"][f"chance_{k}"]
                          for k in ("movement", "fire", "both")} for name in plan["chunks"]}
  doc["_runs"] = runs  # frames for the contact sheets; dropped before writing JSON
  return doc


# --------------------------------------------------------------------------- the command

def run(workdir: str, out_dir: str, *, num_clips: int = 32, batch: int = 8,
        checkpoint: int | None = None, cfg_scale: float = 2.0, ode_steps: int = 16,
        times: Sequence[float] = DEFAULT_TIMES, seed: int = 0,
        first_seed: int = FIRST_HELD_OUT_SEED, num_chunks: int | None = None,
        num_resamples: int = 2000, num_reference: int = 128, uncond: str = UNCOND_BRANCHES[0],
        assets: Any = None) -> list[str]:
  """The command: restores the run, evaluates model and ceiling, writes --out. Returns paths."""
  from tv2tv_jax import run_state
  if batch < 1 or num_clips < 1:
    raise EvalError(f"--batch and --num_clips must be >= 1, got {batch}, {num_clips}")
  assets = assets or run_state.load_assets(workdir, checkpoint)
  cfg = assets.run.config
  k = num_chunks or trained_num_chunks(cfg)
  if not k:
    raise EvalError("--num_chunks: the run's config has no data.toy_world.num_chunks; "
                    "give the clip length")
  data_dir = run_state.data_dir_of(workdir, cfg)
  num_reference = max(num_reference, 0)
  seeds = held_out_seeds(first_seed, num_clips + num_reference, cfg, data_dir)
  clips = [tw.generate_clip(s, k) for s in seeds[:num_clips]]
  reference = [tw.generate_clip(s, k) for s in seeds[num_clips:]] or None
  prompt = cfg.data.prompt
  fmt = eval_io.text_format(cfg)
  # A caption describes up to `every` chunks, so it may outgrow the 16 tokens an action
  # text never reaches (the longest of 2048 training clips: 4, 9, 19, 35, 55 tokens at
  # every = 1, 2, 4, 8, 16). The cap applies to every chunk's text and sizes the KV cache
  # the sampler attends over, so it is not larger than that needs; at most the row's
  # whole text budget.
  max_text = 16 if not fmt.is_caption else min(int(assets.run.exp.seq.text_len),
                                               max(16, 6 * fmt.every))
  model = ModelGenerator(assets, prompt, cfg_scale=cfg_scale, ode_steps=ode_steps, batch=batch,
                         uncond=uncond, max_text_tokens=max_text, text_format=fmt)
  ceiling = ToyWorldGenerator(model.layout, text_format=fmt,
                              reconstruct=lambda fs: vae_reconstruct(assets, fs, batch))
  doc = evaluate(model, clips, times=times, ceiling=ceiling, reference=reference, seed=seed,
                 num_resamples=num_resamples)
  settings = dict(workdir=os.fspath(workdir), num_clips=num_clips, batch=batch,
                  cfg_scale=cfg_scale, ode_steps=ode_steps, times=list(times), seed=seed,
                  first_seed=first_seed, num_chunks=k, prompt=prompt,
                  num_resamples=num_resamples, num_reference=num_reference, uncond=uncond,
                  sampler=model.settings,
                  sample_seeds=f"clip c uses seed {seed} + c in every condition")
  if model.layout == "t2v":
    settings["cfg_note"] = ("t2v sampled at cfg_scale 1: its CFG branch drops chunk text, "
                            "which t2v has none of")
  doc = {"settings": settings, "checkpoint_step": assets.step, **doc}
  return write_outputs(out_dir, doc, clips)


def format_summary(doc: Mapping[str, Any]) -> str:
  """A few lines for the console: per condition, model / ceiling / chance of the headline
  scores (means; the CIs are in scores.json)."""
  def get(who, name, key):
    v = (doc.get(who) or {}).get(name, {}).get("summary", {}).get(key)
    return "   -  " if v is None or v["mean"] is None or np.isnan(v["mean"]) else \
        f"{v['mean']:6.3f}"
  lines = [f"layout {doc['layout']}, step {doc.get('checkpoint_step')}, "
           f"{doc['num_clips']} clips of {doc['num_chunks']} chunks   (model / ceiling)"]
  for name in doc["conditions"]:
    keys = ["both", "movement", "fire", "chance_both"] if name != "free" else []
    keys += ["consistent", "valid", "track_continuity"]
    lines.append(f"  {name:14s} " + "  ".join(
        f"{k} {get('conditions', name, k)}/{get('ceiling', name, k)}" for k in keys))
  return "\n".join(lines)


def define_flags() -> None:
  """The command's flags; defined only when run as a program (importing defines none)."""
  from absl import flags
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_string("out", None, "Output directory (scores.json, contact sheets).")
  flags.DEFINE_integer("num_clips", 32, "Held-out clips.")
  flags.DEFINE_integer("batch", 8, "Rows per sampler batch.")
  flags.DEFINE_integer("checkpoint", None, "Step to restore (default: newest).")
  flags.DEFINE_float("cfg_scale", 2.0, "CFG scale (t2v runs always use 1).")
  flags.DEFINE_enum("uncond", UNCOND_BRANCHES[0], list(UNCOND_BRANCHES),
                    "CFG's second branch: the chunk's plan masked out of the same cache, or "
                    "a second cache without any plan (needs data.plan_drop_rate > 0 in "
                    "training; docs/model.md).")
  flags.DEFINE_integer("ode_steps", 16, "ODE steps per chunk.")
  flags.DEFINE_list("times", ["1", "3"], "Intervention times in seconds.")
  flags.DEFINE_integer("seed", 0, "Sampler seed of clip 0 (clip c: seed + c); choice seed.")
  flags.DEFINE_integer("first_seed", FIRST_HELD_OUT_SEED, "First held-out clip seed.")
  flags.DEFINE_integer("num_chunks", None, "Chunks per clip (default: the run's clips).")
  flags.DEFINE_integer("num_resamples", 2000, "Bootstrap resamples.")
  flags.DEFINE_integer("num_reference", 128, "True clips (seeds after the evaluated ones) "
                       "that action plausibility compares with.")


def main(argv):
  from absl import app, flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  try:
    times = [float(t) for t in FLAGS.times]
  except ValueError as e:
    raise app.UsageError(f"--times: {e}") from e
  paths = run(FLAGS.workdir, FLAGS.out, num_clips=FLAGS.num_clips, batch=FLAGS.batch,
              checkpoint=FLAGS.checkpoint, cfg_scale=FLAGS.cfg_scale, ode_steps=FLAGS.ode_steps,
              times=times, seed=FLAGS.seed, first_seed=FLAGS.first_seed,
              num_chunks=FLAGS.num_chunks, num_resamples=FLAGS.num_resamples,
              num_reference=FLAGS.num_reference, uncond=FLAGS.uncond)
  with open(paths[0]) as f:
    print(format_summary(json.load(f)))
  for p in paths:
    print(p)


if __name__ == "__main__":
  from absl import app
  define_flags()
  app.run(main)
