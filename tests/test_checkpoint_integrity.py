"""Checkpoints carry what they depend on: array fingerprints (corruption that still reads
as finite values is caught) and the identity of the prepared data (a rebuilt tokenizer or
VAE under existing checkpoints is refused, and a rebuild keeps what it replaces); metrics
of steps a resume runs again are set aside, not duplicated."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import toy_world
from tv2tv_jax import checkpoints, inputs, metric_logging, resume_check, run_state, trainer

import grain_fixture


def _state(seed, w=None):
  w = jax.random.normal(jax.random.key(0), (16, 8)) if w is None else w
  return types.SimpleNamespace(step=jnp.int32(seed), params={"w": w * seed},
                               opt_state={"mu": jnp.full((16, 8), 0.5 * seed),
                                          "count": jnp.int32(seed)})


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      checkpoints.state_tree(state))


# --- fingerprints ----------------------------------------------------------------------

def test_fingerprints_do_not_depend_on_the_sharding_and_see_one_changed_element():
  tree = {"f32": jax.random.normal(jax.random.key(1), (8, 12)),
          "bf16": jax.random.normal(jax.random.key(2), (8, 4)).astype(jnp.bfloat16),
          "i32": jnp.arange(24, dtype=jnp.int32).reshape(8, 3), "flag": jnp.array([True, False]),
          "scalar": jnp.float32(3.0)}
  here = checkpoints.state_fingerprints(tree)
  mesh = jax.make_mesh((8,), ("x",))
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P("x") if v.ndim and v.shape[0] == 8
                                                else P())) for k, v in tree.items()}
  assert checkpoints.state_fingerprints(sharded) == here
  # Any one element changed, or two elements swapped, changes the leaf's fingerprint.
  for name, changed in [("f32", tree["f32"].at[3, 5].add(1e-6)),
                        ("f32", tree["f32"].at[0, 0].set(tree["f32"][0, 1])
                         .at[0, 1].set(tree["f32"][0, 0])),
                        ("bf16", tree["bf16"].at[7, 3].set(0)),
                        ("i32", tree["i32"].at[2, 1].add(1)), ("flag", ~tree["flag"])]:
    assert checkpoints.fingerprint_mismatches(here, dict(tree, **{name: changed})) == \
        [f"['{name}']"]


def _corrupt_newest_state(directory, wrong_state, tmp_path):
  """Replaces the state arrays of the newest step (2) by another, finite, state's: what a
  flipped byte in an uncompressed chunk reads back as."""
  other = checkpoints.Checkpointer(tmp_path / "other", async_save=False)
  other.save(2, wrong_state, {}, {})
  other.close()
  shutil.rmtree(directory / "2" / "state")
  shutil.copytree(tmp_path / "other" / "2" / "state", directory / "2" / "state")


def test_finite_but_wrong_arrays_fail_their_fingerprints_and_fall_back(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = checkpoints.Checkpointer(d, async_save=False)
  for s in (1, 2):
    ckpt.save(s, _state(s), {"index": s}, {"c": 1}, {"tokenizer": "t1"})
  ckpt.close()
  good = _state(2)
  _corrupt_newest_state(d, _state(2, w=good.params["w"].at[5, 5].add(0.25) / 2), tmp_path)
  lines = []
  restored = checkpoints.Checkpointer(d).restore(_target(good), log=lines.append)
  assert restored.step == 1 and restored.data == {"index": 1}
  assert restored.data_identity == {"tokenizer": "t1"}
  assert "['params']['w']" in lines[0] and "fingerprints" in lines[0]
  assert sorted(os.listdir(d)) == ["1", "2"]  # read-only by default: nothing moved
  # Asked for exactly that step, it is refused, naming the reason.
  with pytest.raises(checkpoints.CheckpointError, match="differ from the fingerprints"):
    checkpoints.Checkpointer(d).restore(_target(good), step=2)
  # The training run moves it aside, so that it can write step 2 again.
  checkpoints.Checkpointer(d).restore(_target(good), log=lines.append, set_aside=True)
  assert os.listdir(d) == ["1"] and len(os.listdir(tmp_path / "ckpt.unreadable")) == 1


def test_a_checkpoint_without_fingerprints_restores_unverified(tmp_path):
  d = tmp_path / "ckpt"
  ckpt = checkpoints.Checkpointer(d, async_save=False)
  ckpt.save(3, _state(3), {"index": 3}, {"c": 1})
  ckpt.close()
  shutil.rmtree(d / "3" / "integrity")  # as written before fingerprints existed
  lines = []
  restored = checkpoints.Checkpointer(d).restore(_target(_state(3)), log=lines.append)
  assert restored.step == 3 and restored.data_identity == {}
  assert lines == ["checkpoint step 3 predates array fingerprints: restored unverified"]
  np.testing.assert_array_equal(restored.state["params"]["w"], _state(3).params["w"])


# --- data identity ---------------------------------------------------------------------

def test_check_data_identity_rules():
  saved = {"tokenizer": "a", "vae": "v", "latents": "l"}
  assert resume_check.check_data_identity(saved, dict(saved), 4, "D") == []
  assert resume_check.check_data_identity({}, saved, 4, "D") == []  # predates identities
  with pytest.raises(resume_check.ResumeError) as err:
    resume_check.check_data_identity(saved, dict(saved, tokenizer="b", vae="w"), 4, "D")
  msg = str(err.value)
  assert "tokenizer: a in the checkpoint, b in D" in msg and "vae: v in the checkpoint" in msg
  assert "D/superseded/" in msg and "latents: " not in msg
  assert resume_check.check_data_identity(saved, dict(saved, vae="w"), 4, "D",
                                          allow=("data_identity",)) == \
      ["data_identity.vae: v -> w"]


def _tiny_cfg(num_steps):
  cfg = toy_world.get_config("tiny")
  cfg.train.update(num_steps=num_steps, log_every=1, eval_every=0, save_every=2,
                   async_checkpoints=False)
  return cfg


@pytest.mark.slow  # three trainer runs and an evaluation: ~100 s
def test_resume_on_other_data_is_refused_before_anything_is_written(tmp_path, monkeypatch):
  """The identity a run trained on is in its checkpoints; a start that finds other data
  (here: the tokenizer part) is refused, naming it, and leaves config.json as it was."""
  identity = {"tokenizer": "a" * 16, "vae": "b" * 16}
  monkeypatch.setattr(inputs, "data_identity", lambda *a, **k: (identity, "DATA"))
  trainer.train(_tiny_cfg(2), str(tmp_path), log=lambda _: None)
  before = (tmp_path / "config.json").read_text()
  identity = dict(identity, tokenizer="c" * 16)
  with pytest.raises(resume_check.ResumeError, match=f"tokenizer: {'a' * 16} in the "
                     f"checkpoint, {'c' * 16} in DATA"):
    trainer.train(_tiny_cfg(4), str(tmp_path), log=lambda _: None)
  assert (tmp_path / "config.json").read_text() == before
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  with pytest.raises(resume_check.ResumeError, match="tokenizer: "):  # evaluation too
    run_state.evaluate_checkpoint(str(tmp_path), devices=jax.devices()[:1])
  # Deliberately going on with the new data: allowed by name, logged, recorded.
  lines = []
  trainer.train(_tiny_cfg(4), str(tmp_path), log=lines.append,
                allow_config_change=("data_identity.tokenizer",))
  assert any("data_identity.tokenizer: " + "a" * 16 in line for line in lines)
  restored = checkpoints.Checkpointer(tmp_path / "checkpoints").restore(
      trainer.Run(_tiny_cfg(4)).restore_target(), log=lambda _: None)
  assert restored.step == 4 and restored.data_identity["tokenizer"] == "c" * 16


def _mark_all_done(root, cfg):
  from data_pipelines import preparation
  settings = preparation.stage_settings(cfg)
  for stage in preparation.STAGES:
    preparation._mark(root, stage, settings[stage], seconds=0.0)


def test_a_rebuild_keeps_what_it_replaces(tmp_path):
  """A changed setting rebuilds only the stages downstream of it; their previous outputs
  and markers move to superseded/<time>/ (checkpoints may depend on them), and the data
  identity changes exactly in those parts."""
  from data_pipelines import prepared, preparation
  from experiments import toy_world
  root = str(tmp_path)
  grain_fixture.build(root)  # tfds/, latents/, tokenizer.json (no VAE training)
  cfg = grain_fixture.experiment_config()
  cfg.data = dict(source="toy_world", prompt=grain_fixture.PROMPT,
                  vae=toy_world.vae_recipe("tiny"))
  _mark_all_done(root, cfg)
  before = prepared.data_identity(root)
  old_tokenizer = open(os.path.join(root, "tokenizer.json"), "rb").read()
  cfg.data.prompt = "another prompt"  # the tokenizer stage's own setting
  lines = []
  preparation.prepare(root, cfg, log=lines.append)
  (stamp,) = os.listdir(os.path.join(root, "superseded"))
  kept = os.path.join(root, "superseded", stamp)
  assert sorted(os.listdir(kept)) == ["stage_tokenizer.json", "tokenizer.json"]
  assert open(os.path.join(kept, "tokenizer.json"), "rb").read() == old_tokenizer
  assert any("previous build moved to" in line for line in lines)
  after = prepared.data_identity(root)
  assert after["tokenizer"] != before["tokenizer"] and after["latents"] == before["latents"]
  assert json.load(open(os.path.join(root, "stage_tokenizer.json")))["settings"]["prompt"] == \
      "another prompt"


# --- metrics of re-run steps -----------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "gs"])
def test_metrics_of_steps_run_again_are_set_aside(tmp_path, where, request):
  if where == "gs":
    request.getfixturevalue("fake_gcs")
  wd = str(tmp_path) if where == "local" else "gs://bucket/run"
  first = metric_logging.MetricLogger(wd, 6, log=lambda _: None, tensorboard=False)
  for s in (1, 2, 3, 4):
    first.write(s, {"loss": float(s)})
  first.close()
  from etils import epath
  path = epath.Path(wd) / "metrics.jsonl"
  path.write_text(path.read_text() + '{"step": 5, "lo')  # a line torn by kill -9
  lines = []
  again = metric_logging.MetricLogger(wd, 6, log=lines.append, tensorboard=False,
                                      start_step=2)
  for s in (3, 4):
    again.write(s, {"loss": 10.0 + s})
  again.close()
  rows = [json.loads(x) for x in path.read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
  aside = (epath.Path(wd) / "metrics.superseded.jsonl").read_text().splitlines()
  assert [json.loads(x)["step"] for x in aside[:2]] == [3, 4] and len(aside) == 3
  assert "3 records of steps after 2" in lines[0]


def test_skipped_examples_sums_every_packing_iterator():
  state = {"workers": [{"skipped": 2, "window_start": {"skipped_like": 9}},
                       {"skipped": 3}], "index": 4}
  assert inputs.skipped_examples(state) == 5
  assert inputs.skipped_examples({"index": 3, "seed": 0}) == 0
