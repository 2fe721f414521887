"""Test-session setup: 8 fake CPU devices (for sharding tests) before JAX initialises."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import pytest  # noqa: E402

from experiments import toy_world  # noqa: E402
from tv2tv_jax import config as config_lib  # noqa: E402


@pytest.fixture(scope="session")
def tiny_exp():
  """The frozen Experiment of `experiments/toy_world.py:tiny`."""
  return config_lib.experiment_from_config_dict(toy_world.get_config("tiny"))
