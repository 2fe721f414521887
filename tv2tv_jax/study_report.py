"""The toy-world study's results: one small record per run, the summary over seeds, the plots.

A run record (`run_record`, JSON, committed as each run finishes) holds what the report
needs and nothing large: the training curves (text CE and video MSE at each logged step),
the training time, and per condition of the generation evaluation the per-clip values of
the headline scores, the per-inserted-action table, the ceiling and chance.

The summary (`summarise_runs`) gives per arm and condition the mean over seeds of each
score with a 95% confidence interval from a two-level bootstrap: resample the seeds with
replacement, then within each drawn seed its clips with replacement, and take the mean
of the per-seed means. Both the training seed and the choice of clips vary in it, so
the interval covers how another seed would score, not only other clips. The TV2TV minus
Think2V difference in intervention accuracy gets the same bootstrap, seeds paired.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

INTERVENTION_KEYS = ("movement", "fire", "both", "chance_movement", "chance_fire",
                     "chance_both", "kept_own")
FREE_KEYS = ("consistent", "unparseable", "valid", "agent_present", "agent_intact",
             "layout_preserved", "track_continuity")
ARM_ORDER = ("tv2tv", "think2v", "t2v")
SUMMARY_NAME = "summary.json"


def _curves(run_dir: str) -> dict[str, list]:
  """Training curves from <run_dir>/metrics.jsonl: steps, text_ce, video_mse, and the
  evaluation records (eval_*)."""
  train: dict[str, list] = {"step": [], "text_ce": [], "video_mse": []}
  evals: list[dict[str, Any]] = []
  seconds = 0.0
  last_step = 0
  path = os.path.join(run_dir, "metrics.jsonl")
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if "text_ce" in rec and "step_time_s" in rec:
        step = int(rec["step"])
        train["step"].append(step)
        train["text_ce"].append(float(rec["text_ce"]))
        train["video_mse"].append(float(rec["video_mse"]))
        # Each record's step time is the mean over the steps since the previous record.
        seconds += float(rec["step_time_s"]) * max(step - last_step, 0)
        last_step = step
      elif any(k.startswith("eval") for k in rec):
        evals.append({k: v for k, v in rec.items() if isinstance(v, (int, float))})
  return {"train": train, "eval": evals, "train_seconds": seconds}


def run_record(arm: str, seed: int, run_dir: str, scores: Mapping[str, Any]) -> dict[str, Any]:
  """The committed record of one run (module docstring) from its directory and scores.json."""
  rec: dict[str, Any] = {"arm": arm, "seed": int(seed), "layout": scores.get("layout"),
                         "checkpoint_step": scores.get("checkpoint_step"),
                         "settings": {k: v for k, v in scores.get("settings", {}).items()
                                      if k != "workdir"},
                         "tolerances": scores.get("tolerances"),
                         "interventions": scores.get("interventions"),
                         **_curves(run_dir), "conditions": {}}
  for name, cond in scores.get("conditions", {}).items():
    keys = FREE_KEYS + (INTERVENTION_KEYS if name != "free" else ())
    clips = cond["clips"]
    out = {"clips": {k: [c.get(k) for c in clips] for k in keys if any(k in c for c in clips)},
           "summary": {k: v for k, v in cond["summary"].items()
                       if k in ("by_inserted_action", "plausibility")}}
    out["clips"]["inserted"] = [c.get("inserted") for c in clips]
    ceiling = (scores.get("ceiling") or {}).get(name)
    if ceiling is not None:
      out["ceiling"] = {k: v for k, v in ceiling["summary"].items() if isinstance(v, dict)
                        and "mean" in v}
    rec["conditions"][name] = out
  return rec


def load_records(results_dir: str) -> list[dict[str, Any]]:
  """Every run record (*.json but the summary) in results_dir, sorted by arm and seed."""
  out = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    if os.path.basename(path) == SUMMARY_NAME:
      continue
    with open(path) as f:
      out.append(json.load(f))
  return sorted(out, key=lambda r: (r["arm"], r["seed"]))


def _values(v: Sequence[Any]) -> np.ndarray:
  a = np.array([np.nan if x is None else float(x) for x in v], np.float64)
  return a[np.isfinite(a)]


def hierarchical_ci(per_seed: Sequence[np.ndarray], num_resamples: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict[str, float]:
  """Mean of per-seed means with a two-level bootstrap CI (module docstring).

  per_seed: one f64[n_s] array of per-clip values per training seed (empty ones dropped).
  Returns {mean, lo, hi, seeds, clips}; NaNs when there is no value.
  """
  groups = [np.asarray(g, np.float64) for g in per_seed if len(g)]
  if not groups:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "seeds": 0,
            "clips": 0}
  rng = np.random.default_rng(seed)
  stats = np.empty(num_resamples)
  for b in range(num_resamples):
    picks = rng.integers(len(groups), size=len(groups))
    stats[b] = np.mean([groups[p][rng.integers(len(groups[p]), size=len(groups[p]))].mean()
                        for p in picks])
  alpha = (1.0 - level) / 2
  return {"mean": float(np.mean([g.mean() for g in groups])),
          "lo": float(np.quantile(stats, alpha)), "hi": float(np.quantile(stats, 1 - alpha)),
          "seeds": len(groups), "clips": int(sum(len(g) for g in groups))}


def paired_difference_ci(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray],
                         num_resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
  """mean(a) - mean(b) over the seeds both have, seeds resampled together (paired), clips
  within each seed's arm resampled independently. a, b: seed -> f64[n] per-clip values."""
  common = sorted(set(a) & set(b))
  common = [s for s in common if len(a[s]) and len(b[s])]
  if not common:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "seeds": 0}
  rng = np.random.default_rng(seed)
  boot = lambda x: x[rng.integers(len(x), size=len(x))].mean()
  stats = np.empty(num_resamples)
  for r in range(num_resamples):
    picks = [common[i] for i in rng.integers(len(common), size=len(common))]
    stats[r] = np.mean([boot(a[s]) - boot(b[s]) for s in picks])
  alpha = (1.0 - level) / 2
  return {"mean": float(np.mean([a[s].mean() - b[s].mean() for s in common])),
          "lo": float(np.quantile(stats, alpha)), "hi": float(np.quantile(stats, 1 - alpha)),
          "seeds": len(common)}


def summarise_runs(records: Sequence[Mapping[str, Any]], num_resamples: int = 2000
                   ) -> dict[str, Any]:
  """Per arm, condition and score: `hierarchical_ci`; ceiling means (averaged over seeds);
  per inserted action pooled accuracies; TV2TV - Think2V intervention differences."""
  arms: dict[str, list] = {}
  for r in records:
    arms.setdefault(r["arm"], []).append(r)
  out: dict[str, Any] = {"arms": {}, "differences": {}}
  for arm, rs in arms.items():
    conds: dict[str, Any] = {}
    for name in sorted({c for r in rs for c in r["conditions"]}):
      present = [r for r in rs if name in r["conditions"]]
      keys = sorted({k for r in present for k in r["conditions"][name]["clips"]} - {"inserted"})
      entry: dict[str, Any] = {k: hierarchical_ci(
          [_values(r["conditions"][name]["clips"].get(k, [])) for r in present],
          num_resamples) for k in keys}
      ceiling_keys = sorted({k for r in present for k in r["conditions"][name].get("ceiling", {})})
      entry["ceiling"] = {k: float(np.nanmean([r["conditions"][name]["ceiling"][k]["mean"]
                                              if r["conditions"][name]["ceiling"][k]["mean"]
                                              is not None else np.nan for r in present
                                              if k in r["conditions"][name].get("ceiling", {})]))
                          for k in ceiling_keys}
      if name != "free":
        by: dict[str, dict[str, list]] = {}
        for r in present:
          clips = r["conditions"][name]["clips"]
          for i, text in enumerate(clips["inserted"]):
            d = by.setdefault(text, {"movement": [], "fire": [], "both": [], "chance_both": []})
            for k in d:
              d[k].append(clips[k][i])
        entry["by_inserted_action"] = {t: {"n": len(d["both"]), **{
            k: float(np.mean(_values(v))) if len(_values(v)) else None for k, v in d.items()}}
            for t, d in sorted(by.items())}
      conds[name] = entry
    out["arms"][arm] = {"seeds": sorted(r["seed"] for r in rs), "conditions": conds,
                        "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                        "final_text_ce": float(np.mean([r["train"]["text_ce"][-1] for r in rs])),
                        "final_video_mse": float(np.mean([r["train"]["video_mse"][-1]
                                                          for r in rs]))}
  if "tv2tv" in arms and "think2v" in arms:
    for name in sorted({c for r in arms["tv2tv"] for c in r["conditions"]} - {"free"}):
      per = lambda arm, key: {r["seed"]: _values(r["conditions"][name]["clips"][key])
                              for r in arms[arm] if name in r["conditions"]}
      out["differences"][f"tv2tv-think2v/{name}"] = {
          k: paired_difference_ci(per("tv2tv", k), per("think2v", k), num_resamples)
          for k in ("both", "movement", "fire")}
  return out


def format_table(summary: Mapping[str, Any]) -> str:
  """Markdown table: per arm and condition, the headline scores as mean [lo, hi]."""
  f = lambda v: "-" if v is None or not np.isfinite(v["mean"]) else \
      f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
  lines = ["| arm | seeds | condition | both | movement | fire | chance (both) | self-consistent "
           "| valid frames | track continuity |", "|---" * 10 + "|"]
  for arm in [a for a in ARM_ORDER if a in summary["arms"]]:
    s = summary["arms"][arm]
    for name, c in s["conditions"].items():
      lines.append(f"| {arm} | {len(s['seeds'])} | {name} | {f(c.get('both'))} | "
                   f"{f(c.get('movement'))} | {f(c.get('fire'))} | {f(c.get('chance_both'))} | "
                   f"{f(c.get('consistent'))} | {f(c.get('valid'))} | "
                   f"{f(c.get('track_continuity'))} |")
  return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def plot_interventions(summary: Mapping[str, Any], path: str) -> str:
  """Bars: intervention accuracy (movement, fire, both) per arm and condition, 95% CIs,
  chance (black tick) and the VAE ceiling (grey tick) of each bar."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  arms = [a for a in ARM_ORDER if a in summary["arms"] and a != "t2v"]
  conds = sorted({c for a in arms for c in summary["arms"][a]["conditions"]} - {"free"})
  keys = ("movement", "fire", "both")
  fig, axes = plt.subplots(1, max(len(conds), 1), figsize=(5 * max(len(conds), 1), 3.6),
                           squeeze=False)
  width = 0.8 / max(len(arms), 1)
  for ax, name in zip(axes[0], conds):
    for j, arm in enumerate(arms):
      c = summary["arms"][arm]["conditions"].get(name, {})
      xs = np.arange(len(keys)) + (j - (len(arms) - 1) / 2) * width
      m = [c.get(k, {}).get("mean", np.nan) for k in keys]
      err = [[mi - c.get(k, {}).get("lo", np.nan) for mi, k in zip(m, keys)],
             [c.get(k, {}).get("hi", np.nan) - mi for mi, k in zip(m, keys)]]
      ax.bar(xs, m, width, yerr=err, capsize=3, label=arm)
      chance = [c.get(f"chance_{k}", {}).get("mean", np.nan) for k in keys]
      ceiling = [c.get("ceiling", {}).get(k, np.nan) for k in keys]
      ax.hlines(chance, xs - width / 2, xs + width / 2, colors="black", linewidth=2)
      ax.hlines(ceiling, xs - width / 2, xs + width / 2, colors="grey", linestyles="dashed")
    ax.set_xticks(np.arange(len(keys)), keys)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{name}: action inserted")
    ax.set_ylabel("accuracy (oracle)")
  axes[0][0].legend(loc="upper left", fontsize=8)
  fig.suptitle("Intervention following, mean over seeds, 95% CI "
               "(black: chance, dashed: VAE ceiling)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_by_action(summary: Mapping[str, Any], path: str) -> str:
  """Bars: 'both' accuracy per inserted action, per arm, pooled over conditions and seeds."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  arms = [a for a in ARM_ORDER if a in summary["arms"] and a != "t2v"]
  pooled: dict[str, dict[str, list]] = {}
  for arm in arms:
    for name, c in summary["arms"][arm]["conditions"].items():
      for text, d in c.get("by_inserted_action", {}).items():
        if d["both"] is not None:
          pooled.setdefault(arm, {}).setdefault(text, []).append((d["both"], d["n"]))
  actions = sorted({t for a in pooled.values() for t in a})
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(actions) + 2), 3.4))
  width = 0.8 / max(len(arms), 1)
  for j, arm in enumerate(arms):
    vals = []
    for t in actions:
      items = pooled.get(arm, {}).get(t, [])
      n = sum(k for _, k in items)
      vals.append(sum(v * k for v, k in items) / n if n else np.nan)
    ax.bar(np.arange(len(actions)) + (j - (len(arms) - 1) / 2) * width, vals, width, label=arm)
  ax.set_xticks(np.arange(len(actions)), actions, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("accuracy, movement and fire")
  ax.set_title("Intervention following per inserted action (pooled over 1 s / 3 s, seeds)",
               fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_losses(records: Sequence[Mapping[str, Any]], path: str) -> str:
  """Training text CE and video MSE per arm (thin: each seed; thick: mean over seeds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
  colours = {a: f"C{i}" for i, a in enumerate(ARM_ORDER)}
  for key, ax in zip(("text_ce", "video_mse"), axes):
    for arm in ARM_ORDER:
      rs = [r for r in records if r["arm"] == arm]
      if not rs or (key == "text_ce" and arm == "t2v" and
                    not np.any(np.asarray(rs[0]["train"][key]) > 0)):
        continue
      for r in rs:
        ax.plot(r["train"]["step"], r["train"][key], color=colours[arm], alpha=0.25, lw=0.8)
      n = min(len(r["train"]["step"]) for r in rs)
      ax.plot(rs[0]["train"]["step"][:n], np.mean([r["train"][key][:n] for r in rs], 0),
              color=colours[arm], lw=2, label=f"{arm} ({len(rs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
  fig.suptitle("Training losses (text CE over text targets, flow MSE over noisy copies)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(results_dir: str, vae_eval: Mapping[str, Any] | None = None,
                 num_resamples: int = 2000) -> dict[str, Any]:
  """summary.json and the plots (interventions.png, by_action.png, losses.png) in
  results_dir from its run records. Returns the summary."""
  records = load_records(results_dir)
  summary = summarise_runs(records, num_resamples)
  summary["vae"] = dict(vae_eval or {})
  summary["runs"] = [f"{r['arm']}_s{r['seed']}" for r in records]
  with open(os.path.join(results_dir, SUMMARY_NAME), "w") as f:
    json.dump(summary, f, indent=1, allow_nan=True)
  if records:
    plot_interventions(summary, os.path.join(results_dir, "interventions.png"))
    plot_by_action(summary, os.path.join(results_dir, "by_action.png"))
    plot_losses(records, os.path.join(results_dir, "losses.png"))
  return summary
