"""Ahead-of-time TPU compilation of the Pallas kernel and the XLA reference: memory per device.

Compiles, on a CPU host with libtpu (the `tpu` extra), the forward pass and the
forward+backward pass (`jax.value_and_grad` of a weighted sum of the output, in
q, k and v) of `kernel.splash_attention` and of `reference.reference_attention`
at the same shapes on one TPU chip (topology `v5e:1x1` by default), and reads
`compiled.memory_analysis()`: argument, output and temporary bytes per device. The
kernel is lowered through Mosaic, so a successful compile also checks the
kernel's block shapes and in-kernel ops against the TPU compiler.

Run (CPU host, about two minutes):

    pip install -e '.[tpu]'
    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python benchmarks/kernel_memory_aot.py
    # writes benchmarks/results/kernel_memory_aot.json
    ... --cases test --out /some/file.json   # the smaller set tests/test_kernel_tpu_aot.py uses

Also compiles the decode path (`kernel_plan.cached_plan`, one 256-token chunk against
a 13184-slot KV cache). An XLA reference case that does not fit the chip's memory is reported as
'does not compile' with the compiler's message.
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
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tv2tv_jax import masks  # noqa: E402
from tv2tv_jax.attention import kernel, reference  # noqa: E402
from tv2tv_jax.attention.kernel_forward import BlockSizes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KERNEL_NAMES = ("tv2tv_splash_fwd", "tv2tv_splash_dq", "tv2tv_splash_dkv")


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  batch: int
  length: int
  heads: int
  kv_heads: int
  head_dim: int
  dtype: str
  blocks: tuple[int, int, int, int]
  reference: bool = True  # also compile the XLA reference


# Toy: experiments/toy_world.py (8 heads / 4 kv heads of 32, L = 256 + 2*16*16 = 768).
# Paper: Llama-3.2-3B heads (24 / 8 of 128) at L = 8192 and the TV2TV paper row of
# benchmarks/kernel_sparsity.py (L = 13184); Llama-3.1-8B heads (32 / 8).
TEST_CASES = (
    Case("toy-f32", 2, 768, 8, 4, 32, "float32", (128, 128, 128, 128), reference=False),
    Case("toy-bf16", 2, 768, 8, 4, 32, "bfloat16", (256, 128, 128, 256), reference=False),
    Case("paper3b-8k-bf16", 1, 8192, 24, 8, 128, "bfloat16", (512, 256, 512, 256),
         reference=False),
    Case("paper3b-8k-bf16-b256", 1, 8192, 24, 8, 128, "bfloat16", (256, 256, 256, 256),
         reference=False),
)
BENCH_CASES = (
    Case("toy-f32", 8, 768, 8, 4, 32, "float32", (128, 128, 128, 128)),
    Case("toy-bf16", 8, 768, 8, 4, 32, "bfloat16", (128, 128, 128, 128)),
    Case("paper3b-8k-bf16", 1, 8192, 24, 8, 128, "bfloat16", (512, 256, 512, 256)),
    Case("paper3b-13k-bf16", 1, 13184, 24, 8, 128, "bfloat16", (512, 256, 512, 256)),
    Case("paper8b-8k-bf16", 1, 8192, 32, 8, 128, "bfloat16", (512, 256, 512, 256)),
)


def tpu_mesh(topology: str):
  from jax.experimental import topologies
  kind, dims = topology.split(":")
  bounds = tuple(int(d) for d in dims.split("x")) + (1,) * (3 - len(dims.split("x")))
  chip = "megacore" if kind in ("v4", "v5p") else "default"
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name=chip, chips_per_host_bounds=bounds,
                                      num_slices=1, wrap=(False, False, False))
  return jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",)), topo.devices[0].device_kind


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "temp_size_in_bytes", "alias_size_in_bytes",
                                         "generated_code_size_in_bytes")}
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def compile_case(case: Case, mesh) -> dict:
  """Compiles fwd and fwd+bwd for the kernel (and the reference); memory and kernel names."""
  sh = NamedSharding(mesh, P())
  dt = jnp.dtype(case.dtype)
  spec = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sh)
  b, length = case.batch, case.length
  q = spec((b, length, case.heads, case.head_dim), dt)
  kv = spec((b, length, case.kv_heads, case.head_dim), dt)
  meta = masks.SeqMeta(*[spec((b, length), jnp.int32) for _ in range(6)],
                       spec((b, length), jnp.bool_))
  bs = BlockSizes(*case.blocks)
  impls = {"kernel": lambda q, k, v, m: kernel.splash_attention(q, k, v, m, block_sizes=bs,
                                                                interpret=False)}
  if case.reference:
    impls["xla"] = reference.reference_attention
  result = dict(dataclasses.asdict(case))
  for impl, fn in impls.items():
    def loss(q, k, v, m, fn=fn):
      return jnp.sum(fn(q, k, v, m).astype(jnp.float32) * 1e-3)
    for mode, f in (("fwd", fn), ("fwd_bwd", jax.value_and_grad(loss, argnums=(0, 1, 2)))):
      key = f"{impl}_{mode}"
      t0 = time.perf_counter()
      try:
        compiled = jax.jit(f).lower(q, kv, kv, meta).compile()
      except Exception as e:  # noqa: BLE001  (reported, e.g. the reference not fitting HBM)
        result[key] = dict(compiled=False, error=str(e).splitlines()[0][:300])
        continue
      text = compiled.as_text()
      result[key] = dict(compiled=True, seconds=round(time.perf_counter() - t0, 2),
                         kernels={n: text.count(n) > 0 for n in KERNEL_NAMES},
                         mosaic="tpu_custom_call" in text, **_memory(compiled))
  return result


def compile_decode(mesh, queries: int = 256, cache: int = 13184, heads: int = 24,
                   kv_heads: int = 8, head_dim: int = 128, blocks=(256, 512, 256, 512)) -> dict:
  """Compiles the sampler's cached attention: one paper-scale chunk (n = 256) of queries
  against `cache` keys (the KV cache's cache - n slots, then the chunk's own), under the
  forward-only plan `attention.prepare(..., cached=...)` builds (`kernel_plan.cached_plan`)."""
  from tv2tv_jax.attention import kernel
  sh = NamedSharding(mesh, P())
  spec = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sh)
  def meta(length):
    return masks.SeqMeta(*[spec((1, length), jnp.int32) for _ in range(6)],
                         spec((1, length), jnp.bool_))
  q = spec((1, queries, heads, head_dim), jnp.bfloat16)
  kv = spec((1, cache, kv_heads, head_dim), jnp.bfloat16)
  fn = lambda q, k, v, qm, cm: kernel.plan_attention(
      q, k, v, kernel.cached_plan(qm, cm, BlockSizes(*blocks)), interpret=False)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(q, kv, kv, meta(queries), meta(cache - queries)).compile()
  text = compiled.as_text()
  return dict(name=f"decode-{queries}x{cache}", compiled=True,
              seconds=round(time.perf_counter() - t0, 2), mosaic="tpu_custom_call" in text,
              kernels={KERNEL_NAMES[0]: KERNEL_NAMES[0] in text}, **_memory(compiled))


def _mib(x):
  return f"{x / 2**20:10.1f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e:1x1")
  ap.add_argument("--cases", choices=("bench", "test"), default="bench")
  ap.add_argument("--out", default=os.path.join(RESULTS, "kernel_memory_aot.json"))
  args = ap.parse_args()
  mesh, kind = tpu_mesh(args.topology)
  rows = []
  print(f"device: {kind} ({args.topology}); MiB per device = arguments + outputs + temporaries")
  print(f"{'case':22s} {'impl':7s} {'mode':8s} {'total MiB':>10s} {'temp MiB':>10s} "
        f"{'compile s':>9s}")
  for case in (BENCH_CASES if args.cases == "bench" else TEST_CASES):
    r = compile_case(case, mesh)
    rows.append(r)
    for impl in ("kernel", "xla"):
      for mode in ("fwd", "fwd_bwd"):
        m = r.get(f"{impl}_{mode}")
        if m is None:
          continue
        if not m["compiled"]:
          print(f"{case.name:22s} {impl:7s} {mode:8s} does not compile: {m['error'][:80]}")
          continue
        print(f"{case.name:22s} {impl:7s} {mode:8s} {_mib(m['total_bytes'])} "
              f"{_mib(m['temp_size_in_bytes'])} {m['seconds']:9.1f}")
  dec = compile_decode(mesh)
  print(f"{dec['name']:22s} {'kernel':7s} {'fwd':8s} {_mib(dec['total_bytes'])} "
        f"{_mib(dec['temp_size_in_bytes'])} {dec['seconds']:9.1f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(jax_version=jax.__version__, topology=args.topology, device_kind=kind,
                   rows=rows, decode=dec), fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
