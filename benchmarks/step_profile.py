r"""Where the train step's time goes, per compiled op, from a `jax.profiler` trace (CPU).

    python benchmarks/step_profile.py --shapes=peer [--unrolled] [--steps=3]

Compiles the train step (`benchmarks/step_breakdown.py`'s shapes: `peer` = the peer
comparison's, or a toy-world variant such as `small`), runs it under `jax.profiler.trace`
with a Perfetto trace, and sums the trace's op events per step:

  * by kind: the op name without its numeric suffix (`ynn_fusion` = a dot, alone or with
    the elementwise ops XLA fused into it, run by YNNPACK; `wrapped_broadcast`,
    `transpose_copy_fusion`, ... = XLA's own loop fusions);
  * the dots: each op of the optimised HLO that holds a dot, with its FLOPs (2 per
    multiply-add), grouped by FLOPs, each group's time and rate.

Op times add up to more than the step: XLA:CPU runs independent ops concurrently on the
cores. `--unrolled` sets `model.scan_layers=False` (every layer its own ops; under
`nn.scan` the backward's per-layer residuals are stacked into buffers that are first
zero-filled, the `wrapped_broadcast` ops). Writes benchmarks/results/step_profile_<shapes>.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_breakdown  # noqa: E402
from tv2tv_jax import benchmarking  # noqa: E402

_HOST_EVENTS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool")
_SHAPE = r"[a-z0-9]+\[([\d,]*)\]"


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def dot_flops_by_op(hlo: str) -> dict[str, float]:
  """Per op of the optimised HLO text that contains dots (a fusion calling a computation
  with dots, or a dot itself): the dots' FLOPs, 2 per multiply-add."""
  shapes, comp_flops, calls, unfused, cur = {}, collections.Counter(), {}, {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)  # computations start unindented
    if head:
      cur = head.group(1)
      continue
    m = re.match(rf"\s*(?:ROOT )?%([\w.\-]+) = {_SHAPE}\S* (\w[\w\-]*)\((.*)", line)
    if not m:
      continue
    name, out, opcode, rest = m.group(1), _dims(m.group(2)), m.group(3), m.group(4)
    shapes[(cur, name)] = out
    if opcode == "fusion":
      target = re.search(r"calls=%([\w.\-]+)", rest)
      if target:
        calls[name] = target.group(1)
    elif opcode == "dot":
      lhs = re.match(r"%([\w.\-]+)", rest).group(1)
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
      lhs_shape = shapes.get((cur, lhs))
      if lhs_shape is None:  # an operand not declared above it: not counted
        continue
      k = math.prod(lhs_shape[int(d)] for d in _dims(contracting.group(1)))
      comp_flops[cur] += 2.0 * math.prod(out) * k
      unfused[(cur, name)] = 2.0 * math.prod(out) * k
  out = {name: comp_flops[c] for name, c in calls.items() if comp_flops.get(c)}
  fused = set(calls.values())  # a dot inside a fusion is timed as the fusion
  out.update({name: f for (comp, name), f in unfused.items() if comp not in fused})
  return out


def profile(shapes: str, unrolled: bool, steps: int) -> dict:
  exp = step_breakdown._experiment(shapes)
  if unrolled:
    exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, scan_layers=False))
  step, state, batch, rng = benchmarking.synthetic_train_step(exp)
  for _ in range(2):
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
  hlo = step.lower(state, batch, rng).compile().as_text()
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
    traced_s = (time.perf_counter() - t0) / steps
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op, runs = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_HOST_EVENTS) \
        and "block_until_ready" not in e["name"]:
      per_op[e["name"]] += e.get("dur", 0) / 1e6 / steps  # seconds per step
      runs[e["name"]] += 1 / steps  # an op of the scanned layer runs once per layer
  by_kind = collections.Counter()
  for name, s in per_op.items():
    by_kind[re.sub(r"\.\d+$", "", name)] += s
  flops = dot_flops_by_op(hlo)
  groups = collections.defaultdict(lambda: {"ops": 0, "seconds": 0.0, "gflop": 0.0,
                                            "names": []})
  for name, s in per_op.items():
    if name in flops:
      g = groups[f"{flops[name] / 1e9:.3f}"]
      g["ops"] += round(runs[name])
      g["names"].append(name)
      g["seconds"] += s
      g["gflop"] += flops[name] * runs[name] / 1e9
  dots = sorted(({"gflop_per_op": float(k), **v, "gflops_per_s": v["gflop"] / v["seconds"]}
                 for k, v in groups.items() if v["seconds"] > 0),
                key=lambda r: -r["seconds"])
  dot_s = sum(r["seconds"] for r in dots)
  return {"shapes": shapes, "unrolled": unrolled, "steps": steps,
          "step_s_under_trace": traced_s, "op_seconds_sum": sum(per_op.values()),
          "dot_ops_seconds": dot_s, "dot_gflop": sum(r["gflop"] for r in dots),
          "by_kind": dict(by_kind.most_common()), "dots": dots}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="peer")
  ap.add_argument("--unrolled", action="store_true")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  r = profile(args.shapes, args.unrolled, args.steps)
  print(f"step under trace {r['step_s_under_trace'] * 1e3:.0f} ms; op times sum to "
        f"{r['op_seconds_sum'] * 1e3:.0f} ms (ops overlap)")
  print(f"ops with dots: {r['dot_ops_seconds'] * 1e3:.0f} ms for {r['dot_gflop']:.1f} GFLOP "
        f"({r['dot_gflop'] / r['dot_ops_seconds']:.0f} GFLOP/s)")
  for kind, s in list(r["by_kind"].items())[:20]:
    print(f"  {s * 1e3:8.1f} ms  {kind}")
  print("dots by size (GFLOP per op): ops run per step, ms, GFLOP/s")
  for d in r["dots"][:12]:
    print(f"  {d['gflop_per_op']:7.3f}  {d['ops']:4d}  {d['seconds'] * 1e3:7.1f}  "
          f"{d['gflops_per_s']:6.0f}")
  suffix = "_unrolled" if args.unrolled else ""
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"step_profile_{args.shapes}{suffix}.json")
  with open(out, "w") as f:
    json.dump(r, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
