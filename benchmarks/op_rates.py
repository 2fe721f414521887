r"""The rates of a transformer layer's parts at the peer comparison's shapes, in XLA and torch.

    pip install -e ".[benchmark]"
    python benchmarks/op_rates.py [--rounds=3] [--calls=10]

`benchmarks/peer_comparison.py` divides each train step's model FLOP/s by its own
framework's float32 2048^3 matmul. This script asks what that ratio can reach at those
shapes: it times, in one process per framework and on the same data, each part of a layer
forward + backward (the gradient of a sum of squares, so every backward matmul runs) and
reports its FLOP/s and its ratio to the same framework's 2048^3 matmul:

  ffn        SwiGLU on [8*512 rows, 256] -> 682 -> 256 (the video tower's FFN)
  qkv        three [8*512, 256] x [256, 256] projections
  attention  softmax(q k^T / 8) v over [8*4 heads, 352, 64] (the [text | clean] block of
             the peer row: 96 text slots + 16 clean chunks of 16), unmasked
  region     XLA only: `region_attention` of one layer over the whole peer row (608 slots,
             the TV2TV mask, 41% of pairs skipped); FLOPs counted as the pairs it computes

Both sides run float32 on all cores, torch eager (no compile: these are single ops). FLOPs
count multiply-adds as 2 and only the matmuls (softmax and SiLU are not counted), forward
x3 for forward + backward. Each part: the median over `--rounds` of the best of `--calls`
timed calls. Writes benchmarks/results/op_rates.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_comparison as peer  # noqa: E402

ROWS = peer.BATCH * peer.CHUNKS * peer.CHUNK_TOKENS  # video tower rows: 8 x 512
KEPT = peer.CHUNKS * (peer.TEXT_PER_CHUNK + 2) + peer.CHUNKS * peer.CHUNK_TOKENS  # 352
D, F, H, DH, N = peer.WIDTH, peer.FFN, peer.HEADS, peer.HEAD_DIM, peer.MATMUL_N

FLOPS = {  # forward + backward = 3x forward
    "matmul_2048": 2 * N ** 3,
    "ffn": 3 * 3 * 2 * ROWS * D * F,
    "qkv": 3 * 3 * 2 * ROWS * D * D,
    "attention": 3 * 2 * 2 * peer.BATCH * H * KEPT * KEPT * DH,
}


def _best(fn, calls: int) -> float:
  return min(peer._timed(fn, calls))


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
  r = np.random.default_rng(seed)
  f = lambda *s: (r.standard_normal(s) / np.sqrt(s[0] if len(s) == 2 else 1)).astype(np.float32)
  return {"a": f(N, N), "b": f(N, N), "x": f(ROWS, D), "wg": f(D, F), "wu": f(D, F),
          "wd": f(F, D), "wq": f(D, D), "wk": f(D, D), "wv": f(D, D),
          "q": f(peer.BATCH * H, KEPT, DH), "k": f(peer.BATCH * H, KEPT, DH),
          "v": f(peer.BATCH * H, KEPT, DH)}


def _region_part(calls: int):
  """(timer, FLOPs) of one layer's `region_attention` forward + backward at the peer row."""
  import jax
  import jax.numpy as jnp

  from tv2tv_jax import masks, synthetic
  from tv2tv_jax.attention import reference
  exp = peer.ours_experiment()
  batch = synthetic.random_batch(0, exp.seq, exp.model, exp.train.batch_size)
  meta = masks.SeqMeta.from_batch(batch)
  length = meta.segment_ids.shape[1]
  regions = masks.Regions.of_experiment(exp)
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (peer.BATCH, length, H, DH)) for x in ks)
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
      reference.region_attention(q, k, v, meta, regions) ** 2), argnums=(0, 1, 2)))
  jax.block_until_ready(grad(q, k, v))
  pairs = length * length - regions.skipped_count(length)
  flops = 3 * 2 * 2 * peer.BATCH * H * pairs * DH
  return (lambda: _best(lambda: jax.block_until_ready(grad(q, k, v)), calls)), flops


def xla_parts(calls: int) -> dict:
  import jax
  import jax.numpy as jnp
  d = {k: jnp.asarray(v) for k, v in _inputs().items()}
  sq = lambda y: jnp.sum(y * y)
  fns = {
      "matmul_2048": (jax.jit(lambda a, b: a @ b), ("a", "b")),
      "ffn": (jax.jit(jax.grad(lambda x, g, u, w: sq(
          (jax.nn.silu(x @ g) * (x @ u)) @ w), argnums=(0, 1, 2, 3))), ("x", "wg", "wu", "wd")),
      "qkv": (jax.jit(jax.grad(lambda x, a, b, c: sq(x @ a) + sq(x @ b) + sq(x @ c),
                               argnums=(0, 1, 2, 3))), ("x", "wq", "wk", "wv")),
      "attention": (jax.jit(jax.grad(lambda q, k, v: sq(jax.nn.softmax(
          jnp.einsum("bqd,bkd->bqk", q, k) * DH ** -0.5, axis=-1) @ v), argnums=(0, 1, 2))),
                    ("q", "k", "v")),
  }
  timers = {}
  for name, (fn, names) in fns.items():
    args = [d[a] for a in names]
    jax.block_until_ready(fn(*args))
    timers[name] = (lambda fn=fn, args=args: _best(
        lambda: jax.block_until_ready(fn(*args)), calls))
  region_timer, region_flops = _region_part(calls)
  timers["region"] = region_timer
  return {"timers": timers, "flops": dict(FLOPS, region=region_flops)}


def torch_parts(calls: int) -> dict:
  import torch
  d = {k: torch.from_numpy(v) for k, v in _inputs().items()}

  def backward_of(loss_fn, names):
    leaves = [d[a].clone().requires_grad_(True) for a in names]

    def run():
      loss_fn(*leaves).backward()
      for leaf in leaves:
        leaf.grad = None
    return run
  sq = lambda y: (y * y).sum()
  fns = {
      "matmul_2048": lambda: d["a"] @ d["b"],
      "ffn": backward_of(lambda x, g, u, w: sq(
          (torch.nn.functional.silu(x @ g) * (x @ u)) @ w), ("x", "wg", "wu", "wd")),
      "qkv": backward_of(lambda x, a, b, c: sq(x @ a) + sq(x @ b) + sq(x @ c),
                         ("x", "wq", "wk", "wv")),
      "attention": backward_of(lambda q, k, v: sq(torch.softmax(
          q @ k.transpose(1, 2) * DH ** -0.5, dim=-1) @ v), ("q", "k", "v")),
  }
  timers = {}
  with torch.no_grad():
    fns["matmul_2048"]()
  for name, fn in fns.items():
    if name != "matmul_2048":
      fn()
    timers[name] = (lambda fn=fn: _best(fn, calls))
  return {"timers": timers, "flops": dict(FLOPS), "threads": torch.get_num_threads()}


def measure(rounds: int, calls: int) -> dict:
  sides = {"xla": xla_parts(calls), "torch": torch_parts(calls)}
  times = {s: {p: [] for p in v["timers"]} for s, v in sides.items()}
  for _ in range(rounds):
    for s, v in sides.items():  # interleaved, so drift falls on both
      for p, timer in v["timers"].items():
        times[s][p].append(timer())
  out = {}
  for s, v in sides.items():
    rows = {}
    for p, ts in times[s].items():
      sec = statistics.median(ts)
      rows[p] = {"seconds": sec, "rounds_s": ts, "gflop": v["flops"][p] / 1e9,
                 "gflops_per_s": v["flops"][p] / sec / 1e9}
    peak = rows["matmul_2048"]["gflops_per_s"]
    for r in rows.values():
      r["ratio_to_matmul"] = r["gflops_per_s"] / peak
    out[s] = rows
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "op_rates.json"))
  args = ap.parse_args(argv)
  result = measure(args.rounds, args.calls)
  print(f"{'part':<12} {'side':<6} {'ms':>9} {'GFLOP':>7} {'GFLOP/s':>8} {'/ matmul':>9}")
  for part in result["xla"]:
    for side in ("xla", "torch"):
      r = result[side].get(part)
      if r:
        print(f"{part:<12} {side:<6} {r['seconds'] * 1e3:9.2f} {r['gflop']:7.2f} "
              f"{r['gflops_per_s']:8.1f} {r['ratio_to_matmul']:9.3f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rounds": args.rounds, "calls": args.calls, "parts": result}, f, indent=1)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
