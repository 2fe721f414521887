r"""The toy-world study in one command: TV2TV against T2V and Think2V (docs/results.md).

    python -m tv2tv_jax.study --config=experiments/toy_study.py --workdir=/tmp/toy_study \
        [--arms=tv2tv,t2v,think2v] [--seeds=0,1,2] [--results=docs/results/toy_study]

Stages, each cached in the work directory, so running the command again resumes:
  1. data: build the toy world, train the VAE, encode latents, train the tokenizer
     (`data_pipelines.preparation`), once, in <workdir>/data, shared by every arm;
  2. per arm and seed (study.arms x study.seeds): train with that layout and seed into
     <workdir>/runs/<arm>_s<seed> (the trainer resumes from its newest checkpoint, with
     its data-iterator state, so a killed run continues exactly);
  3. per run: the generation evaluation (`tv2tv_jax.generation_eval`) into
     <run>/gen_eval (skipped when scores.json exists for the final checkpoint and the
     same evaluation settings);
  4. per run: a small JSON (`study_report.run_record`: loss curves, training time,
     per-clip scores) into --results, written as soon as the run is evaluated;
  5. the report (`study_report.write_report`): summary.json with means and 95% CIs per
     arm, and the plots, from whatever run records --results holds.

An arm differs from the others only in `seq.layout`; `train.seed` and
`data.shuffle_seed` are the study seed. Everything else comes from the one config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections

from tv2tv_jax import config as config_lib, study_report
from tv2tv_jax.config import LAYOUTS  # an arm is named by its layout
from tv2tv_jax.sampling.decoding import UNCOND_BRANCHES  # SamplerConfig.uncond's values


class StudyError(ValueError):
  """A study setting cannot work; the message names the field or flag."""


def run_name(arm: str, seed: int) -> str:
  return f"{arm}_s{seed}"


def arm_config(cfg: ml_collections.ConfigDict, arm: str, seed: int,
               data_dir: str) -> ml_collections.ConfigDict:
  """The training config of one arm and seed: `cfg` with seq.layout, train.seed,
  data.shuffle_seed and data.data_dir set (nothing else changes)."""
  if arm not in LAYOUTS:
    raise StudyError(f"study.arms: unknown arm {arm!r}; one of {list(LAYOUTS)}")
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.seq.layout = arm
  out.train.seed = int(seed)
  out.data.shuffle_seed = int(seed)
  out.data.data_dir = data_dir
  if "study" in out:
    del out["study"]  # the trainer's config is the arm's alone
  return out


def check_config(cfg: ml_collections.ConfigDict) -> config_lib.RunConfig:
  """The typed config (every field checked, `config.run_config_from_config_dict`);
  fails with a message naming the field before anything is built."""
  run_cfg = config_lib.run_config_from_config_dict(cfg)
  study, data = run_cfg.study, run_cfg.data
  if study is None:
    raise StudyError("study: the config has no `study` section (experiments/toy_study.py)")
  if data.source != "toy_world":
    raise StudyError("data.source: the study needs 'toy_world' data (the oracle scores "
                     "toy-world videos)")
  if not study.arms:
    raise StudyError("study.arms: at least one arm is needed")
  for arm in study.arms:
    if arm not in LAYOUTS:
      raise StudyError(f"study.arms: unknown arm {arm!r}; one of {list(LAYOUTS)}")
  if not study.seeds or len(set(study.seeds)) != len(study.seeds):
    raise StudyError(f"study.seeds: needs distinct seeds, got {tuple(study.seeds)}")
  ev = study.eval
  if ev.num_clips < 1 or ev.batch < 1 or ev.ode_steps < 1:
    raise StudyError("study.eval: num_clips, batch and ode_steps must be >= 1")
  if ev.uncond not in UNCOND_BRANCHES:
    raise StudyError(f"study.eval.uncond: one of {list(UNCOND_BRANCHES)}, got {ev.uncond!r}")
  if ev.uncond == "plan_free" and not data.plan_drop_rate > 0:
    raise StudyError("study.eval.uncond: 'plan_free' conditions CFG's second branch on an "
                     "empty plan, which a model trained with data.plan_drop_rate = 0 has "
                     "never seen; set data.plan_drop_rate > 0")
  return run_cfg


def _eval_settings(study: config_lib.StudyConfig) -> dict[str, Any]:
  ev = study.eval
  return dict(num_clips=int(ev.num_clips), batch=int(ev.batch), cfg_scale=float(ev.cfg_scale),
              ode_steps=int(ev.ode_steps), times=[float(t) for t in ev.times],
              seed=int(ev.seed), num_resamples=int(study.bootstrap_resamples),
              uncond=str(ev.uncond))


def _evaluated(out_dir: str, settings: dict[str, Any], step: int) -> bool:
  """Whether out_dir holds scores of checkpoint `step` with these evaluation settings."""
  path = os.path.join(out_dir, "scores.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    doc = json.load(f)
  # Evaluations written before `uncond` existed sampled with its default, the mask branch.
  got = {"uncond": "mask", **doc.get("settings", {})}
  same = all(got.get(k) == v for k, v in settings.items() if k != "batch")
  return same and doc.get("checkpoint_step") == step


def run_arm(cfg: ml_collections.ConfigDict, workdir: str, arm: str, seed: int,
            results_dir: str | None, log: Callable[[str], None] = print,
            data_dir: str | None = None) -> dict[str, Any]:
  """Stages 2-4 for one arm and seed; returns its run record (`study_report.run_record`).

  data_dir: the prepared data stages (default <workdir>/data).
  """
  from tv2tv_jax import generation_eval, trainer
  data_dir = data_dir or os.path.join(workdir, "data")
  run_dir = os.path.join(workdir, "runs", run_name(arm, seed))
  acfg = arm_config(cfg, arm, seed, data_dir)
  t0 = time.time()
  trainer.train(acfg, run_dir, log=lambda s: log(f"[{run_name(arm, seed)}] {s}"))
  log(f"[{run_name(arm, seed)}] training stage: {time.time() - t0:.0f}s this call")
  settings = _eval_settings(check_config(cfg).study)
  out_dir = os.path.join(run_dir, "gen_eval")
  step = int(acfg.train.num_steps)
  if _evaluated(out_dir, settings, step):
    log(f"[{run_name(arm, seed)}] generation evaluation: cached")
  else:
    t0 = time.time()
    generation_eval.run(run_dir, out_dir, checkpoint=step, **settings)
    log(f"[{run_name(arm, seed)}] generation evaluation: {time.time() - t0:.0f}s")
  with open(os.path.join(out_dir, "scores.json")) as f:
    scores = json.load(f)
  record = study_report.run_record(arm, seed, run_dir, scores)
  if results_dir:
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{run_name(arm, seed)}.json")
    with open(path, "w") as f:
      json.dump(record, f, indent=1, allow_nan=False)
    log(f"[{run_name(arm, seed)}] run record: {path}")
  return record


def comparison_sheet(cfg: ml_collections.ConfigDict, workdir: str, arms: Sequence[str],
                     seed: int, path: str, text: str = "left fire") -> str:
  """One PNG with a row per arm: the same held-out first frame, the same sampler seed and
  the same action `text` inserted at the first intervention time (T2V, which has no
  text channel, runs free). Each frame carries its chunk's text and the oracle's reading.
  """
  from data_pipelines import clip_scores, toy_world as tw
  from tv2tv_jax import generation_eval, run_state
  run_cfg = check_config(cfg)
  data, ev = run_cfg.data, run_cfg.study.eval
  k = int(data.toy_world["num_chunks"])
  chunk = min(generation_eval.intervention_chunks(ev.times, k)["chunks"].values())
  clip = tw.generate_clip(generation_eval.FIRST_HELD_OUT_SEED, k)
  runs, clips = [], []
  for arm in arms:
    assets = run_state.load_assets(os.path.join(workdir, "runs", run_name(arm, seed)))
    gen = generation_eval.ModelGenerator(assets, data.prompt, cfg_scale=ev.cfg_scale,
                                         ode_steps=ev.ode_steps, batch=1,
                                         uncond=ev.uncond)
    forced = {} if gen.layout == "t2v" else {chunk: text}
    g = gen.generate([generation_eval.ClipRequest(clip.seed, clip.frames[0], k, forced,
                                                  int(ev.seed))])[0]
    iv = clip_scores.Intervention(chunk, text, "", True, 0) if forced else None
    runs.append({"generated": g, "read": clip_scores.read_actions(g.frames), "intervention": iv})
    clips.append(dataclasses.replace(clip, seed=f"{clip.seed} ({arm})"))
  return generation_eval.write_sheet(path, runs, clips,
                                     f"same first frame, seed {ev.seed}; '{text}' inserted at "
                                     f"chunk {chunk} (t2v: free)", limit=len(runs))


def run_study(cfg: ml_collections.ConfigDict, workdir: str, *,
              arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              results_dir: str | None = None, data_dir: str | None = None,
              log: Callable[[str], None] = print) -> dict:
  """The whole study (module docstring). Returns the report's summary.

  data_dir: where the data stages are cached (default <workdir>/data); an ablation that
  changes no data stage setting can share another study's.
  """
  from data_pipelines import preparation
  study = check_config(cfg).study
  arms = list(arms or study.arms)
  seeds = [int(s) for s in (seeds if seeds is not None else study.seeds)]
  for arm in arms:
    if arm not in LAYOUTS:
      raise StudyError(f"--arms: unknown arm {arm!r}; one of {list(LAYOUTS)}")
  results_dir = results_dir or os.path.join(workdir, "results")
  data_dir = data_dir or os.path.join(workdir, "data")
  t0 = time.time()
  # The data stages depend only on data and model settings, identical across arms.
  preparation.prepare(data_dir, arm_config(cfg, arms[0], seeds[0], data_dir), log=log)
  log(f"data stages: {time.time() - t0:.0f}s")
  for seed in seeds:  # seed-major: a partial study has every arm of its first seeds
    for arm in arms:
      run_arm(cfg, workdir, arm, seed, results_dir, log, data_dir=data_dir)
    if seed == seeds[0]:
      path = comparison_sheet(cfg, workdir, arms, seed, os.path.join(results_dir,
                                                                     "arms_sheet.png"))
      log(f"comparison sheet: {path}")
  with open(os.path.join(data_dir, "stage_vae.json")) as f:
    vae_eval = json.load(f).get("eval", {})
  return study_report.write_report(results_dir, vae_eval=vae_eval,
                                   num_resamples=int(study.bootstrap_resamples))


def main(argv):
  from absl import app, flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  arms = FLAGS.arms or None
  seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
  summary = run_study(FLAGS.config, FLAGS.workdir, arms=arms, seeds=seeds,
                      results_dir=FLAGS.results, data_dir=FLAGS.data_dir)
  print(study_report.format_table(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Study config file[:variant].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Study directory (data, runs, results).")
  flags.DEFINE_list("arms", None, "Arms to run (default: study.arms).")
  flags.DEFINE_list("seeds", None, "Seeds to run (default: study.seeds).")
  flags.DEFINE_string("results", None, "Where run records and the report go "
                      "(default <workdir>/results; the committed study uses "
                      "docs/results/toy_study).")
  flags.DEFINE_string("data_dir", None, "Cached data stages (default <workdir>/data): share "
                      "another study's when only training or evaluation settings change.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
