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
  rows = [_array(conds[n]["clips"][key]) for n in names if key in conds[n]["clips"]]
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
