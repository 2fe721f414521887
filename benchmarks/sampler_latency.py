"""Per-chunk sampling latency: the KV-cached sampler vs recomputing the sequence each step.

For each chunk i = 1..N of one generation, the time from its BOF to its EOF: the
`steps` velocity evaluations (cached: the chunk's n tokens against the cache;
recompute: `TV2TV.__call__` on the whole row, `tv2tv_jax.sampling.recompute`)
plus appending the clean chunk. Both run with static shapes (the cache at its
full capacity, the recompute row at the size that holds all N chunks), which is
what a jitted JAX sampler does; compile time is excluded by a warm-up generation.
Every chunk's text is forced (one token) so that both paths do identical work;
the two generations are also checked to agree (same latents, rel. < 1e-4).

Run:

    python benchmarks/sampler_latency.py                      # tiny model, 32 chunks, CPU
    python benchmarks/sampler_latency.py --config small --chunks 16 --steps 8
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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import toy_world  # noqa: E402
from tv2tv_jax import config as config_lib, train_step  # noqa: E402
from tv2tv_jax.model import TV2TV  # noqa: E402
from tv2tv_jax.sampling import recompute, sampler  # noqa: E402
from tv2tv_jax.sampling.decoding import Request, SamplerConfig  # noqa: E402


class TimedBackend:
  """Wraps a backend; records the wall time of every chunk (BOF written .. EOF written)."""

  def __init__(self, inner, bof: int, eof: int):
    self.inner, self.bof, self.eof = inner, bof, eof
    self.start, self.times = None, []

  def append_text(self, tokens, plan):
    toks = [int(t) for t in np.asarray(tokens)]
    if toks == [self.bof]:
      self.start = time.perf_counter()
    self.inner.append_text(tokens, plan)
    if toks == [self.eof]:
      jax.block_until_ready(getattr(self.inner, "cache", None))
      self.times.append(time.perf_counter() - self.start)

  def logits(self):
    return self.inner.logits()

  def velocities(self, x, t, chunk, reps):
    return jax.block_until_ready(self.inner.velocities(x, t, chunk, reps))

  def append_chunk(self, latent, chunk):
    self.inner.append_chunk(latent, chunk)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="tiny")
  ap.add_argument("--chunks", type=int, default=32)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--cfg_scale", type=float, default=2.0)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  exp = config_lib.experiment_from_config_dict(toy_world.get_config(args.config))
  n = exp.model.tokens_per_chunk
  prompt = [5, 6, 7]
  text_len = len(prompt) + 3 * args.chunks + 1  # one forced token + BOF + EOF per chunk, EOS
  exp = dataclasses.replace(exp, seq=dataclasses.replace(exp.seq, text_len=text_len,
                                                         max_chunks=args.chunks))
  model = TV2TV(exp.model)
  params = train_step.create_train_state(model, exp, jax.random.key(0)).params
  # Perturb so that zero-initialised output convs do not make every velocity 0.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  sc = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale)
  req = Request(prompt=prompt, num_chunks=args.chunks, seed=0,
                interventions={i: [10 + i % 50] for i in range(args.chunks)})

  def run(make):
    warm = dataclasses.replace(req, num_chunks=2, interventions={0: [10], 1: [11]})
    sampler.generate(make(), warm, exp, sc)  # compile
    backend = TimedBackend(make(), exp.seq.bof_id, exp.seq.eof_id)
    gen = sampler.generate(backend, req, exp, sc)
    return gen, backend.times

  cached, t_cached = run(lambda: sampler.CachedBackend(model, params, exp))
  oracle, t_recomp = run(lambda: recompute.RecomputeBackend(model, params, exp))
  rel = float(np.max(np.abs(cached.chunks - oracle.chunks)) / np.max(np.abs(oracle.chunks)))
  if not rel < 1e-4:
    raise SystemExit(f"cached and recomputed generations disagree: rel. error {rel:.3g}")
  result = {
      "config": args.config, "device": str(jax.devices()[0].platform), "steps": args.steps,
      "cfg_scale": args.cfg_scale, "tokens_per_chunk": n,
      "row_len_recompute": text_len + 2 * args.chunks * n,
      "cache_capacity": text_len + args.chunks * n,
      "latent_rel_error": rel,
      "per_chunk_s": {"cached": t_cached, "recompute": t_recomp},
      "mean_s": {"cached": float(np.mean(t_cached)), "recompute": float(np.mean(t_recomp))},
  }
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 f"sampler_latency_{args.config}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{args.config}: per-chunk mean cached {result['mean_s']['cached'] * 1e3:.1f} ms, "
        f"recompute {result['mean_s']['recompute'] * 1e3:.1f} ms "
        f"(x{result['mean_s']['recompute'] / result['mean_s']['cached']:.1f}); "
        f"latent rel. error {rel:.2e}; -> {out}")
  for i in (0, len(t_cached) // 2, len(t_cached) - 1):
    print(f"  chunk {i + 1}: cached {t_cached[i] * 1e3:.1f} ms, recompute {t_recomp[i] * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
