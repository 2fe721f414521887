"""A sweep's report: per point the study's scores with 95% CIs over seeds and clips, a table,
and curves against the swept quantity (`tv2tv_jax.sweep` writes the records it reads).

A record is a study run record (`study_report.run_record`) with the sweep's fields added
(sweep, point, x, overrides, run_key). Per point and score the summary is
`study_report.hierarchical_ci` over the point's seeds: seeds resampled, then clips within
each seed. Intervention scores are pooled over the intervention conditions first (per
clip, the mean over the conditions it was scored in: 1 s and 3 s, or one where both
times land on the same caption), so each clip counts once.

Plot (`sweep.png`): one panel per headline score, the mean over seeds against the point's
x with its 95% band; chance (dashed) and the VAE ceiling (dotted) where the score has
them; points without an x (T2V, the zero-density end) as a horizontal line and band.

Findings (`findings`, and the command below): each TV2TV point of both sweeps against the
density sweep's T2V point, which reads no text: intervention following as "both" minus the
policy's chance per clip (T2V's level, since it cannot follow inserted text), and valid
frames minus T2V's, paired by seed; then where intervention following falls to the T2V level
(density) and the wrong-caption rate at which TV2TV loses its advantage (error), or that it
has none to lose:

    python -m tv2tv_jax.sweep_report --density=docs/results/sweep_density \
        --error=docs/results/sweep_error --out=docs/results/sweep_findings
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from tv2tv_jax import study_report
from tv2tv_jax.config import SweepConfig, SweepPoint

INTERVENTION_KEYS = ("both", "movement", "fire", "chance_both", "chance_movement", "kept_own")
FREE_KEYS = ("valid", "agent_present", "track_continuity", "layout_preserved", "consistent")
# (title, score, chance score or None) per panel of sweep.png.
PANELS = (("intervention following: movement and fire", "both", "chance_both"),
          ("intervention following: movement", "movement", "chance_movement"),
          ("valid frames (free run)", "valid", None),
          ("self-consistency (free run)", "consistent", None))
TABLE_NAME, PLOT_NAME = "table.md", "sweep.png"


def _array(values: Sequence[Any]) -> np.ndarray:
  return np.array([np.nan if v is None else float(v) for v in values], np.float64)


def per_clip(record: Mapping[str, Any], key: str) -> np.ndarray:
  """f64[clips] of one run: a free-run score from the free condition; an intervention
  score averaged per clip over the intervention conditions. NaN (undefined) dropped."""
  conds = record["conditions"]
  names = ["free"] if key in FREE_KEYS else sorted(set(conds) - {"free"})
  return _pooled([_array(conds[n]["clips"][key]) for n in names if key in conds[n]["clips"]])


def _pooled(rows: Sequence[np.ndarray]) -> np.ndarray:
  """f64[clips]: the per-condition rows f64[clips] averaged per clip, NaN ignored; clips
  NaN in every row dropped."""
  if not rows:
    return np.zeros(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a clip NaN everywhere: dropped below
    pooled = np.nanmean(np.stack(rows), axis=0)
  return pooled[np.isfinite(pooled)]


def _ceiling(records: Sequence[Mapping[str, Any]], key: str) -> float:
  """The VAE ceiling of a score: its mean over the point's runs and conditions."""
  vals = []
  for r in records:
    for name, cond in r["conditions"].items():
      if (name == "free") == (key in FREE_KEYS):
        v = (cond.get("ceiling") or {}).get(key, {}).get("mean")
        vals.append(np.nan if v is None else float(v))
  vals = [v for v in vals if np.isfinite(v)]
  return float(np.mean(vals)) if vals else float("nan")


def summarise_points(records: Sequence[Mapping[str, Any]], points: Sequence[SweepPoint],
                     num_resamples: int = 2000) -> list[dict[str, Any]]:
  """Per point (in `points` order; those without records left out): its name, x, arm,
  seeds, per score `hierarchical_ci` ({mean, lo, hi, seeds, clips}), the ceiling means,
  and the mean final training losses and training seconds."""
  out = []
  for p in points:
    rs = sorted((r for r in records if r["point"] == p.name), key=lambda r: r["seed"])
    if not rs:
      continue
    metrics = {k: study_report.hierarchical_ci([per_clip(r, k) for r in rs], num_resamples)
               for k in FREE_KEYS + INTERVENTION_KEYS}
    out.append({
        "name": p.name, "x": p.x, "arm": p.arm, "overrides": dict(p.overrides),
        "seeds": [r["seed"] for r in rs], "metrics": metrics,
        "ceiling": {k: _ceiling(rs, k) for k in FREE_KEYS + INTERVENTION_KEYS},
        "final_text_ce": float(np.mean([r["train"]["text_ce"][-1] for r in rs])),
        "final_video_mse": float(np.mean([r["train"]["video_mse"][-1] for r in rs])),
        "train_seconds": float(np.mean([r["train_seconds"] for r in rs]))})
  return out


def format_table(summary: Mapping[str, Any]) -> str:
  """Markdown: per point the headline scores as mean [lo, hi] over seeds and clips."""
  f = lambda v: "-" if not v.get("seeds") or not np.isfinite(v["mean"]) else \
      f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
  cols = ("both", "movement", "chance_both", "consistent", "valid", "track_continuity")
  lines = [f"| point | arm | x | seeds | {' | '.join(cols)} | final video MSE |",
           "|---" * (len(cols) + 5) + "|"]
  for p in summary["points"]:
    x = "-" if p["x"] is None else f"{p['x']:g}"
    lines.append(f"| {p['name']} | {p['arm']} | {x} | {len(p['seeds'])} | "
                 + " | ".join(f(p["metrics"][k]) for k in cols)
                 + f" | {p['final_video_mse']:.3f} |")
  return "\n".join(lines)


def plot_sweep(summary: Mapping[str, Any], path: str) -> str:
  """sweep.png (module docstring)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  on_axis = sorted((p for p in summary["points"] if p["x"] is not None), key=lambda p: p["x"])
  lines = [p for p in summary["points"] if p["x"] is None]
  fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), squeeze=False)
  xs = np.array([p["x"] for p in on_axis], np.float64)
  for ax, (title, key, chance) in zip(axes[0], PANELS):
    get = lambda part, k=key: np.array([p["metrics"][k][part] for p in on_axis], np.float64)
    if len(on_axis):
      ax.plot(xs, get("mean"), "o-", color="C0", label="TV2TV")
      ax.fill_between(xs, get("lo"), get("hi"), color="C0", alpha=0.25, label="95% CI")
      if chance is not None:
        ax.plot(xs, get("mean", chance), "--", color="black", label="chance")
      ceiling = [p["ceiling"][key] for p in on_axis]
      ax.plot(xs, ceiling, ":", color="grey", label="VAE ceiling")
    for j, p in enumerate(lines):
      m = p["metrics"][key]
      if m["seeds"] and np.isfinite(m["mean"]):
        colour = f"C{j + 1}"
        ax.axhline(m["mean"], color=colour, label=p["name"])
        ax.axhspan(m["lo"], m["hi"], color=colour, alpha=0.15)
    if summary.get("x_log") and len(on_axis) and (xs > 0).all():
      ax.set_xscale("log", base=2)
      ax.set_xticks(xs, [f"1/{round(1 / x)}" if x < 1 else f"{x:g}" for x in xs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(summary.get("x_label", "x"))
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="best")
  seeds = sorted({s for p in summary["points"] for s in p["seeds"]})
  fig.suptitle(f"sweep '{summary['sweep']}': mean over seeds {seeds} with a 95% two-level "
               "bootstrap band (seeds, then clips)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(results_dir: str, sweep: SweepConfig,
                 num_resamples: int = 2000) -> dict[str, Any]:
  """summary.json, table.md and sweep.png in results_dir from the sweep's records there.

  sweep: the config's typed `sweep` section. Returns the summary.
  """
  records = [r for r in study_report.load_records(results_dir)
             if r.get("sweep") == sweep.name]
  summary = {"sweep": sweep.name, "x_label": sweep.x_label, "x_log": sweep.x_log,
             "points": summarise_points(records, sweep.points, num_resamples),
             "records": sorted(f"{r['point']}_s{r['seed']}" for r in records)}
  with open(os.path.join(results_dir, study_report.SUMMARY_NAME), "w") as f:
    json.dump(summary, f, indent=1, allow_nan=True)
  with open(os.path.join(results_dir, TABLE_NAME), "w") as f:
    f.write(format_table(summary) + "\n")
  if summary["points"]:
    plot_sweep(summary, os.path.join(results_dir, PLOT_NAME))
  return summary


# ------------------------------------------------------------------------------ findings


def per_clip_difference(record: Mapping[str, Any], key: str, base_key: str) -> np.ndarray:
  """f64[clips] of one run: per clip, `key` minus `base_key` within each intervention
  condition, then averaged over the conditions (as `per_clip`); NaN dropped."""
  conds = record["conditions"]
  return _pooled([_array(conds[n]["clips"][key]) - _array(conds[n]["clips"][base_key])
                  for n in sorted(set(conds) - {"free"}) if key in conds[n]["clips"]])


def _by_point(records: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  out: dict[str, list] = {}
  for r in sorted(records, key=lambda r: (r["point"], r["seed"])):
    out.setdefault(r["point"], []).append(r)
  return out


def _fmt(ci: Mapping[str, float]) -> str:
  return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def point_findings(runs: Sequence[Mapping[str, Any]], t2v: Sequence[Mapping[str, Any]],
                   num_resamples: int = 2000) -> dict[str, Any]:
  """One TV2TV point against the T2V end. T2V reads no text, so its level of intervention
  following is the policy's chance: `following` is "both" minus chance per clip (CI over
  seeds and clips); `valid_vs_t2v` is valid frames minus T2V's, paired by seed."""
  following = study_report.hierarchical_ci(
      [per_clip_difference(r, "both", "chance_both") for r in runs], num_resamples)
  valid = study_report.paired_difference_ci(
      {r["seed"]: per_clip(r, "valid") for r in runs},
      {r["seed"]: per_clip(r, "valid") for r in t2v}, num_resamples)
  return {"point": runs[0]["point"], "x": runs[0]["x"], "seeds": [r["seed"] for r in runs],
          "following": following, "valid_vs_t2v": valid}


def _above(ci: Mapping[str, float]) -> bool:
  return bool(np.isfinite(ci["lo"]) and ci["lo"] > 0)


def density_verdict(points: Sequence[Mapping[str, Any]]) -> str:
  """Where intervention following falls to the T2V level, from the density points."""
  dense_first = sorted(points, key=lambda p: -p["x"])
  above = [p for p in dense_first if _above(p["following"])]
  if not above:
    lo = min(p["following"]["mean"] for p in dense_first)
    hi = max(p["following"]["mean"] for p in dense_first)
    return ("Intervention following is not above the T2V level (chance) at any density "
            f"measured ({', '.join(p['point'] for p in dense_first)}; \"both\" minus chance "
            f"{lo:+.3f} to {hi:+.3f}): there is no density at which it falls to that level, "
            "because it is never above it.")
  sparsest = above[-1]
  sparser = [p for p in dense_first if p["x"] < sparsest["x"]]
  if not sparser:
    return (f"Intervention following stays above the T2V level down to the sparsest density "
            f"measured ({sparsest['point']}: {_fmt(sparsest['following'])} over chance).")
  return (f"Intervention following is above the T2V level down to {sparsest['point']} "
          f"({_fmt(sparsest['following'])} over chance) and falls to it at "
          f"{sparser[0]['point']} ({_fmt(sparser[0]['following'])}).")


def error_verdict(points: Sequence[Mapping[str, Any]], key: str, what: str) -> str:
  """The wrong-caption rate at which TV2TV's advantage on `key` (a `point_findings` CI)
  is lost, or that there is none to lose, or that it is kept over the range."""
  by_rate = sorted(points, key=lambda p: p["x"])
  if not by_rate:
    return f"{what}: no error-sweep records."
  first = by_rate[0]
  if not _above(first[key]):
    return (f"{what}: TV2TV has no advantage over T2V even with no wrong captions "
            f"({first['point']}: {_fmt(first[key])}), so there is none to lose in the "
            f"range measured (up to {by_rate[-1]['x']:.0%} wrong).")
  lost = [p for p in by_rate if not _above(p[key])]
  if not lost:
    return (f"{what}: TV2TV keeps its advantage up to {by_rate[-1]['x']:.0%} wrong captions "
            f"({by_rate[-1]['point']}: {_fmt(by_rate[-1][key])}).")
  return (f"{what}: TV2TV's advantage ({first['point']}: {_fmt(first[key])}) is lost at "
          f"{lost[0]['x']:.0%} wrong captions ({lost[0]['point']}: {_fmt(lost[0][key])}).")


def findings(density_records: Sequence[Mapping[str, Any]],
             error_records: Sequence[Mapping[str, Any]],
             num_resamples: int = 2000) -> dict[str, Any]:
  """Both sweeps against the density sweep's T2V point (T2V reads no captions, so it is
  the zero-density end and the no-text baseline of the error sweep alike)."""
  t2v = [r for r in density_records if r["arm"] == "t2v"]
  if not t2v:
    raise ValueError("the density sweep has no T2V record: the findings compare against it")
  summarise = lambda recs: [point_findings(rs, t2v, num_resamples)
                            for rs in _by_point(recs).values()
                            if rs[0]["arm"] != "t2v" and rs[0]["x"] is not None]
  density = sorted(summarise(density_records), key=lambda p: -p["x"])  # densest first
  error = sorted(summarise(error_records), key=lambda p: p["x"])
  return {"t2v_seeds": sorted(r["seed"] for r in t2v), "density": density, "error": error,
          "verdicts": {
              "density": density_verdict(density) if density else "no density records",
              "error_following": error_verdict(error, "following", "Intervention following"),
              "error_valid": error_verdict(error, "valid_vs_t2v", "Valid frames")}}


def format_findings(f: Mapping[str, Any]) -> str:
  """Markdown: per point the two comparisons, then the verdicts."""
  lines = ["| sweep | point | x | seeds | \"both\" minus chance | valid frames minus T2V |",
           "|---|---|---|---|---|---|"]
  for sweep in ("density", "error"):
    for p in f[sweep]:
      lines.append(f"| {sweep} | {p['point']} | {p['x']:g} | {len(p['seeds'])} | "
                   f"{_fmt(p['following'])} | {_fmt(p['valid_vs_t2v'])} |")
  lines.append("")
  lines += [f"- {v}" for v in f["verdicts"].values()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  import argparse
  ap = argparse.ArgumentParser(description="The sweeps' findings: where intervention "
                               "following falls to the T2V level, and the wrong-caption "
                               "rate at which TV2TV loses its advantage.")
  ap.add_argument("--density", required=True, help="the density sweep's results directory")
  ap.add_argument("--error", required=True, help="the error sweep's results directory")
  ap.add_argument("--out", required=True, help="writes findings.json and findings.md here")
  ap.add_argument("--resamples", type=int, default=2000)
  args = ap.parse_args(argv)
  load = lambda d, name: [r for r in study_report.load_records(d) if r.get("sweep") == name]
  f = findings(load(args.density, "density"), load(args.error, "error"), args.resamples)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "findings.json"), "w") as fh:
    json.dump(f, fh, indent=1, allow_nan=True)
  text = format_findings(f)
  with open(os.path.join(args.out, "findings.md"), "w") as fh:
    fh.write(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
