r"""Run one benchmark against two commits side by side, interleaved, and compare.

    python benchmarks/compare_commits.py --base=<commit> --rounds=3 \
        --keys='rows.*.step_s' -- benchmarks/train_step_throughput.py --variants=tiny,small
    python benchmarks/compare_commits.py --base=<commit> --rounds=3 \
        --keys='per_chunk_s.cached.*' -- benchmarks/sampler_latency.py --chunks=32

The base commit is checked out into a temporary git worktree. Each round runs the
benchmark script once per tree (the order alternates between rounds, so drift of
this noisy machine falls on both sides alike), each in a fresh process whose
`PYTHONPATH` and working directory are that tree: the library and the experiment
configs come from the tree, the measuring script is the same file for both (this
checkout's). Every numeric leaf of the written JSON whose dotted path matches one of
`--keys` (shell-style patterns, `*` matching one path part or any list index) is
collected; the table shows per key the median over rounds for each tree and their
ratio head / base (time-like keys: < 1 means head is faster). Writes
benchmarks/results/compare_<script>_<base>.json.

A key that names a list of timings (e.g. per-chunk times) is summarised by its
median before the rounds are compared.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(obj, prefix="", in_list=False):
  """Yields (dotted path, value, whether the value is an element of a JSON list)."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _leaves(v, f"{prefix}.{i}", in_list=True)
  else:
    yield prefix, obj, in_list


def select(doc: dict, patterns: list[str]) -> dict[str, float]:
  """{dotted path: value} for the numeric leaves of `doc` matching any pattern; the
  numbers of one JSON list are summarised as '<list path>.median'."""
  out: dict[str, float] = {}
  lists: dict[str, list[float]] = {}
  for path, v, in_list in _leaves(doc):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      continue
    if not any(fnmatch.fnmatchcase(path, p) for p in patterns):
      continue
    if in_list:
      lists.setdefault(path.rpartition(".")[0], []).append(float(v))
    else:
      out[path] = float(v)
  out.update({f"{h}.median": statistics.median(vs) for h, vs in lists.items()})
  return out


def _label(doc: dict, path: str) -> str:
  """'rows.1.step_s' -> 'rows.1[small].step_s' when that row names its variant."""
  parts = path.split(".")
  node, shown = doc, []
  for p in parts:
    shown.append(p)
    if isinstance(node, list) and p.isdigit():
      node = node[int(p)]
      name = node.get("variant") or node.get("config") if isinstance(node, dict) else None
      if name:
        shown[-1] = f"{p}[{name}]"
    elif isinstance(node, dict):
      node = node.get(p)
  return ".".join(shown)


def run_once(tree: str, script: str, args: list[str], out: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree)
  cmd = [sys.executable, script, *args, f"--out={out}"]
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
  print(f"  {os.path.basename(tree)}: {time.perf_counter() - t0:.0f}s", flush=True)
  with open(out) as f:
    return json.load(f)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base", required=True, help="the commit to compare this checkout with")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--keys", required=True, help="comma-separated dotted-path patterns")
  ap.add_argument("script", help="the benchmark script (this checkout's), then its flags")
  ap.add_argument("script_args", nargs=argparse.REMAINDER)
  args = ap.parse_args(argv)
  script = os.path.abspath(args.script)
  patterns = [p.strip() for p in args.keys.split(",") if p.strip()]
  head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
  base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = os.path.join(tmp, f"base_{base_rev}")
    subprocess.run(["git", "worktree", "add", "--detach", base_tree, args.base], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
      trees = {"head": ROOT, "base": base_tree}
      got: dict[str, list[dict[str, float]]] = {"head": [], "base": []}
      doc = None
      for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
        for side in order:
          out = os.path.join(tmp, f"{side}_{r}.json")
          d = run_once(trees[side], script, args.script_args, out)
          doc = doc or d
          got[side].append(select(d, patterns))
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT,
                     check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  keys = sorted(set(got["head"][0]) & set(got["base"][0]))
  if not keys:
    raise SystemExit(f"no numeric value matches --keys={args.keys}")
  rows = []
  for k in keys:
    h = statistics.median(g[k] for g in got["head"])
    b = statistics.median(g[k] for g in got["base"])
    rows.append(dict(key=_label(doc, k.removesuffix(".median")) +
                     (".median" if k.endswith(".median") else ""),
                     base=b, head=h, ratio=h / b if b else float("nan"),
                     base_rounds=[g[k] for g in got["base"]],
                     head_rounds=[g[k] for g in got["head"]]))
  width = max(len(r["key"]) for r in rows)
  print(f"\n{'key':<{width}}  {'base ' + base_rev:>14}  {'head ' + head_rev:>14}  head/base")
  for r in rows:
    print(f"{r['key']:<{width}}  {r['base']:>14.5g}  {r['head']:>14.5g}  {r['ratio']:9.3f}")
  name = os.path.splitext(os.path.basename(script))[0]
  # Named by the base too, so that comparisons against different commits all stay.
  path = os.path.join(ROOT, "benchmarks", "results", f"compare_{name}_{base_rev}.json")
  with open(path, "w") as f:
    json.dump(dict(script=os.path.relpath(script, ROOT), script_args=args.script_args,
                   base=base_rev, head=head_rev, rounds=args.rounds, keys=patterns, rows=rows),
              f, indent=1)
  print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
  main()
