r"""Ahead-of-time compilation of the real sharded train step for named TPU topologies.

Runs on a CPU host with libtpu (the `tpu` extra); nothing is allocated on any TPU:

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m tv2tv_jax.aot \
        --config=experiments/csgo_3b.py:6s --topology=v5p-128 --topology=v5e-256 \
        [--num_slices=2] [--mesh.fsdp=32 --mesh.data=-1] [--config.train.batch_size=64] \
        [--report=aot.json] [--golden_out=shardings.json] [--golden_only]

For each topology it builds the config's mesh on the topology's (compile-only) devices,
lowers `sharding.make_sharded_train_step` on `jax.ShapeDtypeStruct` inputs carrying the
state and batch NamedShardings, compiles, and reports per device: memory (argument /
output / temp / generated code / alias bytes, the peak) against the chip's HBM, XLA FLOPs
against `flops.train_step_flops`, the collectives of the compiled program and the compile
time. `--golden_out` writes the parameter shardings (eval_shape only, no compile).

Topology names (`parse_topology`): the number after the dash counts chips
for v5e / v6e and TensorCores (2 per chip) for v4 / v5p, as in Cloud TPU accelerator types.

FLOP counting: the report gives the model FLOPs of the step (`flops.train_step_flops`, the
MFU count) and the FLOPs the compiled program executes (`flops.executed_step_flops`: remat
recompute, the flash-attention backward's recompute of the scores, attention dense over the
kernel's padded row as the kernels' `pl.CostEstimate`s count it), and compares XLA's
`cost_analysis` with the latter as XLA counts it: a while loop's body once, so with
`model.scan_layers=True` one layer of the stack (`executed_flops_as_counted`). Compile
with `--config.model.scan_layers=False` to count every layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import config as config_lib, flops, sharding, train_step
from tv2tv_jax.attention import kernel_forward

# --- topology names ------------------------------------------------------------------
# Nominal HBM per chip (= per JAX device: v4 / v5p run "megacore", one device per chip)
# from the Cloud TPU system-architecture pages: v4 32 GiB, v5e 16 GB, v5p 95 GB, v6e 32 GB.
# Taken as GiB; the runtime keeps a little for itself, so a peak within a few percent of
# the figure is not a safe fit (the report gives the fraction).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Generation -> (topology-name prefix, chip config, dimensions of the chip grid).
_GENERATIONS = {"v4": ("v4", "megacore", 3), "v5p": ("v5p", "megacore", 3),
                "v5e": ("v5e", "default", 2), "v6e": ("v6e", "default", 2)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # gcloud spells v5e "v5litepod"


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  """One (multi-)slice of TPU chips, as `get_topology_desc` wants it.

  name: the user-facing name (`v5p-128`); chips: chips per slice (= JAX devices per slice);
  dims: the chip grid (x, y[, z]); hbm_bytes: per device."""
  name: str
  generation: str
  chips: int
  dims: tuple[int, ...]
  chips_per_host_bounds: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]
  num_slices: int = 1

  @property
  def topology_name(self) -> str:
    return f"{_GENERATIONS[self.generation][0]}:{'x'.join(map(str, self.dims))}"

  @property
  def hbm_bytes(self) -> int:
    return HBM_GIB[self.generation] * 2**30

  def topology_desc_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of `jax.experimental.topologies.get_topology_desc`."""
    return dict(platform="tpu", topology_name=self.topology_name,
                chip_config_name=_GENERATIONS[self.generation][1],
                chips_per_host_bounds=self.chips_per_host_bounds,
                num_slices=self.num_slices, wrap=self.wrap)


def _grid(chips: int, ndim: int) -> tuple[int, ...]:
  """The Cloud TPU slice shape of a power-of-two chip count: 2-D 4 -> 2x2, 8 -> 2x4, ...,
  256 -> 16x16; 3-D from 2x2x1, doubling the smallest axis (the last of equals): 8 ->
  2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, 128 -> 4x4x8, 256 -> 4x8x8, 512 -> 8x8x8."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips is not a power of two; name the shape explicitly "
                     "(e.g. v5p:4x4x12)")
  if ndim == 2:
    k = chips.bit_length() - 1
    if chips == 2:
      raise ValueError("2-chip slices do not exist for v5e / v6e (1, 4, 8, ..., 256)")
    return (2 ** (k // 2), 2 ** (k - k // 2))
  if chips < 4:
    raise ValueError(f"the smallest 3-D slice has 4 chips (2x2x1), not {chips}")
  dims = [2, 2, 1]
  while np.prod(dims) < chips:
    smallest = min(dims)
    i = max(j for j, d in enumerate(dims) if d == smallest)
    dims[i] *= 2
  return tuple(dims)


def parse_topology(name: str, num_slices: int = 1) -> TopologySpec:
  """A topology name -> TopologySpec.

  Accepts Cloud TPU accelerator types (`v5e-8`, `v5litepod-16`, `v6e-64`: the number is
  chips; `v4-32`, `v5p-128`: the number is TensorCores, 2 per chip, so v5p-128 is 64
  chips, 4x4x4) and explicit shapes (`v5e:2x4`, `v5p:4x4x12`). Hosts hold 4 chips (2x2x1),
  except single-host 8-chip v5e / v6e slices (2x4) and 1-chip ones. Wrap-around links
  (torus): 3-D slices whose sides are all multiples of 4 (full cubes); 2-D sides of 16.
  Raises ValueError naming what is wrong."""
  m = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)*))", name.strip().lower())
  if not m:
    raise ValueError(f"cannot parse topology {name!r}; expected e.g. v5e-8, v5p-128, "
                     "v4-32, v6e-64 or v5p:4x4x8")
  gen = _ALIASES.get(m.group(1), m.group(1))
  if gen not in _GENERATIONS:
    raise ValueError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: "
                     f"{sorted(_GENERATIONS)}")
  ndim = _GENERATIONS[gen][2]
  if m.group(2):
    count = int(m.group(2))
    if ndim == 3 and count % 2:
      raise ValueError(f"{name}: {gen} counts TensorCores (2 per chip); {count} is odd")
    dims = _grid(count // 2 if ndim == 3 else count, ndim)
  else:
    dims = tuple(int(d) for d in m.group(3).split("x"))
    if len(dims) != ndim or min(dims) < 1:
      raise ValueError(f"{name}: {gen} slices have {ndim} positive dimensions")
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  chips = int(np.prod(dims))
  if chips == 1:
    hosts = (1, 1, 1)
  elif ndim == 2 and chips == 8:
    hosts = (2, 4, 1)  # v5litepod-8 / v6e-8: one VM with 8 chips
  else:
    hosts = (2, 2, 1)
  if ndim == 3:
    wrap = (all(d % 4 == 0 for d in dims),) * 3
  else:
    wrap = (dims[0] == 16, dims[1] == 16, False)
  return TopologySpec(name=name.strip(), generation=gen, chips=chips, dims=dims,
                      chips_per_host_bounds=hosts, wrap=wrap, num_slices=num_slices)


# --- compile and report -----------------------------------------------------------
# Collective ops as they appear (opcode followed by "(") in compiled HLO text; the async
# forms are "<op>-start(" (one per collective: "-done" is not counted).
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute")
_COLLECTIVE_RE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def topology_devices(spec: TopologySpec) -> list:
  """Compile-only TPU devices of `spec` (needs libtpu; no TPU is touched)."""
  from jax.experimental import topologies
  # A compile-only use touches no TPU, so several compiling processes (parallel test
  # workers, the kernel AOT benchmark) may share libtpu; without this the second one
  # fails on libtpu's single-process lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return list(topologies.get_topology_desc(**spec.topology_desc_kwargs()).devices)


def topology_mesh(cfg, devices) -> jax.sharding.Mesh:
  """The config's mesh (`mesh` section, -1 fills) on `devices`. `cfg`: a
  `config.RunConfig` (a raw config is parsed).

  Multi-slice devices get a hybrid mesh: the slow data-centre network (DCN) between
  slices carries only the `data` axis (gradient all-reduce once a step), every other axis
  stays inside a slice on the fast inter-chip interconnect."""
  mc = config_lib.as_run_config(cfg).mesh
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices == 1:
    return sharding.make_mesh(mc, devices)
  from jax.experimental import mesh_utils
  shape = sharding.resolve_mesh_shape(mc, len(devices))
  if shape[0] % num_slices:
    raise sharding.ConfigError("mesh.data", f"{shape[0]} does not split over {num_slices} "
                               "slices (the data axis spans the slices)")
  ici = (shape[0] // num_slices, *shape[1:])
  dcn = (num_slices,) + (1,) * (len(shape) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  return jax.sharding.Mesh(grid, sharding.MESH_AXES, axis_types=auto)


def abstract_inputs(model, exp, mesh, shardings) -> tuple[Any, dict, jax.ShapeDtypeStruct]:
  """(state, batch, rng) as ShapeDtypeStructs carrying the step's input shardings.

  state: the TrainState tree (params and Adam moments at `param_dtype`, i32[] step) laid
  out by `shardings`; batch: `train_step.dummy_batch` shapes ([B, L] ints, [B, chunks, h,
  w, c] latents, ...) split over data x fsdp; rng: a replicated typed key. Only
  `jax.eval_shape`: nothing is allocated."""
  attach = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
  abstract = jax.eval_shape(lambda r: nn.unbox(train_step.boxed_train_state(model, exp, r)),
                            jax.random.key(0))
  state = jax.tree.map(attach, abstract, shardings)
  batch = jax.eval_shape(lambda: train_step.dummy_batch(exp))
  batch = {k: attach(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  return state, batch, attach(key, sharding.replicated(mesh))


def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
  """Per-device bytes from `compiled.memory_analysis()` and the verdict against HBM.

  peak_bytes: the larger of XLA's `peak_memory_in_bytes` and the estimate argument + output
  - alias + temp + generated code (the donated state aliases its output). They differ (the
  3B step on v5p-128: 10.8 vs 15.9 GiB, temp being an arena sized for the whole program),
  so the verdict takes the conservative one."""
  m = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "alias_size_in_bytes", "peak_memory_in_bytes")
  out = {k: int(getattr(m, k, 0) or 0) for k in fields}
  estimate = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
              - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
              + out["generated_code_size_in_bytes"])
  out["peak_estimate_bytes"] = estimate
  out["peak_bytes"] = max(out["peak_memory_in_bytes"], estimate)
  out["hbm_bytes"] = hbm_bytes
  out["fits"] = out["peak_bytes"] <= hbm_bytes
  out["hbm_fraction"] = round(out["peak_bytes"] / hbm_bytes, 4)
  return out


def executed_flops_as_counted(exp, batch_size: int, block_sizes=None) -> dict[str, float]:
  """`flops.executed_step_flops` by part, as XLA's cost analysis sees the compiled step.

  XLA counts a while loop's body once, so with `model.scan_layers` the layer stack
  (forward loop, backward loop with the remat recompute) counts as one layer, not
  num_layers; unrolled layers all count. `block_sizes`: the Pallas kernels' for the
  target device (their padding of the row)."""
  layers = 1 if exp.model.scan_layers else exp.model.num_layers
  return flops.executed_step_flops(exp, batch_size, layers=layers, block_sizes=block_sizes)


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Occurrences of each collective in compiled HLO text (a while body counts once)."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] += 1
  return counts


def compile_report(cfg, spec: TopologySpec) -> dict[str, Any]:
  """Compiles the config's sharded train step for `spec`; returns the report (JSON-able)."""
  from tv2tv_jax.model import TV2TV
  devices = topology_devices(spec)
  cfg = config_lib.as_run_config(cfg)  # validates before any compile
  exp = cfg.exp
  mesh = topology_mesh(cfg, devices)
  sharding.check_divisibility(exp, mesh)  # ConfigError naming the field
  rules = cfg.sharding_rules
  model = TV2TV(exp.model)
  shardings = sharding.state_shardings(model, exp, mesh, rules)
  state, batch, key = abstract_inputs(model, exp, mesh, shardings)  # eager work: no mesh
  step = sharding.make_sharded_train_step(model, exp, mesh, rules, shardings)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch, key)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The SPMD-partitioned program is one device's share: scale by the device count.
  xla_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
  xla_total = xla_per_device * mesh.size
  analytic = flops.train_step_flops(exp, exp.train.batch_size)
  # The kernels' blocks on this device kind (the same default as at trace time).
  block_sizes = kernel_forward.default_block_sizes(devices[0].device_kind)
  executed = sum(flops.executed_step_flops(exp, exp.train.batch_size,
                                           block_sizes=block_sizes).values())
  parts = executed_flops_as_counted(exp, exp.train.batch_size, block_sizes)
  as_counted = sum(parts.values())
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  hlo_text = compiled.as_text()
  return dict(
      topology=spec.name, topology_desc=spec.topology_desc_kwargs(),
      generation=spec.generation, device_kind=devices[0].device_kind,
      num_devices=len(devices), mesh=dict(mesh.shape),
      batch_size=exp.train.batch_size, row_len=exp.row_len, params=n_params,
      scan_layers=exp.model.scan_layers, remat=exp.model.remat,
      attention_impl=exp.model.attention_impl,
      memory=memory_report(compiled, spec.hbm_bytes),
      flops=dict(xla_per_device=xla_per_device, xla_total=xla_total,
                 analytic=analytic, executed=executed, executed_as_counted=as_counted,
                 executed_as_counted_parts=parts,
                 ratio_xla_to_analytic=xla_total / analytic,
                 ratio_xla_to_executed_as_counted=xla_total / as_counted),
      collectives=count_collectives(hlo_text),
      # Pallas kernels lowered through Mosaic (0 with attention_impl='pallas' would mean
      # they were compiled in interpret mode: another program, with no cost estimates).
      mosaic_calls=hlo_text.count('custom_call_target="tpu_custom_call"'),
      lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2),
      jax_version=jax.__version__)


def param_shardings(cfg, mesh) -> dict[str, Any]:
  """Golden record of the parameter layout on `mesh` (jax.eval_shape only, no compile).

  Returns {"mesh": {axis: size}, "params": {path: {"spec": PartitionSpec string,
  "shape": global shape, "shard_shape": per-device shape, "dtype": str}}}."""
  from tv2tv_jax.model import TV2TV
  cfg = config_lib.as_run_config(cfg)
  exp = cfg.exp
  model = TV2TV(exp.model)
  shardings = sharding.state_shardings(model, exp, mesh, cfg.sharding_rules)
  abstract = jax.eval_shape(lambda r: nn.unbox(train_step.boxed_train_state(model, exp, r)),
                            jax.random.key(0))
  params = {}
  flat_sh = dict(jax.tree_util.tree_flatten_with_path(shardings.params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
    sh = flat_sh[path]
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    params[name] = dict(spec=str(sh.spec), shape=list(leaf.shape),
                        shard_shape=list(sh.shard_shape(leaf.shape)),
                        dtype=str(jnp.dtype(leaf.dtype)))
  return dict(mesh={k: int(v) for k, v in mesh.shape.items()}, params=params)


def write_golden(path: str, golden: dict[str, Any]) -> None:
  """Writes a golden shardings record: one line per parameter, so diffs read well."""
  head = {k: v for k, v in golden.items() if k != "params"}
  lines = [json.dumps(head, sort_keys=True)[:-1] + ', "params": {']
  items = sorted(golden["params"].items())
  for i, (name, rec) in enumerate(items):
    comma = "," if i + 1 < len(items) else ""
    lines.append(f"  {json.dumps(name)}: {json.dumps(rec, sort_keys=True)}{comma}")
  lines.append("}}")
  with open(path, "w") as fh:
    fh.write("\n".join(lines) + "\n")


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
  """A human-readable summary of one `compile_report`."""
  m, f = r["memory"], r["flops"]
  lines = [
      f"{r['topology']} ({r['topology_desc']['topology_name']}, {r['num_devices']} x "
      f"{r['device_kind']}), mesh {r['mesh']}, batch {r['batch_size']} x {r['row_len']}, "
      f"{r['params'] / 1e6:,.2f}M params",
      f"  per device: peak {_gib(m['peak_bytes'])} of {_gib(m['hbm_bytes'])} HBM "
      f"({100 * m['hbm_fraction']:.1f}%) -> {'fits' if m['fits'] else 'DOES NOT FIT'}; "
      f"arguments {_gib(m['argument_size_in_bytes'])}, outputs "
      f"{_gib(m['output_size_in_bytes'])}, temp {_gib(m['temp_size_in_bytes'])}, alias "
      f"{_gib(m['alias_size_in_bytes'])}, code {m['generated_code_size_in_bytes'] / 2**20:.1f}"
      " MiB",
      f"  FLOPs/step: XLA {f['xla_total']:.4g} ({f['xla_per_device']:.4g} per device); "
      f"model (MFU count) {f['analytic']:.4g} (ratio {f['ratio_xla_to_analytic']:.3f}); "
      f"executed {f['executed']:.4g}, as XLA counts it (scan body once) "
      f"{f['executed_as_counted']:.4g} (ratio {f['ratio_xla_to_executed_as_counted']:.3f})",
      "  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items())
      + f"; Mosaic kernel calls {r['mosaic_calls']}",
      f"  lower {r['lower_seconds']} s, compile {r['compile_seconds']} s",
  ]
  return "\n".join(lines)


def _flags():
  """Flags on a private FlagValues, so importing this module never clashes with main.py."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                  flag_values=fv, lock_config=False)
  flags.DEFINE_multi_string("topology", [], "TPU topology, e.g. v5e-8, v5p-128, v4-32, "
                            "v6e-64, or explicit v5p:4x4x8 (repeat for several).",
                            flag_values=fv)
  flags.DEFINE_integer("num_slices", 1, "Slices of the topology (multi-slice over DCN).",
                       flag_values=fv)
  for axis in sharding.MESH_AXES:
    flags.DEFINE_integer(f"mesh.{axis}", None, f"Override config.mesh.{axis} (-1 fills).",
                         flag_values=fv)
  flags.DEFINE_string("report", None, "Write the reports (a JSON list) here.", flag_values=fv)
  flags.DEFINE_string("golden_out", None, "Write the parameter shardings of the first "
                      "topology's mesh (JSON) here.", flag_values=fv)
  flags.DEFINE_bool("golden_only", False, "Only write --golden_out; no compile.",
                    flag_values=fv)
  return fv


def main(argv: list[str]) -> int:
  fv = _flags()
  fv(argv)
  cfg = fv["config"].value
  if cfg is None or not fv.topology:
    raise SystemExit("usage: python -m tv2tv_jax.aot --config=<file.py>:<variant> "
                     "--topology=<name> [--topology=...]")
  for axis in sharding.MESH_AXES:
    if fv[f"mesh.{axis}"].value is not None:
      cfg.mesh[axis] = fv[f"mesh.{axis}"].value
  cfg = config_lib.run_config_from_config_dict(cfg)  # the ConfigDict stops here
  specs = [parse_topology(t, fv.num_slices) for t in fv.topology]
  if fv.golden_out:
    mesh = topology_mesh(cfg, topology_devices(specs[0]))
    golden = dict(param_shardings(cfg, mesh), topology=specs[0].name,
                  config=fv["config"].config_filename)
    write_golden(fv.golden_out, golden)
    print(f"wrote {fv.golden_out} ({len(golden['params'])} parameters)")
    if fv.golden_only:
      return 0
  reports = []
  for spec in specs:
    print(f"compiling for {spec.name} ...", flush=True)
    r = dict(compile_report(cfg, spec), config=fv["config"].config_filename)
    reports.append(r)
    print(format_report(r), flush=True)
  if fv.report:
    with open(fv.report, "w") as fh:
      json.dump(reports, fh, indent=1)
      fh.write("\n")
    print(f"wrote {fv.report}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
