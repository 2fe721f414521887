r"""One command runs a sweep over the toy-world study's config (docs/results.md, "Caption
density and caption errors"): each point a name and overrides of the study config, each
point and seed trained and evaluated exactly as the study does an arm (`study.run_arm`).

    python -m tv2tv_jax.sweep --config=experiments/toy_sweeps.py:density \
        --workdir=<sweep dir> [--results=docs/results/sweep_density] \
        [--points=every1,every2] [--seeds=0] [--vae_from=<another data dir>] [--commit]

The config is the study's (experiments/toy_study.py) plus a `sweep` section: name, seeds,
points (each {name, x, arm, overrides: {dotted.field: value}}), x_label, x_log.
Everything is cached, so running the command again resumes point by point:

  <workdir>/data/<data key>/   the data stages (`preparation.prepare`) shared by
                               every point whose stage settings hash to the key; a point
                               whose captions differ gets its own, but copies the VAE
                               (trained on frames only) from any directory that finished
                               it with the same settings (`preparation.adopt_stage`);
  <workdir>/points/<run key>/  point.json and runs/<arm>_s<seed>: training resumes from
                               its newest checkpoint, evaluation is skipped when done;
                               the key hashes the arm's whole training config and the
                               evaluation settings, so identical points of two sweeps in
                               one work directory share their runs;
  <results>/<point>_s<seed>.json  one record per point and seed, written (and with
                               --commit, committed to git, that file alone) as soon as it
                               is evaluated; a record with the point's run key is skipped;
  <results>/summary.json, table.md, sweep.png  the report (`sweep_report`) over the
                               records present, written at the end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import time
from typing import Any, Callable, Sequence

import ml_collections

from tv2tv_jax import config as config_lib
from tv2tv_jax import study, sweep_report
from tv2tv_jax.config import SweepConfig, SweepPoint


class SweepError(ValueError):
  """A sweep setting cannot work; the message names the point and field."""


def _digest(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def point_config(cfg: ml_collections.ConfigDict, point: SweepPoint) -> ml_collections.ConfigDict:
  """The study config of one point: `cfg` without its `sweep` section, each override
  (a dotted path to a field that exists) set. Raises SweepError naming a bad path.

  A ConfigDict, as the study command takes: the run it trains records it as written, and
  its run key hashes it (`run_key`)."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  del out["sweep"]
  for path, value in point.overrides.items():
    *parents, leaf = path.split(".")
    node = out
    try:
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, TypeError, AttributeError) as e:
      # Only existing fields: a typo must not train a point that silently ignores it.
      raise SweepError(f"sweep.points[{point.name!r}].overrides: {path!r} is not a "
                       f"field of the study config ({e})") from e
  return out


def check_config(cfg: ml_collections.ConfigDict) -> config_lib.RunConfig:
  """The typed config (its `sweep` section set), every point's study config checked:
  fails with a message naming the field before anything is built."""
  try:
    rc = config_lib.run_config_from_config_dict(cfg)
  except config_lib.ConfigError as e:
    raise SweepError(str(e)) from e
  sweep = rc.sweep
  if sweep is None:
    raise SweepError("sweep: the config has no `sweep` section (experiments/toy_sweeps.py)")
  for p in sweep.points:
    try:
      study.check_config(point_config(cfg, p))
    except study.StudyError as e:
      raise SweepError(f"sweep.points[{p.name!r}]: {e}") from e
  return rc


def run_key(pcfg: ml_collections.ConfigDict, arm: str) -> str:
  """Hash of what a point's run depends on: the arm's training config (seed and data
  directory aside: they are set per run) and the evaluation settings."""
  train = study.arm_config(pcfg, arm, 0, "").to_dict()
  return _digest({"train": train, "eval": pcfg.study.eval.to_dict(),
                  "bootstrap_resamples": pcfg.study.bootstrap_resamples})


def prepare_data(pcfg: ml_collections.ConfigDict, arm: str, workdir: str,
                 vae_from: str | None = None, log: Callable[[str], None] = print) -> str:
  """The point's data directory, <workdir>/data/<hash of its stage settings>, with every
  stage built; the VAE is copied, not trained, when `vae_from` or another data directory
  of the sweep finished it with the same settings. Returns the directory."""
  from data_pipelines import preparation
  acfg = study.arm_config(pcfg, arm, 0, "")
  data_dir = os.path.join(workdir, "data",
                          _digest(preparation.stage_settings(acfg)["tokenizer"]))
  sources = ([vae_from] if vae_from else []) + sorted(glob.glob(os.path.join(workdir, "data",
                                                                             "*")))
  for source in sources:
    if preparation.adopt_stage(data_dir, source, "vae", acfg, log):
      break
  acfg.data.data_dir = data_dir
  preparation.prepare(data_dir, acfg, log=log)
  return data_dir


def _write_json(path: str, doc: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1, allow_nan=False)
  os.replace(tmp, path)  # atomic: a killed sweep never leaves half a record


def commit_files(paths: Sequence[str], message: str,
                 log: Callable[[str], None] = print) -> bool:
  """`git add` and `git commit` of exactly `paths` (whatever else is staged stays staged
  and uncommitted). A failure (no git work tree, nothing changed) is logged, not raised:
  the sweep goes on. Returns whether it committed."""
  cwd = os.path.dirname(os.path.abspath(paths[0]))
  paths = [os.path.abspath(p) for p in paths]
  try:
    for cmd in (["git", "add", "--", *paths], ["git", "commit", "-q", "-m", message, "--",
                                                *paths]):
      subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=120)
  except (OSError, subprocess.SubprocessError) as e:
    log(f"not committed ({message}): {getattr(e, 'stderr', '') or e}")
    return False
  log(f"committed: {message}")
  return True


def run_point(cfg: ml_collections.ConfigDict, sweep: SweepConfig, point: SweepPoint,
              seed: int, workdir: str, results_dir: str, *, vae_from: str | None = None,
              commit: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """One point and seed of `sweep` (`check_config(cfg)`): data, training, evaluation
  (`study.run_arm`) and its record, <results_dir>/<point>_s<seed>.json. Returns the
  record; an existing record with this point's run key is returned as it is."""
  name, arm = point.name, point.arm
  pcfg = point_config(cfg, point)
  key = run_key(pcfg, arm)
  path = os.path.join(results_dir, f"{name}_s{seed}.json")
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if done.get("run_key") == key and done.get("sweep") == sweep.name:
      log(f"[{name}_s{seed}] record: cached")
      return done
  tag = lambda s: log(f"[{name}_s{seed}] {s}")
  t0 = time.time()
  data_dir = prepare_data(pcfg, arm, workdir, vae_from, tag)
  point_dir = os.path.join(workdir, "points", key)
  os.makedirs(point_dir, exist_ok=True)
  info_path = os.path.join(point_dir, "point.json")
  info = {"arm": arm, "overrides": dict(point.overrides), "data_dir": data_dir, "uses": []}
  if os.path.exists(info_path):
    with open(info_path) as f:
      info["uses"] = json.load(f).get("uses", [])
  use = f"{sweep.name}/{name}"
  if use not in info["uses"]:
    info["uses"].append(use)
    _write_json(info_path, info)
  run = study.run_arm(pcfg, point_dir, arm, seed, None, tag, data_dir=data_dir)
  record = {"sweep": sweep.name, "point": name, "x": point.x,
            "overrides": dict(point.overrides), "run_key": key,
            "data_key": os.path.basename(data_dir), **run}
  os.makedirs(results_dir, exist_ok=True)
  _write_json(path, record)
  tag(f"record: {path} ({time.time() - t0:.0f}s this call)")
  if commit:
    commit_files([path], f"Sweep {sweep.name}: record {name}_s{seed}", log)
  return record


def run_sweep(cfg: ml_collections.ConfigDict, workdir: str, *,
              points: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              results_dir: str | None = None, vae_from: str | None = None,
              commit: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole sweep (module docstring), seed-major: a partial sweep has every point of
  its first seeds. `points` / `seeds` select a subset. Returns the report's summary."""
  rc = check_config(cfg)
  sweep = rc.sweep
  chosen = [p for p in sweep.points if points is None or p.name in points]
  unknown = set(points or ()) - {p.name for p in sweep.points}
  if unknown:
    raise SweepError(f"--points: no such points {sorted(unknown)}; the sweep has "
                     f"{[p.name for p in sweep.points]}")
  seeds = [int(s) for s in (seeds if seeds is not None else sweep.seeds)]
  results_dir = results_dir or os.path.join(workdir, "results", sweep.name)
  for seed in seeds:
    for p in chosen:
      run_point(cfg, sweep, p, seed, workdir, results_dir, vae_from=vae_from, commit=commit,
                log=log)
  summary = sweep_report.write_report(results_dir, sweep, rc.study.bootstrap_resamples)
  log(f"report: {results_dir}")
  if commit:
    report = [os.path.join(results_dir, n) for n in ("summary.json", sweep_report.TABLE_NAME,
                                                     sweep_report.PLOT_NAME)]
    commit_files([p for p in report if os.path.exists(p)],
                 f"Sweep {sweep.name}: report over {len(summary['records'])} records", log)
  return summary


def main(argv):
  from absl import app, flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
  summary = run_sweep(FLAGS.config, FLAGS.workdir, points=FLAGS.points or None, seeds=seeds,
                      results_dir=FLAGS.results, vae_from=FLAGS.vae_from, commit=FLAGS.commit)
  print(sweep_report.format_table(summary))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Sweep config file[:variant].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Sweep directory (data, points, results).")
  flags.DEFINE_list("points", None, "Points to run (default: all of sweep.points).")
  flags.DEFINE_list("seeds", None, "Seeds to run (default: sweep.seeds).")
  flags.DEFINE_string("results", None, "Where records and the report go (default "
                      "<workdir>/results/<sweep name>; committed sweeps use "
                      "docs/results/sweep_<name>).")
  flags.DEFINE_string("vae_from", None, "A finished data directory whose VAE to copy when "
                      "its settings match (e.g. the study's <workdir>/data).")
  flags.DEFINE_bool("commit", False, "git-commit each record (that file alone) as it is "
                    "written, and the report at the end.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
