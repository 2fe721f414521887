r"""Encode and decode throughput of the pretrained tokenizers (Cosmos CV4x8x8, Wan 2.1) on
CPU, and their compiled memory on one TPU v5e chip (ahead of time, no TPU touched).

    python -m benchmarks.pretrained_vae_throughput [--kinds=cosmos,wan] [--sizes=64x64,128x240] \
        [--frames=17] [--batch=1] [--repeats=3] \
        [--aot [--aot_dtypes=float32,bfloat16] [--aot_tiles=none,4]] \
        [--out=benchmarks/results/pretrained_vae_throughput.json]

Random weights at the published widths (`cosmos.CV4x8x8`, 105M parameters; `wan.WAN_2_1`,
127M): throughput does not depend on the values. The kinds run one after the other in the
same process, each size encode then decode. Frame sizes: the toy world's 64x64 and CS:GO's 128x240 (the
`r128` builder config of data_pipelines/csgo_tfds.py, which the paper-scale config
experiments/csgo_3b.py trains on). Clips of `frames` frames (1 + 4k); compile time is
excluded (one warm-up call) and the median of `repeats` timed calls is reported, with
os.getloadavg() before and after (the machine may be shared: read the numbers with it).

--aot (needs the `tpu` extra, libtpu): compiles `encode` of one 6 s CS:GO clip
(1 + 4*24 = 97 frames of 128x240 -> 25 latents) for a v5e-1 topology, whole-clip and in
tiles of 4 latent frames, float32 and bfloat16 activations, and reports
`memory_analysis()` per chip (`tv2tv_jax.aot.memory_report`).
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
import jax.numpy as jnp
import numpy as np

from tv2tv_jax.vae import cosmos, pretrained, wan

# kind -> its config at the published widths.
PUBLISHED = {"cosmos": cosmos.CV4x8x8, "wan": wan.WAN_2_1}


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median of `repeats` later calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def measure(kind: str, cfg, params, size: tuple[int, int], frames: int, batch: int,
            repeats: int) -> dict:
  """Encode and decode wall times of one batch of clips f32[batch, frames, H, W, 3] by the
  `kind` tokenizer (config `cfg`)."""
  tok = pretrained.PretrainedTokenizer(kind, cfg, params)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, frames, *size, 3)),
                  jnp.float32)
  enc_first, enc = _median_time(lambda: tok.encode(x), repeats)
  z = tok.encode(x)
  dec_first, dec = _median_time(lambda: tok.decode(z), repeats)
  n = batch * frames
  return {"kind": kind, "height": size[0], "width": size[1], "batch": batch,
          "frames_per_clip": frames,
          "latent_shape": list(z.shape[1:]),
          "encode_s": enc, "encode_frames_per_s": n / enc, "encode_compile_s": enc_first - enc,
          "decode_s": dec, "decode_frames_per_s": n / dec, "decode_compile_s": dec_first - dec}


def random_params(kind: str, cfg, seed: int = 0):
  """Params of the init's shapes (`jax.eval_shape`), drawn in NumPy at the init's scale:
  compiling the jitted init of the full-width tree costs minutes on a loaded CPU, and
  throughput does not depend on the values."""
  shapes = jax.eval_shape(lambda: pretrained.init_params(kind, cfg))
  rng = np.random.default_rng(seed)
  def draw(path, s):
    if path[-1].key == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))
    return jnp.full(s.shape, 1.0 if path[-1].key in ("scale", "gamma") else 0.0, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def aot_memory(kind: str, frames: int = 97, size: tuple[int, int] = (128, 240),
               dtypes: tuple[str, ...] = ("float32", "bfloat16"),
               tiles: tuple[int | None, ...] = (None, 4)) -> list[dict]:
  """Per-chip compiled memory of encoding one clip on a v5e-1 topology."""
  from tv2tv_jax import aot  # needs libtpu only here
  spec = aot.parse_topology("v5e-1")
  devices = aot.topology_devices(spec)
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  encode = {"cosmos": cosmos.encode, "wan": wan.encode}[kind]
  rows = []
  for dtype in dtypes:
    cfg = dataclasses.replace(PUBLISHED[kind], dtype=dtype)
    shapes = jax.eval_shape(lambda: pretrained.init_params(kind, cfg))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          shapes)
    x = jax.ShapeDtypeStruct((1, frames, *size, 3), jnp.float32, sharding=replicated)
    for tile in tiles:
      t0 = time.perf_counter()
      compiled = encode.lower(params, x, cfg=cfg, tile_latents=tile).compile()
      report = aot.memory_report(compiled, spec.hbm_bytes)
      report.update(kind=kind, dtype=dtype, tile_latents=tile, frames=frames, height=size[0],
                    width=size[1], topology=spec.name,
                    compile_s=round(time.perf_counter() - t0, 1))
      rows.append(report)
      print(f"  {kind} v5e-1 encode {frames}x{size[0]}x{size[1]} {dtype:8s} tiles {tile}: peak "
            f"{report['peak_bytes'] / 2**30:.2f} GiB of {spec.hbm_bytes / 2**30:.0f} "
            f"(temp {report['temp_size_in_bytes'] / 2**30:.2f} GiB)", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kinds", default="cosmos,wan")
  parser.add_argument("--sizes", default="64x64,128x240")
  parser.add_argument("--frames", type=int, default=17)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--aot", action="store_true")
  parser.add_argument("--aot_dtypes", default="float32,bfloat16")
  parser.add_argument("--aot_tiles", default="none,4", help="tile_latents values; none = whole clip")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                    "pretrained_vae_throughput.json"))
  args = parser.parse_args()
  kinds = [k for k in args.kinds.split(",") if k]
  result = {"backend": jax.default_backend(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "loadavg_before": os.getloadavg(), "parameters": {}, "rows": [], "aot_v5e": []}
  print(f"{'kind':>6} {'frames':>7} {'size':>8} {'batch':>5} {'encode s':>9} {'enc fr/s':>9} "
        f"{'decode s':>9} {'dec fr/s':>9}", flush=True)
  for kind in kinds:
    cfg = PUBLISHED[kind]
    params = random_params(kind, cfg)
    result["parameters"][kind] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    for size_text in filter(None, args.sizes.split(",")):
      size = tuple(int(v) for v in size_text.split("x"))
      row = measure(kind, cfg, params, size, args.frames, args.batch, args.repeats)
      result["rows"].append(row)
      print(f"{kind:>6} {args.frames:>7} {size_text:>8} {args.batch:>5} {row['encode_s']:>9.2f} "
            f"{row['encode_frames_per_s']:>9.1f} {row['decode_s']:>9.2f} "
            f"{row['decode_frames_per_s']:>9.1f}", flush=True)
  result["loadavg_after"] = os.getloadavg()
  if args.aot:
    tiles = tuple(None if t == "none" else int(t) for t in args.aot_tiles.split(","))
    for kind in kinds:
      result["aot_v5e"] += aot_memory(kind, dtypes=tuple(args.aot_dtypes.split(",")),
                                      tiles=tiles)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
