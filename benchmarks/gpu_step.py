r"""The train step and the attention paths on an accelerator: MFU at `small` and at a 1B-class
width, and our XLA attention against `jax.nn.dot_product_attention` (cuDNN).

    python benchmarks/gpu_step.py                          # on the GPU: small and 1b, bf16
    python benchmarks/gpu_step.py --variants=tiny --steps=2 --calls=2   # a CPU check

Written to run unchanged on an H200 within a few minutes of device time; on CPU it runs
the same code (cuDNN rows are recorded as unavailable), which is how it is tested.

Train step, per variant (`experiments/toy_world.py`'s size, activations in `--dtype`,
weights float32): step time (median of `--steps` after compile), tokens/s, and MFU =
`flops.train_step_flops` / step time / `flops.device_peak_flops()` (the published dense
bf16 peak of a known accelerator: 989 TFLOP/s for H100 / H200; on CPU the measured float32
matmul rate). Variants: `tiny`, `small`, and `1b` = `small`'s rows and batch with width
2048, 16 layers, 16 query heads of 128 (8 KV heads), SwiGLU 5632 (two towers: 1.52B
parameters, each token running one tower's half).

Attention, per variant, at its row (the synthetic batch's mask), forward + backward
(gradient of a sum of squares) in `--dtype`, median of `--calls`:
  ours            `region_attention` (the model's XLA path: the TV2TV mask, the layout's
                  invisible blocks skipped)
  xla_dense       `jax.nn.dot_product_attention(implementation='xla')`, the TV2TV mask dense
  cudnn_mask      `implementation='cudnn'`, the TV2TV mask as an additive bias (cuDNN has no
                  mask mode for it; the bias is the mask exactly)
  cudnn_causal    `implementation='cudnn', is_causal=True`: a causal mask of the same length,
                  a reference for the kernel's speed only (not TV2TV's mask)
Each masked path's output is checked against `ours` (max abs difference, in the JSON).
Writes benchmarks/results/gpu_step_<platform>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import toy_world  # noqa: E402
from tv2tv_jax import benchmarking, flops, masks, synthetic  # noqa: E402
from tv2tv_jax import config as config_lib  # noqa: E402
from tv2tv_jax.attention import reference  # noqa: E402

ONE_B = dict(d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8, head_dim=128,
             mlp_dim=5632)


def experiment(variant: str, dtype: str):
  """The Experiment of `variant` (module docstring) with activations in `dtype`."""
  cfg = toy_world.get_config("small" if variant == "1b" else variant)
  if variant == "1b":
    cfg.model.update(**ONE_B)
  cfg.model.dtype = dtype
  return config_lib.experiment_from_config_dict(cfg)


def step_row(exp, variant: str, steps: int) -> dict:
  t = benchmarking.time_train_step(exp, steps)
  tokens = exp.train.batch_size * exp.row_len
  train_flops = flops.train_step_flops(exp, exp.train.batch_size)
  return dict(variant=variant, dtype=exp.model.dtype, params=t["params"],
              batch=exp.train.batch_size, row_len=exp.row_len, step_s=t["step_s"],
              compile_and_first_step_s=t["compile_and_first_step_s"],
              tokens_per_s=tokens / t["step_s"], train_flops=train_flops,
              mfu=train_flops / t["step_s"] / flops.device_peak_flops())


def _timed_grad(fn, args, calls: int) -> float:
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2),
                          argnums=(0, 1, 2)))
  return benchmarking.median_seconds(lambda: grad(*args), calls)


def attention_paths(exp):
  """name -> (fn(q, k, v) -> [B, L, H, dh], inputs) of the module docstring's paths."""
  c = exp.model
  batch = synthetic.random_batch(0, exp.seq, c, exp.train.batch_size)
  meta = masks.SeqMeta.from_batch(batch)
  regions = masks.Regions.of_experiment(exp)
  b, length = meta.segment_ids.shape
  dt = jnp.dtype(c.dtype)
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, length, c.num_heads, c.head_dim), dt)
  k, v = (jax.random.normal(x, (b, length, c.num_kv_heads, c.head_dim), dt) for x in ks[1:])
  mask = masks.dense_mask(meta)[:, None]  # [B, 1, L, L]
  bias = jnp.where(mask, 0.0, -1e9).astype(dt)
  dpa = jax.nn.dot_product_attention
  paths = {
      "ours": lambda q, k, v: reference.region_attention(q, k, v, meta, regions),
      "xla_dense": lambda q, k, v: dpa(q, k, v, mask=mask, implementation="xla"),
      "cudnn_mask": lambda q, k, v: dpa(q, k, v, bias=bias, implementation="cudnn"),
      "cudnn_causal": lambda q, k, v: dpa(q, k, v, is_causal=True, implementation="cudnn"),
  }
  return paths, (q, k, v)


def attention_rows(exp, variant: str, calls: int) -> list[dict]:
  paths, args = attention_paths(exp)
  ours = np.asarray(jax.jit(paths["ours"])(*args), np.float32)
  rows = []
  for name, fn in paths.items():
    row = {"variant": variant, "path": name, "dtype": exp.model.dtype}
    try:
      out = np.asarray(jax.jit(fn)(*args), np.float32)
      row["seconds"] = _timed_grad(fn, args, calls)
    except Exception as e:  # noqa: BLE001 -- cuDNN off a GPU, or a shape it refuses
      row["unavailable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      rows.append(row)
      continue
    if name != "cudnn_causal":
      row["max_abs_diff_vs_ours"] = float(np.max(np.abs(out - ours)))
    rows.append(row)
  base = next((r["seconds"] for r in rows if r["path"] == "ours" and "seconds" in r), None)
  for r in rows:
    if base and "seconds" in r:
      r["ours_over_this"] = base / r["seconds"]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--variants", default="small,1b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--calls", type=int, default=10)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  device = jax.local_devices()[0]
  result = {"platform": device.platform, "device_kind": device.device_kind,
            "peak_flops": flops.device_peak_flops(), "steps": [], "attention": []}
  for variant in args.variants.split(","):
    exp = experiment(variant, args.dtype)
    r = step_row(exp, variant, args.steps)
    result["steps"].append(r)
    print(f"{variant:6s} {r['params'] / 1e6:8.1f}M params  step {r['step_s'] * 1e3:8.1f} ms  "
          f"{r['tokens_per_s']:10.0f} tok/s  MFU {r['mfu']:6.1%}", flush=True)
    for a in attention_rows(exp, variant, args.calls):
      result["attention"].append(a)
      timing = (f"{a['seconds'] * 1e3:8.2f} ms" if "seconds" in a
                else f"unavailable ({a['unavailable'][:60]})")
      print(f"  attention {a['path']:13s} {timing}  "
            f"diff {a.get('max_abs_diff_vs_ours', float('nan')):.2e}", flush=True)
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"gpu_step_{device.platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
