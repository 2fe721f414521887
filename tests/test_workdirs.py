"""gs:// work directories (tv2tv_jax.workdirs).

Local paths behave as before, given as a string or as an `epath.Path`; gs:// URIs reach
epath and Orbax as URIs; what cannot use a bucket fails early, naming the flag or field.

No bucket is reachable here. `fake_gcs` (tests/conftest.py) swaps the filesystem epath's fsspec backend uses
for gs:// (gcsfs in real use) for an in-memory one, and answers Orbax's bucket-metadata
query; so these tests show which paths the code builds and that what goes through epath
(config.json, metrics.jsonl, checkpoint directories, VAE files) lands under the URI. They
do not exercise Cloud Storage itself, nor TensorStore's GCS driver (checkpoint arrays) nor
tensorboardX's gs:// writer (both talk to GCS directly).
"""

import json
import os
import types

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import toy_world
from tv2tv_jax import checkpoints, metric_logging, run_state, trainer, workdirs


class _SummaryWriter:
  """Stands in for tensorboardX.SummaryWriter: records its logdir, writes nothing."""
  logdirs = []

  def __init__(self, logdir):
    self.logdirs.append(logdir)

  def add_scalar(self, *args):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def test_as_path_local_and_gs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  local = workdirs.as_path("runs/a")
  assert isinstance(local, epath.Path) and os.fspath(local) == str(tmp_path / "runs" / "a")
  assert workdirs.as_path(epath.Path("runs/a")) == local
  gs = workdirs.as_path("gs://bucket/run")
  assert isinstance(gs, epath.Path) and os.fspath(gs) == "gs://bucket/run"
  assert os.fspath(gs / "checkpoints") == "gs://bucket/run/checkpoints"
  assert workdirs.as_path(gs) == gs and not workdirs.is_local(gs)
  for bad in ("s3://bucket/run", ""):
    with pytest.raises(workdirs.WorkdirError) as err:
      workdirs.as_path(bad, "--workdir")
    assert err.value.field == "--workdir"
  with pytest.raises(workdirs.WorkdirError, match="data.data_dir: gs://b/d is not a local"):
    workdirs.require_local("gs://b/d", "data.data_dir", "the data stages")


def test_missing_cloud_packages_fail_early():
  """Without gcsfs (or TensorFlow) and google-cloud-storage, gs:// fails at once, naming
  the flag and the packages (this environment has neither)."""
  assert workdirs.missing_cloud_packages("/tmp/run") == []
  missing = workdirs.missing_cloud_packages("gs://bucket/run")
  if not missing:
    pytest.skip("the gcs packages are installed here")
  with pytest.raises(workdirs.WorkdirError) as err:
    trainer.check_workdir(toy_world.get_config("tiny"), "gs://bucket/run")
  assert err.value.field == "--workdir"
  assert all(m in str(err.value) for m in missing) and ".[gcs]" in str(err.value)


def _tiny_state(seed):
  params = {"w": jnp.arange(6.0).reshape(2, 3) + seed}
  return types.SimpleNamespace(step=jnp.int32(seed), params=params,
                               opt_state={"mu": jnp.zeros((2, 3)) + 2 * seed})


@pytest.mark.parametrize("as_epath", [False, True], ids=["str", "epath"])
def test_checkpointer_local_str_or_epath(tmp_path, as_epath):
  d = tmp_path / "ckpt"
  ckpt = checkpoints.Checkpointer(epath.Path(d) if as_epath else str(d), async_save=False)
  assert ckpt.directory == epath.Path(d)
  state = _tiny_state(3)
  ckpt.save(3, state, {"index": 7}, {"model": {"d_model": 8}})
  ckpt.wait()
  ckpt.close()
  assert os.listdir(d) == ["3"]
  # Reopened in the other spelling: same directory, same contents.
  again = checkpoints.Checkpointer(str(d) if as_epath else epath.Path(d))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        checkpoints.state_tree(state))
  step, tree, data, config, _ = again.restore(target, log=lambda _: None)
  assert (step, data, config) == (3, {"index": 7}, {"model": {"d_model": 8}})
  np.testing.assert_array_equal(tree["params"]["w"], state.params["w"])
  again.close()
  export = epath.Path(tmp_path / "export") if as_epath else str(tmp_path / "export")
  checkpoints.export_params(state.params, export)
  got = checkpoints.restore_params(export, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params))
  np.testing.assert_array_equal(got["w"], state.params["w"])


@pytest.mark.parametrize("as_epath", [False, True], ids=["str", "epath"])
def test_metric_logger_local_str_or_epath(tmp_path, as_epath):
  wd = epath.Path(tmp_path) if as_epath else str(tmp_path)
  for step in (1, 2):  # a resumed run appends to the same file
    logger = metric_logging.MetricLogger(wd, 2, log=lambda _: None)
    logger.write(step, {"loss": 0.5 / step})
    logger.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_metric_logger_gs(fake_gcs, monkeypatch):
  import tensorboardX
  monkeypatch.setattr(tensorboardX, "SummaryWriter", _SummaryWriter)
  _SummaryWriter.logdirs.clear()
  for steps in ((1, 2), (3,)):  # the second logger continues the object (a resume)
    logger = metric_logging.MetricLogger("gs://bucket/run", 3, log=lambda _: None)
    for s in steps:
      logger.write(s, {"loss": float(s)})
      # Each record is in the bucket as soon as it is written (no buffered upload).
      text = epath.Path("gs://bucket/run/metrics.jsonl").read_text()
      assert json.loads(text.splitlines()[-1])["step"] == s
    logger.close()
  text = fake_gcs.cat("gs://bucket/run/metrics.jsonl").decode()
  assert [json.loads(l)["step"] for l in text.splitlines()] == [1, 2, 3]
  assert _SummaryWriter.logdirs == ["gs://bucket/run/tensorboard"] * 2


def test_trainer_and_evaluate_reach_gs_through_epath(fake_gcs, monkeypatch):
  """trainer.train writes config.json into the bucket and hands Orbax the gs:// checkpoint
  directory (the run is stopped before any array would be written: that part needs
  TensorStore's GCS driver and a real bucket); evaluate reads the config back from there."""
  import tensorboardX
  monkeypatch.setattr(tensorboardX, "SummaryWriter", _SummaryWriter)

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop
  # Right after config.json is written (once the config and data are checked).
  monkeypatch.setattr(trainer.sharding, "init_sharded_state", stop)
  cfg = toy_world.get_config("tiny")
  with pytest.raises(Stop):
    trainer.train(cfg, "gs://bucket/run", log=lambda _: None, devices=jax.devices()[:1])
  written = json.loads(fake_gcs.cat("gs://bucket/run/config.json"))
  assert written == json.loads(cfg.to_json_best_effort())
  assert epath.Path("gs://bucket/run/checkpoints").exists()  # made by Orbax, via epath
  assert not os.path.exists("gs:")  # nothing went to a local "gs:" directory
  # evaluate: config.json from the bucket, then Orbax lists the (empty) gs:// directory.
  with pytest.raises(checkpoints.CheckpointError,
                     match="no checkpoint in gs://bucket/run/checkpoints"):
    run_state.load_params("gs://bucket/run", devices=jax.devices()[:1])


def test_toy_world_data_dir_must_be_local(fake_gcs, tmp_path):
  cfg = toy_world.get_config("quick")
  assert cfg.data.source == "toy_world" and not cfg.data.data_dir
  with pytest.raises(workdirs.WorkdirError) as err:  # its default is <workdir>/toy_world_data
    trainer.check_workdir(cfg, "gs://bucket/run")
  assert err.value.field == "data.data_dir"
  assert "gs://bucket/run/toy_world_data" in str(err.value)
  cfg.data.data_dir = "gs://bucket/data"
  with pytest.raises(workdirs.WorkdirError, match="data.data_dir"):
    trainer.check_workdir(cfg, "gs://bucket/run")
  cfg.data.data_dir = str(tmp_path / "data")  # a local data directory with a gs:// run
  assert os.fspath(trainer.check_workdir(cfg, "gs://bucket/run")) == "gs://bucket/run"


def test_vae_files_through_gs(fake_gcs):
  from tv2tv_jax.vae import model as vm, video_tokenizer as vt
  cfg = vm.VAEConfig(widths=(8, 16), patch_size=4, latent_channels=4, norm_groups=4,
                     kernel_t=3)
  params = vm.init_params(cfg, jax.random.key(0))
  stats = vm.LatentStats(mean=np.arange(4.0, dtype=np.float32),
                         std=np.ones(4, np.float32))
  vt.save("gs://bucket/vae", cfg, params, stats)
  assert sorted(os.path.basename(p) for p in fake_gcs.ls("gs://bucket/vae", detail=False)) == [
      "latent_stats.json", "params.msgpack", "vae_config.json"]
  tok = vt.load_tokenizer(epath.Path("gs://bucket/vae"))
  assert tok.config == cfg
  jax.tree.map(np.testing.assert_array_equal, tok.params, params)
  np.testing.assert_array_equal(tok.stats.mean, stats.mean)
