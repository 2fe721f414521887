"""Ahead-of-time compilation for TPU topologies (tv2tv_jax/aot.py) and the golden shardings.

Two tiers:
  * default (no libtpu): the topology-name parser, the collective counter, the FLOP
    bookkeeping, and the golden files in tests/golden/ against `param_shardings` on an
    AbstractMesh of the topology's mesh shape (partition specs and per-device shard
    shapes depend on the rules and the mesh axis sizes only, not on device kinds).
  * `tpu_aot` (the `tpu` extra, libtpu): the tiny config's real sharded train step compiles
    for a v5e topology with a sane report, and the golden files equal what the code
    produces on the real topology mesh.

UPDATE_GOLDEN=1 regenerates the golden files (either tier) instead of comparing.
"""

import importlib
import json
import math
import os

import pytest
from jax.sharding import AbstractMesh, AxisType

from tv2tv_jax import aot, sharding

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
# (experiment module, variant, topology): tests/golden/shardings_<exp>_<variant>_<topo>.json
GOLDEN_CASES = (("toy_world", "tiny", "v5e-8"), ("csgo_3b", "6s", "v5p-128"),
                ("csgo_3b", "6s", "v5e-256"))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def golden_path(exp_name, variant, topo):
  return os.path.join(GOLDEN_DIR, f"shardings_{exp_name}_{variant}_{topo}.json")


def load_config(exp_name, variant):
  return importlib.import_module(f"experiments.{exp_name}").get_config(variant)


def check_or_update(path, produced):
  if UPDATE:
    aot.write_golden(path, produced)
    pytest.skip(f"UPDATE_GOLDEN=1: rewrote {os.path.basename(path)}")
  with open(path) as fh:
    golden = json.load(fh)
  assert golden["mesh"] == produced["mesh"]
  assert sorted(golden["params"]) == sorted(produced["params"]), "parameter paths changed"
  changed = {k: (golden["params"][k], v) for k, v in produced["params"].items()
             if golden["params"][k] != v}
  assert not changed, f"shardings differ from {path} (UPDATE_GOLDEN=1 to accept): {changed}"


# --- default tier: no libtpu ----------------------------------------------------------

@pytest.mark.parametrize("name,topology_name,chips,hosts,wrap", [
    ("v5e-8", "v5e:2x4", 8, (2, 4, 1), (False, False, False)),
    ("v5e-256", "v5e:16x16", 256, (2, 2, 1), (True, True, False)),
    ("v5litepod-16", "v5e:4x4", 16, (2, 2, 1), (False, False, False)),
    ("v5p-8", "v5p:2x2x1", 4, (2, 2, 1), (False, False, False)),
    ("v5p-128", "v5p:4x4x4", 64, (2, 2, 1), (True, True, True)),
    ("v5p-512", "v5p:4x8x8", 256, (2, 2, 1), (True, True, True)),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1), (False, False, False)),
    ("v4-64", "v4:2x4x4", 32, (2, 2, 1), (False, False, False)),
    ("v6e-64", "v6e:8x8", 64, (2, 2, 1), (False, False, False)),
    ("v6e-1", "v6e:1x1", 1, (1, 1, 1), (False, False, False)),
    ("v5p:4x4x12", "v5p:4x4x12", 192, (2, 2, 1), (True, True, True)),
])
def test_topology_names(name, topology_name, chips, hosts, wrap):
  spec = aot.parse_topology(name)
  kw = spec.topology_desc_kwargs()
  assert (kw["topology_name"], spec.chips, kw["chips_per_host_bounds"], kw["wrap"]) == (
      topology_name, chips, hosts, wrap)
  assert kw["chip_config_name"] == ("megacore" if spec.generation in ("v4", "v5p")
                                    else "default")
  assert kw["platform"] == "tpu" and kw["num_slices"] == 1


def test_topology_slices_and_hbm():
  spec = aot.parse_topology("v5e-16", num_slices=4)
  assert spec.topology_desc_kwargs()["num_slices"] == 4
  assert spec.hbm_bytes == 16 * 2**30
  assert aot.parse_topology("v5p-128").hbm_bytes == 95 * 2**30


@pytest.mark.parametrize("name,message", [
    ("v3-8", "unknown TPU generation"), ("v5p-7", "odd"), ("v5e-12", "power of two"),
    ("v5e-2", "2-chip"), ("tpu", "cannot parse"), ("v5p:4x4", "3 positive dimensions")])
def test_bad_topology_names(name, message):
  with pytest.raises(ValueError, match=message):
    aot.parse_topology(name)


def test_count_collectives():
  hlo = """
  %all-gather.1 = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}
  %ag-start = (f32[1], f32[8]) all-gather-start(f32[1] %q), dimensions={0}
  %ag-done = f32[8] all-gather-done((f32[1], f32[8]) %ag-start)
  %all-reduce.2 = f32[] all-reduce(f32[] %x), to_apply=%add
  %reduce-scatter.3 = f32[1]{0} reduce-scatter(f32[8]{0} %y), dimensions={0}
  %cp = f32[4] collective-permute-start(f32[4] %z), source_target_pairs={{0,1}}
  %fusion.all-reduce = f32[] fusion(f32[] %w), kind=kLoop
  """
  assert aot.count_collectives(hlo) == {"all-gather": 2, "reduce-scatter": 1,
                                        "all-reduce": 1, "all-to-all": 0,
                                        "collective-permute": 1}


def test_flops_as_counted(tiny_exp):
  import dataclasses
  from tv2tv_jax import flops
  full = flops.train_step_flops(tiny_exp, 8)
  unrolled = dataclasses.replace(tiny_exp, model=dataclasses.replace(
      tiny_exp.model, scan_layers=False, remat=False))
  assert aot.analytic_flops_as_counted(unrolled, 8) == pytest.approx(full)
  f = flops.forward_flops(tiny_exp, 8)
  layers, n = f["towers"] + f["attention"], tiny_exp.model.num_layers
  scanned = dataclasses.replace(tiny_exp, model=dataclasses.replace(
      tiny_exp.model, scan_layers=True, remat=True))
  # The body once: fwd + bwd + remat recompute of one layer instead of 3x of all layers.
  assert aot.analytic_flops_as_counted(scanned, 8) == pytest.approx(
      full - 3 * layers + 4 * layers / n)


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=["_".join(c) for c in GOLDEN_CASES])
def test_golden_shardings_on_abstract_mesh(case):
  exp_name, variant, topo = case
  cfg = load_config(exp_name, variant)
  spec = aot.parse_topology(topo)
  shape = sharding.resolve_mesh_shape(sharding.mesh_config(cfg.get("mesh")), spec.chips)
  mesh = AbstractMesh(shape, sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES))
  produced = dict(aot.param_shardings(cfg, mesh), topology=topo,
                  config=f"experiments/{exp_name}.py:{variant}")
  check_or_update(golden_path(*case), produced)


def test_golden_files_are_sharded_where_expected():
  # Guards the goldens themselves: FSDP splits the 3B towers' width 64 ways on v5p-128.
  with open(golden_path("csgo_3b", "6s", "v5p-128")) as fh:
    params = json.load(fh)["params"]
  size = lambda v: math.prod(v["shape"])
  sharded = sum(size(v) for v in params.values() if "fsdp" in v["spec"])
  assert sharded > 0.99 * sum(size(v) for v in params.values())  # all but the small U-Nets
  assert params["lm_head/kernel"]["shard_shape"] == [3072 // 64, 128256]
  for v in params.values():
    for full, part, in zip(v["shape"], v["shard_shape"]):
      assert full % part == 0


# --- tpu_aot tier: compiles for TPU with libtpu ----------------------------------------

@pytest.fixture(scope="module")
def libtpu():
  pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu) to compile for TPU")


@pytest.fixture(scope="module")
def tiny_reports(libtpu):
  """Two compiles of toy_world:tiny for v5e-8: the config's data-parallel mesh with scanned
  layers, and an FSDP mesh with unrolled layers (XLA then counts every layer)."""
  scanned = load_config("toy_world", "tiny")
  unrolled = load_config("toy_world", "tiny")
  unrolled.mesh.update(data=1, fsdp=-1)
  unrolled.model.scan_layers = False
  spec = aot.parse_topology("v5e-8")
  return aot.compile_report(scanned, spec), aot.compile_report(unrolled, spec)


@pytest.mark.tpu_aot
def test_tiny_compiles_for_v5e(tiny_reports):
  for r in tiny_reports:
    assert r["num_devices"] == 8 and r["device_kind"].startswith("TPU v5")
    m = r["memory"]
    assert m["fits"] and 0 < m["peak_bytes"] < m["hbm_bytes"]
    assert 0 < m["argument_size_in_bytes"] <= m["peak_bytes"]
    assert m["generated_code_size_in_bytes"] > 0
    assert m["alias_size_in_bytes"] > 0  # the donated state aliases the new state
    assert r["compile_seconds"] > 0
    assert sum(r["collectives"].values()) > 0  # 8 devices: gradients are reduced
    assert r["flops"]["xla_total"] > 0
  scanned, unrolled = tiny_reports
  assert scanned["collectives"]["all-reduce"] > 0  # data parallel: gradient all-reduce
  assert unrolled["collectives"]["all-gather"] > 0  # FSDP: params gathered per layer


@pytest.mark.tpu_aot
def test_tiny_flops_match_analytic_when_unrolled(tiny_reports):
  _, unrolled = tiny_reports
  assert unrolled["flops"]["ratio_xla_to_analytic"] == pytest.approx(1.0, rel=0.10)


@pytest.mark.tpu_aot
def test_scanned_flops_count_the_body_once(tiny_reports):
  scanned, unrolled = tiny_reports
  # XLA's count of the scanned program is below the unrolled one (the while body is
  # counted once) and close to the analytic count of what it sees.
  assert scanned["flops"]["xla_total"] < unrolled["flops"]["xla_total"]
  assert scanned["flops"]["ratio_xla_to_analytic_as_counted"] == pytest.approx(1.0, rel=0.2)


@pytest.mark.tpu_aot
@pytest.mark.parametrize("case", GOLDEN_CASES, ids=["_".join(c) for c in GOLDEN_CASES])
def test_golden_shardings_on_topology(libtpu, case):
  exp_name, variant, topo = case
  cfg = load_config(exp_name, variant)
  mesh = aot.topology_mesh(cfg, aot.topology_devices(aot.parse_topology(topo)))
  produced = dict(aot.param_shardings(cfg, mesh), topology=topo,
                  config=f"experiments/{exp_name}.py:{variant}")
  check_or_update(golden_path(*case), produced)
