r"""Train-step throughput and model-FLOPs utilisation on the host CPU.

    python benchmarks/train_step_throughput.py [--variants=tiny,small] [--steps=5] \
        [--dtypes=float32,bfloat16]

For each config variant (and each activation dtype of `--dtypes`; weights stay float32):
compile the train step, time `--steps` steps after a warm-up, and report tokens/s (row
slots, padding included, as the model computes them) and MFU = analytic train FLOPs /
step time / peak, where the peak is the float32 matmul rate measured in the same run (a
large jnp.dot; bfloat16 rows are measured against it too). Ratios measured side by side
are what this machine can compare reliably. Writes
benchmarks/results/train_step_throughput.json.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import toy_world
from tv2tv_jax import config as config_lib
from tv2tv_jax import benchmarking, flops

_VARIANTS = flags.DEFINE_list("variants", ["tiny", "small"], "Config variants to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (after one warm-up).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Activation dtypes (model.dtype) to time.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "train_step_throughput.json"), "JSON output.")


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best float32 FLOP/s of an n x n x n jnp.dot over `repeats` runs."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def time_variant(variant: str, steps: int, dtype: str = "float32") -> dict:
  cfg = toy_world.get_config(variant)
  cfg.model.dtype = dtype
  exp = config_lib.experiment_from_config_dict(cfg)
  t = benchmarking.time_train_step(exp, steps)
  return dict(variant=variant, dtype=dtype, params_m=t["params"] / 1e6,
              batch=exp.train.batch_size,
              row_len=exp.row_len, tokens_per_step=exp.train.batch_size * exp.row_len,
              step_s=t["step_s"], compile_and_first_step_s=t["compile_and_first_step_s"],
              train_flops=flops.train_step_flops(exp, exp.train.batch_size))


def main(argv):
  del argv
  peak_before = matmul_peak_flops()
  rows = [time_variant(v, _STEPS.value, d) for v in _VARIANTS.value for d in _DTYPES.value]
  peak_after = matmul_peak_flops()
  peak = max(peak_before, peak_after)
  print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s "
        f"(before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})")
  print(f"{'variant':8s} {'dtype':9s} {'params':>8s} {'tokens/step':>11s} {'step s':>8s} "
        f"{'tokens/s':>10s} {'GFLOP/s':>8s} {'MFU':>6s}")
  for r in rows:
    r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
    r["achieved_flops"] = r["train_flops"] / r["step_s"]
    r["mfu"] = r["achieved_flops"] / peak
    print(f"{r['variant']:8s} {r['dtype']:9s} {r['params_m']:7.2f}M {r['tokens_per_step']:11d} "
          f"{r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['achieved_flops'] / 1e9:8.1f} "
          f"{r['mfu']:6.1%}")
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(dict(peak_flops=peak, peak_before=peak_before, peak_after=peak_after,
                   backend=jax.default_backend(), devices=jax.device_count(), rows=rows), f,
              indent=2)


if __name__ == "__main__":
  app.run(main)
