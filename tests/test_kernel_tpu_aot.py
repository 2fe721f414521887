"""The kernel compiles for TPU (Mosaic) ahead of time on a CPU host with libtpu: fwd and bwd.

Marked `tpu_aot` (not in the default tier): `pytest -m tpu_aot` with the `tpu`
extra installed. Skips when libtpu is absent. The compile runs in a subprocess
with JAX_PLATFORMS=cpu, so that it does not depend on this session's backend and
never touches a TPU runtime; it is `benchmarks/kernel_memory_aot.py --cases test`:
toy shapes (head_dim 32, f32 and bf16) and paper-scale shapes (L = 8192, 24 / 8
heads of head_dim 128, bf16) at several block sizes, and the decode path.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.tpu_aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("toy-f32", "toy-bf16", "paper3b-8k-bf16", "paper3b-8k-bf16-b256")


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
  pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu) to compile for TPU")
  out = tmp_path_factory.mktemp("aot") / "aot.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
  env.pop("XLA_FLAGS", None)  # one host device is enough; the TPU devices are abstract
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_memory_aot.py"),
       "--cases", "test", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads(out.read_text())
  return {**{r["name"]: r for r in results["rows"]}, "decode": results["decode"]}


@pytest.mark.parametrize("name", CASES)
def test_forward_compiles_with_mosaic(aot_results, name):
  r = aot_results[name]["kernel_fwd"]
  assert r["compiled"], r.get("error")
  assert r["mosaic"], "no tpu_custom_call in the compiled HLO"
  assert r["kernels"]["tv2tv_splash_fwd"]


@pytest.mark.parametrize("name", CASES)
def test_backward_compiles_with_mosaic(aot_results, name):
  r = aot_results[name]["kernel_fwd_bwd"]
  assert r["compiled"], r.get("error")
  assert r["mosaic"]
  assert all(r["kernels"].values()), r["kernels"]  # fwd, dq and dk/dv kernels all present


def test_paper_scale_memory_is_far_below_dense_logits(aot_results):
  # The dense f32 logits alone would be 24 * 8192^2 * 4 B = 6 GiB per row; the kernel
  # keeps O(L) residuals (out, lse, metadata, block tables) instead.
  r = aot_results["paper3b-8k-bf16"]
  dense_logits = 24 * 8192 ** 2 * 4
  for mode in ("kernel_fwd", "kernel_fwd_bwd"):
    assert r[mode]["total_bytes"] < dense_logits / 8, (mode, r[mode]["total_bytes"])


def test_decode_path_compiles_with_mosaic(aot_results):
  r = aot_results["decode"]  # 256 queries (one paper-scale chunk) against a 13184-slot cache
  assert r["compiled"] and r["mosaic"] and r["kernels"]["tv2tv_splash_fwd"]
