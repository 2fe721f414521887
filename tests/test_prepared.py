"""Preparation is its own step: the trainer reads only prepared data, and the layers import
one way (no library module imports experiments; input code imports no preparation)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import grain_fixture
from data_pipelines import prepared
from experiments import toy_world
from tv2tv_jax import config as config_lib, inputs, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_library_code_imports_no_experiment_config():
  files = [p for d in ("tv2tv_jax", "data_pipelines") for p in (ROOT / d).rglob("*.py")]
  bad = [f"{p.relative_to(ROOT)}: {m}" for p in files for m in _imports(p)
         if m == "experiments" or m.startswith("experiments.")]
  assert not bad, bad


def test_input_code_imports_no_preparation():
  mods = _imports(ROOT / "tv2tv_jax" / "inputs.py")
  assert not [m for m in mods if "preparation" in m or "main_job" in m or
              m.endswith(".prepare")], mods


def test_an_unprepared_directory_is_refused_by_name(tmp_path):
  """The input code builds nothing: an empty data directory is named with what it lacks
  and the command that prepares it."""
  cfg = toy_world.get_config("quick")
  cfg.data.data_dir = str(tmp_path / "data")
  exp = config_lib.experiment_from_config_dict(cfg)
  with pytest.raises(prepared.NotPreparedError) as err:
    inputs.make_train_input(exp, cfg, str(tmp_path / "run"))
  assert err.value.field == "data.data_dir"
  assert "latents/meta.json" in str(err.value) and "tokenizer.json" in str(err.value)
  assert "python -m tv2tv_jax.prepare" in str(err.value)
  assert not (tmp_path / "data").exists()  # nothing was built
  with pytest.raises(prepared.NotPreparedError):
    trainer.train(cfg, str(tmp_path / "run"), log=lambda _: None, devices=jax.devices()[:1])


def test_a_prepared_directory_trains(tmp_path):
  """A directory holding latents and a tokenizer (no stage markers, no VAE: training
  needs neither) is read as it is."""
  data_dir = str(tmp_path / "data")
  grain_fixture.build(data_dir)
  cfg = grain_fixture.experiment_config()
  cfg.data.update(source="toy_world", data_dir=data_dir, prompt=grain_fixture.PROMPT)
  cfg.train.update(num_steps=2, eval_every=2, eval_batches=1)
  records = trainer.train(cfg, str(tmp_path / "run"), log=lambda _: None)
  assert [r for r in records if "loss" in r]
  assert not os.path.exists(os.path.join(data_dir, "stage_vae.json"))


def test_default_data_dir_is_one_rule(tmp_path):
  wd = str(tmp_path / "run")
  assert prepared.default_data_dir({"source": "toy_world"}, wd) == \
      os.path.join(wd, "toy_world_data")
  assert prepared.default_data_dir({"source": "synthetic"}, wd) == \
      os.path.join(wd, "toy_world_data")  # where generation finds the toy tokenizers
  assert prepared.default_data_dir({"source": "csgo"}, wd) == os.path.join(wd, "data")
  assert prepared.default_data_dir({"source": "csgo", "data_dir": "/x/y"}, wd) == "/x/y"


@pytest.mark.slow
def test_prepare_command_builds_every_stage_once(tmp_path):
  """`python -m tv2tv_jax.prepare` runs the stages; a second call finds them cached; a
  run on the prepared directory then trains without preparing anything."""
  data_dir = str(tmp_path / "data")
  args = [sys.executable, "-m", "tv2tv_jax.prepare", "--config=experiments/toy_world.py:quick",
          f"--data_dir={data_dir}", "--config.data.toy_world.num_train=8",
          "--config.data.toy_world.num_validation=2", "--config.data.vae.train.num_steps=3",
          "--config.data.vae.train.warmup_steps=1", "--config.data.vae.train.eval_clips=2",
          "--config.data.vae.train.stats_clips=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  stages = json.loads(first.stdout)
  assert set(stages) == {"tfds", "vae", "latents", "tokenizer"}
  assert not prepared.missing_parts(data_dir)
  second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stderr.count("cached") + second.stdout.count("cached") >= 4
