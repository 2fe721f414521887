"""Sampler latency: the KV-cached sampler vs recomputing the sequence from scratch.

Four measurements, side by side in one process (randomly perturbed params, so
every path does real work):

1. Per-chunk latency as the video grows. For each chunk i of one cached generation
   of N chunks: the wall time from its BOF to its EOF (the `steps` ODE steps in one
   jitted loop, then the clean chunk appended). The recompute oracle
   (`tv2tv_jax.sampling.recompute`: `TV2TV.__call__` on the whole row at every
   velocity evaluation) is timed at chunk c for c in `--recompute_at`, each in its
   own generation of c chunks whose row holds exactly c chunks (so it is not
   charged for an oversized row; its first chunk compiles, the timed last one does
   not). The cached cache holds all N chunks, so its early chunks pay for the full
   capacity (attention spans it, masked): that favours the recompute side.
2. One cached ODE step (`CachedBackend.denoise` on a one-step grid: the chunk's n
   tokens against the cache at the end of the generation) vs one full forward of the
   whole sequence.
3. CFG overhead: that step with the conditional and the text-dropped branch batched
   (2 query rows sharing one downsampler pass) vs the conditional branch alone.
4. Batched requests: B requests generated together vs one after another.

Every chunk's text is forced (one token), so both paths do identical work, and the
cached and recomputed chunks are checked to agree (rel. < 1e-4).

Run:

    python benchmarks/sampler_latency.py                      # tiny model, 64 chunks, CPU
    python benchmarks/sampler_latency.py --config small --chunks 32 --recompute_at 1,8,32
    # writes benchmarks/results/sampler_latency_<config>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import toy_world  # noqa: E402
from tv2tv_jax import benchmarking, config as config_lib, train_step  # noqa: E402
from tv2tv_jax.model import TV2TV  # noqa: E402
from tv2tv_jax.sampling import recompute, sampler  # noqa: E402
from tv2tv_jax.sampling.decoding import Request, SamplerConfig  # noqa: E402


class TimedBackend:
  """Wraps a batched backend; records the wall time of every chunk of row 0
  (BOF written .. EOF written, device work included)."""

  def __init__(self, inner, bof: int, eof: int):
    self.inner, self.bof, self.eof = inner, bof, eof
    self.start, self.times = None, []

  def _sync(self):
    cache = getattr(self.inner, "cache", None)
    jax.block_until_ready(cache if cache is not None else 0)

  def append_text(self, tokens, plans):
    first = None if tokens[0] is None else [int(t) for t in np.asarray(tokens[0])]
    if first == [self.bof]:
      self._sync()
      self.start = time.perf_counter()
    self.inner.append_text(tokens, plans)
    if first == [self.eof]:
      self._sync()
      self.times.append(time.perf_counter() - self.start)

  def logits(self, rows):
    return self.inner.logits(rows)

  def denoise(self, x, chunk, rows, sc, grid):
    return self.inner.denoise(x, chunk, rows, sc, grid)

  def append_chunk(self, latents, chunk):
    self.inner.append_chunk(latents, chunk)


def _experiment(name: str, chunks: int, prompt_len: int):
  exp = config_lib.experiment_from_config_dict(toy_world.get_config(name))
  text_len = prompt_len + 3 * chunks + 1  # one forced token + BOF + EOF per chunk, EOS
  # No first frame: as many noisy copies as chunks (the recompute row holds them all).
  return dataclasses.replace(exp, seq=dataclasses.replace(exp.seq, text_len=text_len,
                                                          max_chunks=chunks, noisy_chunks=0))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--chunks", type=int, default=64)
  ap.add_argument("--recompute_at", default="1,2,4,8,16,32,64",
                  help="comma-separated chunk numbers at which to time the recompute oracle")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--cfg_scale", type=float, default=2.0)
  ap.add_argument("--batch", type=int, default=4, help="requests in the batched comparison")
  ap.add_argument("--reps", type=int, default=5, help="repetitions of the single-call timings")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  prompt = [5, 6, 7]
  exp = _experiment(args.config, args.chunks, len(prompt))
  model = TV2TV(exp.model)
  params = train_step.create_train_state(model, exp, jax.random.key(0)).params
  # Perturb so that zero-initialised output convs do not make every velocity 0.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  sc = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale)
  n = exp.model.tokens_per_chunk

  def request(chunks, seed=0):
    return Request(prompt=prompt, num_chunks=chunks, seed=seed,
                   interventions={i: [10 + i % 50] for i in range(chunks)})

  def timed(backend, req):
    tb = TimedBackend(backend, exp.seq.bof_id, exp.seq.eof_id)
    return sampler.generate(tb, req, exp, sc), tb.times

  # 1. Per-chunk latency.
  sampler.generate(sampler.CachedBackend(model, params, exp), request(2), exp, sc)  # compile
  cached, t_cached = timed(sampler.CachedBackend(model, params, exp), request(args.chunks))
  at = sorted({int(c) for c in args.recompute_at.split(",") if 0 < int(c) <= args.chunks})
  t_recomp, worst_rel = {}, 0.0
  for c in at:
    exp_c = _experiment(args.config, c, len(prompt))
    make = lambda: recompute.oracle(model, params, exp_c)
    if c == 1:
      timed(make(), request(1))  # compile this row size
    oracle, times = timed(make(), request(c))
    t_recomp[c] = times[-1]
    ref = cached.chunks[:c]
    worst_rel = max(worst_rel, float(np.max(np.abs(oracle.chunks - ref)) / np.max(np.abs(ref))))
    print(f"  chunk {c}: cached {t_cached[c - 1] * 1e3:.1f} ms, "
          f"recompute {t_recomp[c] * 1e3:.1f} ms (x{t_recomp[c] / t_cached[c - 1]:.1f})",
          flush=True)
  if not worst_rel < 1e-4:
    raise SystemExit(f"cached and recomputed generations disagree: rel. error {worst_rel:.3g}")

  # 2 and 3. One velocity evaluation at the end of the generation vs a full forward.
  backend = sampler.CachedBackend(model, params, exp)
  gen = sampler.generate(backend, request(args.chunks), exp, sc)
  # One ODE step as the sampler runs it (`denoise` on a one-step grid): conditional only
  # (cfg_scale 1) and both CFG branches batched.
  x = jnp.asarray(gen.chunks[-1:])
  one_step = np.asarray([0.5, 0.75], np.float32)
  t_vel = {r: benchmarking.median_seconds(lambda r=r: backend.denoise(
      x, args.chunks, [True], dataclasses.replace(sc, cfg_scale=1.0 if r == 1 else
                                                  args.cfg_scale), one_step), args.reps)
           for r in (1, 2)}
  full = recompute.RecomputeBackend(model, params, exp)
  for i, text in enumerate(gen.texts):
    full.append_text(text, i + 1)
    full.append_text(np.asarray([exp.seq.bof_id], np.int32), 0)
    full.append_chunk(gen.chunks[i], i)
    full.append_text(np.asarray([exp.seq.eof_id], np.int32), 0)
  t_full = benchmarking.median_seconds(full.logits, args.reps)

  # 4. Batched requests.
  reqs = [request(min(args.chunks, 8), seed=s) for s in range(args.batch)]
  sampler.sample(model, params, exp, reqs, sc)  # compile
  t0 = time.perf_counter()
  sampler.sample(model, params, exp, reqs, sc)
  t_batched = time.perf_counter() - t0
  sampler.sample(model, params, exp, reqs[0], sc)
  t0 = time.perf_counter()
  for r in reqs:
    sampler.sample(model, params, exp, r, sc)
  t_serial = time.perf_counter() - t0

  result = {
      "config": args.config, "device": str(jax.devices()[0].platform), "steps": args.steps,
      "cfg_scale": args.cfg_scale, "tokens_per_chunk": n, "chunks": args.chunks,
      "cache_capacity": backend.capacity, "full_row_len": exp.seq.text_len + 2 * args.chunks * n,
      "latent_rel_error": worst_rel,
      "per_chunk_s": {"cached": t_cached, "recompute": {str(c): t for c, t in t_recomp.items()}},
      "speedup": {str(c): t_recomp[c] / t_cached[c - 1] for c in at},
      "velocity_s": {"cond_only": t_vel[1], "cfg_batched": t_vel[2]},
      "cfg_overhead": t_vel[2] / t_vel[1],
      "full_forward_s": t_full, "full_forward_over_velocity": t_full / t_vel[1],
      "batched": {"requests": args.batch, "chunks": min(args.chunks, 8),
                  "together_s": t_batched, "one_by_one_s": t_serial,
                  "speedup": t_serial / t_batched},
  }
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"sampler_latency_{args.config}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  q = lambda a, p: float(np.percentile(a, p)) * 1e3
  print(f"\n{args.config}: n={n} tokens/chunk, {args.chunks} chunks, {args.steps} steps, "
        f"CFG {args.cfg_scale}; cache {backend.capacity} slots; latent rel. error "
        f"{worst_rel:.2e}")
  print("| chunk | cached (ms) | recompute (ms) | speed-up |\n|---|---|---|---|")
  for c in at:
    print(f"| {c} | {t_cached[c - 1] * 1e3:.1f} | {t_recomp[c] * 1e3:.1f} | "
          f"{result['speedup'][str(c)]:.1f}x |")
  print(f"cached per chunk over all {args.chunks}: median {q(t_cached, 50):.1f} ms, "
        f"p10 {q(t_cached, 10):.1f}, p90 {q(t_cached, 90):.1f}")
  print(f"one ODE step: {t_vel[1] * 1e3:.2f} ms (cond), "
        f"{t_vel[2] * 1e3:.2f} ms (cond+uncond batched): CFG overhead "
        f"{result['cfg_overhead']:.2f}x; full forward of the sequence "
        f"{t_full * 1e3:.1f} ms = {result['full_forward_over_velocity']:.1f}x one step")
  print(f"{args.batch} requests x {min(args.chunks, 8)} chunks: together {t_batched:.2f} s, "
        f"one by one {t_serial:.2f} s (x{result['batched']['speedup']:.2f})")
  print(f"-> {out}")


if __name__ == "__main__":
  main()
