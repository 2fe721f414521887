"""A run cannot be silently corrupted: config identity at resume, poisoned or corrupt state.

Each test reproduces a way a run used to go wrong without a word (a resume with another
layout, an evaluation that read a later start's config, a corrupt checkpoint restored as
good, a poisoned checkpoint named "last good") and checks the named refusal or fallback.
"""

import json
import os

import jax
import numpy as np
import pytest

from experiments import toy_world
from tv2tv_jax import (checkpoints, resume_check, run_state, synthetic, train_step, trainer)
from tv2tv_jax import config as config_lib
from tv2tv_jax.model import TV2TV


def _cfg(variant="tiny", **train):
  cfg = toy_world.get_config(variant)
  cfg.train.update({**dict(num_steps=4, log_every=4, eval_every=0, save_every=2,
                          async_checkpoints=False), **train})
  return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A tiny tv2tv run of 4 steps with checkpoints at 2 and 4."""
  wd = tmp_path_factory.mktemp("run")
  trainer.train(_cfg(), str(wd), log=lambda _: None)
  return wd


def test_resume_with_another_layout_is_refused_and_changes_nothing(finished_run, tmp_path):
  """Same shapes, another model: refused, naming seq.layout; config.json and what
  `evaluate` restores stay the run's own."""
  before = (finished_run / "config.json").read_text()
  with pytest.raises(resume_check.ResumeError, match=r"seq\.layout: 'tv2tv' in the "
                     r"checkpoint, 't2v' now"):
    trainer.train(_cfg("tiny,t2v", num_steps=6), str(finished_run), log=lambda _: None)
  assert (finished_run / "config.json").read_text() == before
  run, _, step, _ = run_state.load_params(str(finished_run))
  assert run.exp.seq.layout == "tv2tv" and step == 4


def test_resume_with_another_shape_names_the_field_and_keeps_the_checkpoints(finished_run):
  """A d_model change is named as such (not reported as unreadable checkpoints), and
  every checkpoint is still there and restorable afterwards."""
  cfg = _cfg()
  cfg.model.d_model = 128
  lines = []
  with pytest.raises(resume_check.ResumeError, match=r"model\.d_model: 64 in the checkpoint, "
                     r"128 now") as e:
    trainer.train(cfg, str(finished_run), log=lines.append)
  assert "--allow_config_change=model.d_model" in str(e.value)
  assert not any("cannot be restored" in l for l in lines)
  assert sorted(os.listdir(finished_run / "checkpoints")) == ["2", "4"]
  assert run_state.load_params(str(finished_run))[2] == 4


def test_evaluation_reads_the_checkpoint_config_not_config_json(finished_run, tmp_path):
  """A config.json rewritten after the checkpoint (another layout) does not change what
  evaluation restores the checkpoint as."""
  import shutil
  wd = tmp_path / "copy"
  shutil.copytree(finished_run, wd)
  cfg = json.loads((wd / "config.json").read_text())
  cfg["seq"]["layout"] = "t2v"
  (wd / "config.json").write_text(json.dumps(cfg))
  run, _, _, _ = run_state.load_params(str(wd))
  assert run.exp.seq.layout == "tv2tv"


@pytest.mark.slow  # several trainings: the slow tier (CI runs it)
def test_safe_and_allowed_changes_resume_and_are_logged(tmp_path):
  trainer.train(_cfg(), str(tmp_path), log=lambda _: None)
  lines = []
  trainer.train(_cfg(num_steps=6), str(tmp_path), log=lines.append)
  assert any("train.num_steps: 4 -> 6" in l for l in lines)
  assert any("resumed from checkpoint step 4" in l for l in lines)
  cfg = _cfg(num_steps=8)
  cfg.optim.learning_rate = 1e-3
  with pytest.raises(resume_check.ResumeError, match=r"optim\.learning_rate"):
    trainer.train(cfg, str(tmp_path), log=lambda _: None)
  lines = []
  trainer.train(cfg, str(tmp_path), log=lines.append, allow_config_change=("optim",))
  assert any("optim.learning_rate: 0.003 -> 0.001" in l for l in lines)
  assert json.load(open(tmp_path / "config.json"))["optim"]["learning_rate"] == 1e-3


def test_config_changes_rules():
  saved = {"data": {"caption_every": 1}, "seq": {"layout": "tv2tv"}, "old": {"x": 1}}
  # A field added later compares equal to the value that behaves as before it existed.
  assert resume_check.config_changes(saved, {**saved, "data": {"caption_every": 1,
                                                               "plan_drop_rate": 0.0}}) == []
  got = resume_check.config_changes(saved, {"data": {"caption_every": 1, "plan_drop_rate": 0.1},
                                            "seq": {"layout": "tv2tv"}})
  assert got == [("data.plan_drop_rate", 0.0, 0.1), ("old.x", 1, "<absent>")]
  # Tuples and lists are the same value once saved as JSON.
  assert resume_check.config_changes({"a": (1, 2)}, {"a": [1, 2]}) == []
  assert resume_check.check_resume({"mesh": {"data": 8}}, {"mesh": {"data": 1}}, 1) == [
      "mesh.data: 8 -> 1"]


def test_an_update_that_overflows_the_parameters_is_skipped(tiny_exp):
  """Loss and gradient finite, the update not (an infinite learning rate): skipped, the
  state kept, instead of parameters of inf applied and the step called good."""
  import dataclasses
  exp = dataclasses.replace(tiny_exp, optim=dataclasses.replace(
      tiny_exp.optim, learning_rate=1e39, warmup_steps=0))
  model = TV2TV(exp.model)
  state = train_step.create_train_state(model, exp, jax.random.key(0))
  before = jax.tree.map(np.asarray, state.params)
  batch = synthetic.random_batch(0, exp.seq, exp.model, exp.train.batch_size)
  new, m = train_step.make_train_step(model, exp)(state, batch, jax.random.key(1))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new.params), before)


def test_nonfinite_leaves_names_them():
  tree = {"a": np.ones(3, np.float32), "b": {"c": np.array([1.0, np.nan], np.float32)},
          "n": np.arange(3)}
  assert checkpoints.nonfinite_leaves(tree) == ["['b']['c']"]


@pytest.mark.slow  # several trainings: the slow tier (CI runs it)
def test_a_nonfinite_checkpoint_falls_back_and_training_sets_it_aside(tmp_path):
  """A checkpoint that reads but holds NaN (a corruption that still parses) is bad like an
  unreadable one: read-only commands fall back past it without moving it; training falls
  back and moves it aside. (Flipping bytes of an OCDBT data file gives a read error or
  NaN only when the flip lands in referenced array data, so the NaN is written directly.)"""
  trainer.train(_cfg(), str(tmp_path), log=lambda _: None)
  run = trainer.Run(_cfg())
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", async_save=False)
  step, tree, data_state, config, _ = ckpt.restore(run.restore_target())
  leaves, treedef = jax.tree.flatten(tree["params"])
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)
  poisoned = run.state_from_tree({**tree, "params": jax.tree.unflatten(treedef, leaves),
                                  "step": tree["step"] + 2})
  ckpt.save(6, poisoned, data_state, config)
  ckpt.close()
  run, params, step, _ = run_state.load_params(str(tmp_path))
  assert step == 4 and not checkpoints.nonfinite_leaves(params)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
  lines = []
  trainer.train(_cfg(), str(tmp_path), log=lines.append)
  assert any("non-finite values" in l for l in lines)
  assert any("resumed from checkpoint step 4" in l for l in lines)
  assert os.listdir(tmp_path / "checkpoints.unreadable")[0].startswith("6-")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


@pytest.mark.slow  # several trainings: the slow tier (CI runs it)
def test_a_poisoned_checkpoint_is_not_called_good(tmp_path):
  """A learning rate that blows the parameters up to finite but useless values: the
  checkpoint saved right after is the one every later step fails from. The stop finds the
  parameters non-finite on held-out batches, names the checkpoint before them as the last
  good one and moves the poisoned ones aside, so a resume does not loop on them. (Bad
  inputs with good parameters keep every checkpoint: test_scale.py::
  test_nonfinite_losses_are_skipped_then_stop.)"""
  cfg = _cfg(num_steps=12, save_every=1, max_nonfinite_steps=3)
  cfg.optim.update(learning_rate=1e30, warmup_steps=0)
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(cfg, str(tmp_path), log=lambda _: None)
  msg = str(e.value)
  first_bad = int(msg.split("(steps ")[1].split("..")[0])
  kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert all(s < first_bad - 1 for s in kept)
  assert f"Last good checkpoint: {kept[-1] if kept else 'none'}" in msg
  assert "non-finite held-out losses" in msg
  aside = os.listdir(tmp_path / "checkpoints.poisoned")
  assert any(a.startswith(f"{first_bad - 1}-") for a in aside)
