r"""This codebase's train step against transfusion-pytorch's at matched shapes, on this CPU.

    pip install -e ".[benchmark]"     # torch 2.13.0 (CPU) and transfusion-pytorch 0.20.0
    python benchmarks/peer_comparison.py [--repeats=3] [--steps=5] [--no-compile_peer] \
        [--no-scan_layers]

transfusion-pytorch (lucidrains, 0.20.0) is the public codebase that trains one transformer
on autoregressive text and flow-matched latents. Both train steps run at the peer's shapes:
width 256, depth 4, 4 heads of 64, an FFN of 682 (the peer's GEGLU at expansion 4; our
SwiGLU of the same width), 512 text ids, batch 8, and per example 16 chunks of 16 latent
tokens with 8 channels, each after 4 text tokens. Ours is the TV2TV row of those examples
(96 text slots: 4 text tokens, BOF and EOF per chunk; 16 noisy and 16 clean chunk copies;
U-Net channels 32 around latents of (8, 8, 8) patched by 2 into the same 16 tokens).

Each side runs in a fresh process per repeat (the order alternates, so drift falls on both):
it times `--steps` optimizer steps after warm-up (median) and, in the same process, its own
framework's float32 2048^3 matmul (best of 10). Reported per side: step time, examples/s,
tokens/s (the tokens each model computes per example), model FLOP/s and their ratio to the
paired matmul (the utilisation that can be compared across frameworks on one host).

FLOPs per step: ours is `flops.train_step_flops` (analytic: matmuls, attention, U-Net
convolutions; forward x3). The peer's is counted by `torch.utils.flop_counter.FlopCounterMode`
on one eager forward + backward (every matmul, convolution and attention the autograd graph
runs, which includes its per-token adaLN projections). Both count multiply-adds as 2 FLOPs.
Writes benchmarks/results/peer_comparison.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# The shapes both sides run at.
WIDTH, DEPTH, HEADS, HEAD_DIM, FFN, VOCAB = 256, 4, 4, 64, 682, 512
BATCH, CHUNKS, CHUNK_TOKENS, LATENT_CHANNELS, TEXT_PER_CHUNK = 8, 16, 16, 8, 4
MATMUL_N = 2048


def _timed(fn, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


# ------------------------------------------------------------------------------ ours


def ours_experiment(scan_layers: bool = True):
  from tv2tv_jax import config as config_lib
  text_slots = CHUNKS * (TEXT_PER_CHUNK + 2)  # text, BOF, EOF per chunk
  return config_lib.experiment_from_config_dict({
      "model": dict(vocab_size=VOCAB, d_model=WIDTH, num_layers=DEPTH, num_heads=HEADS,
                    num_kv_heads=HEADS, head_dim=HEAD_DIM, mlp_dim=FFN,
                    latent_shape=(8, 8, LATENT_CHANNELS), patch_size=2, unet_channels=32,
                    scan_layers=scan_layers),
      "seq": dict(text_len=text_slots, max_chunks=CHUNKS, noisy_chunks=CHUNKS),
      "train": dict(batch_size=BATCH),
  })


def run_ours(steps: int, scan_layers: bool = True) -> dict:
  import jax
  import jax.numpy as jnp
  from tv2tv_jax import benchmarking, flops
  exp = ours_experiment(scan_layers)
  t = benchmarking.time_train_step(exp, steps)
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  mm = min(_timed(lambda: dot(a, a).block_until_ready(), 10))
  return dict(step_s=t["step_s"], flops_per_step=flops.train_step_flops(exp, BATCH),
              matmul_flops_per_s=2 * MATMUL_N ** 3 / mm, params=t["params"],
              tokens_per_example=exp.row_len, compile_s=t["compile_and_first_step_s"])


# ------------------------------------------------------------------------------ peer


def peer_model(compile_transformer: bool):
  import torch
  from transfusion_pytorch import Transfusion
  torch.manual_seed(0)
  model = Transfusion(num_text_tokens=VOCAB, dim_latent=LATENT_CHANNELS,
                      modality_default_shape=(CHUNK_TOKENS,),
                      transformer=dict(dim=WIDTH, depth=DEPTH, heads=HEADS, dim_head=HEAD_DIM))
  if compile_transformer:
    model.transformer.compile()
  return model


def peer_batch():
  import torch
  g = torch.Generator().manual_seed(0)
  rows = []
  for _ in range(BATCH):
    row = []
    for _ in range(CHUNKS):
      row.append(torch.randint(0, VOCAB, (TEXT_PER_CHUNK,), generator=g))
      row.append(torch.randn(CHUNK_TOKENS, LATENT_CHANNELS, generator=g))
    rows.append(row)
  return rows


def run_peer(steps: int, compile_transformer: bool) -> dict:
  import torch
  from torch.utils.flop_counter import FlopCounterMode
  batch = peer_batch()
  counter = FlopCounterMode(display=False)
  with counter:  # one eager forward + backward, counted
    eager = peer_model(False)
    eager(batch).backward()
  counted = counter.get_total_flops()
  model = peer_model(compile_transformer)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def step():
    opt.zero_grad(set_to_none=True)
    model(batch).backward()
    opt.step()

  for _ in range(2):  # compile, then one more warm-up
    step()
  times = _timed(step, steps)
  a = torch.randn(MATMUL_N, MATMUL_N)
  torch.mm(a, a)
  mm = min(_timed(lambda: torch.mm(a, a), 10))
  return dict(step_s=statistics.median(times), flops_per_step=float(counted),
              matmul_flops_per_s=2 * MATMUL_N ** 3 / mm,
              params=sum(p.numel() for p in model.parameters()),
              tokens_per_example=CHUNKS * (TEXT_PER_CHUNK + CHUNK_TOKENS),
              torch_threads=torch.get_num_threads())


# ------------------------------------------------------------------------------ driver


def _row(side: str, runs: list[dict]) -> dict:
  med = lambda k: statistics.median(r[k] for r in runs)
  step = med("step_s")
  util = [r["flops_per_step"] / r["step_s"] / r["matmul_flops_per_s"] for r in runs]
  return dict(side=side, step_s=step, step_s_rounds=[r["step_s"] for r in runs],
              examples_per_s=BATCH / step,
              tokens_per_s=BATCH * runs[0]["tokens_per_example"] / step,
              tokens_per_example=runs[0]["tokens_per_example"],
              gflop_per_step=runs[0]["flops_per_step"] / 1e9,
              model_gflop_per_s=runs[0]["flops_per_step"] / step / 1e9,
              matmul_gflop_per_s=med("matmul_flops_per_s") / 1e9,
              utilisation=statistics.median(util), utilisation_rounds=util,
              params=runs[0]["params"])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--compile_peer", action=argparse.BooleanOptionalAction, default=True,
                  help="model.transformer.compile() (torch inductor) for the peer")
  # Unrolled layers are ~10% faster on XLA:CPU (no stacked scan residuals; docs/benchmarks.md);
  # the TPU configs keep the scan, so it stays the default here.
  ap.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True,
                  help="our layers under nn.scan (default) or unrolled")
  ap.add_argument("--out", default=os.path.join(RESULTS, "peer_comparison.json"))
  ap.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
  ap.add_argument("--side_out", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.side:  # one measurement, in this (fresh) process
    got = (run_ours(args.steps, args.scan_layers) if args.side == "ours"
           else run_peer(args.steps, args.compile_peer))
    with open(args.side_out, "w") as f:
      json.dump(got, f)
    return
  runs: dict[str, list[dict]] = {"ours": [], "peer": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      for side in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
        out = os.path.join(tmp, f"{side}_{r}.json")
        cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}",
               f"--side_out={out}", f"--steps={args.steps}",
               "--compile_peer" if args.compile_peer else "--no-compile_peer",
               "--scan_layers" if args.scan_layers else "--no-scan_layers"]
        t = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        with open(out) as f:
          runs[side].append(json.load(f))
        print(f"repeat {r + 1}/{args.repeats} {side}: step {runs[side][-1]['step_s']:.3f} s "
              f"({time.time() - t:.0f} s)", flush=True)
  rows = [_row(side, runs[side]) for side in ("ours", "peer")]
  ours, peer = rows
  ratio = dict(peer_over_ours_utilisation=peer["utilisation"] / ours["utilisation"],
               peer_over_ours_examples_per_s=peer["examples_per_s"] / ours["examples_per_s"])
  print(f"\n{'side':<6} {'step s':>8} {'ex/s':>7} {'tok/s':>8} {'GFLOP/step':>11} "
        f"{'GFLOP/s':>8} {'matmul GFLOP/s':>15} {'util':>6}")
  for r in rows:
    print(f"{r['side']:<6} {r['step_s']:8.3f} {r['examples_per_s']:7.2f} "
          f"{r['tokens_per_s']:8.0f} {r['gflop_per_step']:11.1f} {r['model_gflop_per_s']:8.1f} "
          f"{r['matmul_gflop_per_s']:15.1f} {r['utilisation']:6.3f}")
  print(f"peer / ours: utilisation {ratio['peer_over_ours_utilisation']:.2f}, examples/s "
        f"{ratio['peer_over_ours_examples_per_s']:.2f}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(repeats=args.repeats, steps=args.steps, compile_peer=args.compile_peer,
                   scan_layers=args.scan_layers,
                   rows=rows, **ratio), f, indent=1)
  print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
  main()
