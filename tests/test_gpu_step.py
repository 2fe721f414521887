"""benchmarks/gpu_step.py, run here on CPU as it will run on a GPU: every row is produced,
the masked attention paths agree with ours, cuDNN is recorded as unavailable off a GPU."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpu_step  # noqa: E402
from tv2tv_jax import train_step  # noqa: E402
from tv2tv_jax.model import TV2TV  # noqa: E402


@pytest.mark.slow
def test_runs_on_cpu_and_writes_every_row(tmp_path):
  out = tmp_path / "gpu.json"
  gpu_step.main(["--variants=tiny", "--dtype=float32", "--steps=1", "--calls=1",
                 f"--out={out}"])
  got = json.loads(out.read_text())
  assert got["platform"] == "cpu" and got["peak_flops"] > 0
  (step,) = got["steps"]
  assert step["variant"] == "tiny" and step["step_s"] > 0 and 0 < step["mfu"] < 1
  rows = {r["path"]: r for r in got["attention"]}
  assert set(rows) == {"ours", "xla_dense", "cudnn_mask", "cudnn_causal"}
  assert rows["ours"]["seconds"] > 0 and rows["xla_dense"]["seconds"] > 0
  assert rows["xla_dense"]["max_abs_diff_vs_ours"] < 1e-5
  if jax.default_backend() == "cpu":
    assert "unavailable" in rows["cudnn_mask"] and "unavailable" in rows["cudnn_causal"]


def test_dense_and_region_paths_agree_where_blocks_are_skipped():
  exp = gpu_step.experiment("small", "float32")  # 16 noisy copies: regions are used
  paths, args = gpu_step.attention_paths(exp)
  ours = np.asarray(jax.jit(paths["ours"])(*args))
  dense = np.asarray(jax.jit(paths["xla_dense"])(*args))
  # float32 sums over <= 560 keys of O(1) terms, in another order.
  np.testing.assert_allclose(dense, ours, atol=2e-5 * np.abs(ours).max())


def test_the_1b_variant_is_1b_class():
  exp = gpu_step.experiment("1b", "bfloat16")
  state = jax.eval_shape(lambda k: train_step.create_train_state(TV2TV(exp.model), exp, k),
                         jax.random.key(0))
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  assert 1.2e9 < params < 2.0e9
  assert exp.model.d_model == 2048 and exp.model.dtype == "bfloat16"
