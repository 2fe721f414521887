r"""Video VAE encode throughput on CPU (clips/s and frames/s) for a config variant.

    python -m benchmarks.vae_encode_throughput [--variant=quick] [--chunks=4] \
        [--batches=1,4,8] [--repeats=5] [--workdir=<trained run, optional>] \
        [--out=benchmarks/results/vae_encode.json]

Encodes toy-world clips of 1 + 4 * chunks frames (64x64 RGB) to latent means with the
jitted `tv2tv_jax.vae.model.encode`, for each batch size and each causal-conv
implementation ('stacked2d', the default, and 'conv3d'). Throughput does not depend on the
parameter values, so freshly initialised params are used unless --workdir names a trained
run. Compile time is excluded (one warm-up call); the median of `repeats` timed calls is
reported. On a shared 2-core CPU the numbers move with the load: the JSON records
os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from experiments import vae_toy_world
from tv2tv_jax.vae import model as vm
from tv2tv_jax.vae import train as vt, video_tokenizer


def time_encode(cfg: vm.VAEConfig, params, frames: np.ndarray, repeats: int) -> dict:
  """Median wall time of `encode(params, frames)`; frames f32[B, 1+4k, 64, 64, 3]."""
  x = jax.device_put(frames)
  t0 = time.perf_counter()
  jax.block_until_ready(vm.encode(params, x, cfg))  # compile + first run
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(vm.encode(params, x, cfg))
    times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  b, t = frames.shape[:2]
  return {"batch": b, "frames_per_clip": t, "seconds": sec, "compile_s": compile_s,
          "clips_per_s": b / sec, "frames_per_s": b * t / sec,
          "latents_per_s": b * cfg.num_latents(t) / sec}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="quick")
  parser.add_argument("--chunks", type=int, default=4)
  parser.add_argument("--batches", default="1,4,8")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--workdir", default=None, help="a trained run to load params from")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "vae_encode.json"))
  args = parser.parse_args()

  if args.workdir:
    tok = video_tokenizer.load_tokenizer(args.workdir)
    base_cfg, params = tok.config, tok.params
  else:
    base_cfg, _ = vt.configs_from_config_dict(vae_toy_world.get_config(args.variant))
    params = vm.init_params(base_cfg, jax.random.key(0))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  batches = [int(b) for b in args.batches.split(",")]
  clips = vt.clip_frames(range(max(batches)), args.chunks)
  load_before = os.getloadavg()
  rows = []
  for impl in vm.CONV_IMPLS[::-1]:  # stacked2d first: the default
    cfg = dataclasses.replace(base_cfg, conv_impl=impl)
    for b in batches:
      row = time_encode(cfg, params, clips[:b], args.repeats)
      row["conv_impl"] = impl
      rows.append(row)
  result = {
      "variant": args.variant, "trained_params": bool(args.workdir), "num_params": n_params,
      "vae_config": dataclasses.asdict(base_cfg), "chunks": args.chunks,
      "latent_shape": list(base_cfg.latent_shape(1 + 4 * args.chunks)),
      "backend": jax.default_backend(), "devices": len(jax.devices()),
      "cpu_count": os.cpu_count(), "machine": platform.machine(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows,
  }
  print(f"VAE encode throughput, variant {args.variant} ({n_params / 1e6:.2f}M params), clips of "
        f"{1 + 4 * args.chunks} frames 64x64 -> latents {tuple(result['latent_shape'])}")
  print(f"{'impl':>10} {'batch':>5} {'ms/call':>9} {'clips/s':>9} {'frames/s':>9} {'compile s':>9}")
  for r in rows:
    print(f"{r['conv_impl']:>10} {r['batch']:>5} {1e3 * r['seconds']:>9.1f} "
          f"{r['clips_per_s']:>9.2f} {r['frames_per_s']:>9.1f} {r['compile_s']:>9.1f}")
  print(f"load average before/after: {load_before} / {result['loadavg_after']}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", args.out)


if __name__ == "__main__":
  main()
