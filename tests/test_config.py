"""Configs: every variant builds; configs that cannot work fail naming the field."""

import os
import subprocess
import sys

import pytest

from experiments import toy_world
from tv2tv_jax import config as config_lib, sequence, sharding


@pytest.mark.parametrize("variant", ["tiny", "quick", "small", "default", "tiny,t2v",
                                     "quick,think2v"])
def test_variants_build(variant):
  exp = config_lib.experiment_from_config_dict(toy_world.get_config(variant))
  s, n = exp.seq, exp.model.tokens_per_chunk
  assert exp.row_len == s.text_len + (s.num_noisy + s.max_chunks) * n
  assert exp.row_len == len(sequence.empty_row(s, exp.model)["segment_ids"])
  if "," in variant:
    assert exp.seq.layout == variant.split(",")[1]


def test_unknown_variant():
  with pytest.raises(ValueError, match="unknown config variant 'huge'"):
    toy_world.get_config("huge")


@pytest.mark.parametrize("section,overrides,field", [
    ("model", dict(d_model=100, num_heads=8), "model.num_heads"),
    ("model", dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads"),
    ("model", dict(latent_shape=(6, 6, 4), patch_size=4), "model.latent_shape"),
    ("model", dict(head_dim=15), "model.head_dim"),
    ("model", dict(attention_impl="flash"), "model.attention_impl"),
    ("model", dict(unet_channels=16, unet_groups=5), "model.unet_groups"),
    ("seq", dict(text_len=2), "seq.text_len"),
    ("seq", dict(max_chunks=0), "seq.max_chunks"),
    ("seq", dict(max_chunks=4, noisy_chunks=5), "seq.noisy_chunks"),
    ("seq", dict(bof_id=100000), "seq.bof_id"),
    ("seq", dict(eof_id=1), "seq.bof_id"),
    ("seq", dict(layout="interleaved"), "seq.layout"),
    ("flow", dict(cfg_drop_prob=1.5), "flow.cfg_drop_prob"),
    ("optim", dict(warmup_steps=500, total_steps=100), "optim.warmup_steps"),
    ("train", dict(batch_size=0), "train.batch_size"),
    ("train", dict(num_steps=-5), "train.num_steps"),
    ("train", dict(seed=-1), "train.seed"),
    ("train", dict(eval_batches=0), "train.eval_batches"),
    ("optim", dict(total_steps=-5, warmup_steps=0), "optim.total_steps"),
    ("model", dict(unet_blocks=-1), "model.unet_blocks"),
    ("data", dict(max_examples_per_row=0), "data.max_examples_per_row"),
    ("data", dict(max_text_len=-1), "data.max_text_len"),
    ("data", dict(synthetic_batches=-1), "data.synthetic_batches"),
    ("data", dict(plan_drop_rate=1.5), "data.plan_drop_rate"),
    ("data", dict(source="tfrecord"), "data.source"),
    ("data", dict(source="toy_world", vae=dict(trian=dict(num_steps=5))), "data.vae.trian"),
    ("data", dict(source="toy_world", vae=dict(train=dict(num_step=5))),
     "data.vae.train.num_step"),
])
def test_bad_config_names_field(section, overrides, field):
  cfg = toy_world.get_config("tiny")
  cfg[section].update(overrides)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.experiment_from_config_dict(cfg)
  assert err.value.field == field
  assert str(err.value).startswith(f"config field '{field}'")


def test_unknown_field_is_named():
  cfg = toy_world.get_config("tiny").to_dict()
  cfg["model"]["num_layer"] = 3
  with pytest.raises(config_lib.ConfigError, match="'model.num_layer'"):
    config_lib.experiment_from_config_dict(cfg)


def test_zero_steps_is_a_valid_run():
  # The trainer runs steps [start, num_steps): 0 builds and compiles, trains nothing.
  cfg = toy_world.get_config("tiny")
  cfg.train.num_steps = 0
  assert config_lib.experiment_from_config_dict(cfg).train.num_steps == 0


def test_float_count_is_refused():
  # A plain dict (e.g. a saved config.json) has no ConfigDict type check; range() would
  # fail on the float far from the field.
  cfg = toy_world.get_config("tiny").to_dict()
  cfg["train"]["num_steps"] = 2.5
  with pytest.raises(config_lib.ConfigError, match="must be an integer") as err:
    config_lib.experiment_from_config_dict(cfg)
  assert err.value.field == "train.num_steps"


def test_unknown_field_suggests_the_closest():
  cfg = toy_world.get_config("tiny")
  cfg.train.update(dict(num_stepz=5))
  with pytest.raises(config_lib.ConfigError, match="did you mean 'num_steps'") as err:
    config_lib.experiment_from_config_dict(cfg)
  assert err.value.field == "train.num_stepz"


@pytest.mark.parametrize("axes,devices,field,words", [
    # -1 takes what the others leave: the axis asking for too many is at fault.
    (dict(data=-1, fsdp=2), 1, "mesh.fsdp", ["fsdp=2", "1 available device", "data=-1"]),
    (dict(data=-1, fsdp=2, tensor=2), 2, "mesh.tensor",
     ["fsdp=2 x tensor=2 = 4", "2 available devices"]),
    (dict(data=1, fsdp=2), 1, "mesh.fsdp", ["needs 2 devices", "1 available device"]),
    (dict(data=1), 8, "mesh.data", ["uses 1 of the 8 available devices", "-1"]),
])
def test_mesh_that_does_not_fit_names_the_axis_at_fault(axes, devices, field, words):
  with pytest.raises(config_lib.ConfigError) as err:
    sharding.resolve_mesh_shape(sharding.mesh_config(axes), devices)
  assert err.value.field == field
  for w in words:
    assert w in str(err.value)


def test_unknown_mesh_axis_in_a_sharding_rule_lists_the_axes():
  cfg = toy_world.get_config("tiny")
  cfg.sharding_rules = [["q_heads", "expert"]]
  with pytest.raises(config_lib.ConfigError, match="data, fsdp, tensor, sequence") as err:
    sharding.rules_from_config(cfg)
  assert err.value.field == "sharding_rules[0]" and "'expert'" in str(err.value)


def _train_cli(tmp_path, variant, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tv2tv_jax.main",
                         f"--config=experiments/toy_world.py:{variant}",
                         f"--workdir={tmp_path / 'run'}", *overrides],
                        capture_output=True, text=True, timeout=300, env=env,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("override,words", [
    ("--config.train.num_stepz=5", ["'train.num_stepz'", "did you mean 'train.num_steps'"]),
    ("--config.mesh.expert=2", ["'mesh.expert'", "data, fsdp, sequence, tensor"]),
    ("--config.trian.num_steps=5", ["'trian'", "did you mean 'train'"]),
])
def test_unknown_command_line_key_is_one_line(tmp_path, override, words):
  proc = _train_cli(tmp_path, "tiny", override)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config field")
  for w in words:
    assert w in last
  assert not (tmp_path / "run").exists()


def test_bad_vae_override_is_named_under_data(tmp_path):
  # quick's VAE variant warms up for 100 steps: 50 steps in all cannot hold that. The VAE
  # names it train.warmup_steps, its own field; here that would read as the flow trainer's.
  proc = _train_cli(tmp_path, "quick", "--config.data.vae.train.num_steps=50")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config field 'data.vae.train.warmup_steps'")
  assert "num_steps=50" in last
  assert not (tmp_path / "run").exists()  # refused before any data stage


def test_bad_vae_override_is_named_under_data_when_preparing_data(tmp_path):
  """Through `preparation.prepare` (no `main`): the data stages check the VAE config before the
  first stage runs, and name the field under data.vae."""
  from data_pipelines import preparation
  cfg = toy_world.get_config("quick")
  cfg.data.vae.train.num_steps = 50
  with pytest.raises(config_lib.ConfigError) as err:
    preparation.prepare(str(tmp_path / "data"), cfg, log=lambda _: None)
  assert err.value.field == "data.vae.train.warmup_steps"
  assert not (tmp_path / "data").exists()
