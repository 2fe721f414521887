"""Sharding, checkpoints, restore onto other meshes, non-finite handling."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from experiments import toy_world
from tv2tv_jax import config as config_lib
from tv2tv_jax import inputs, run_state, sharding, synthetic, trainer
from tv2tv_jax.model import TV2TV


def _losses(exp, cfg, mesh_cfg, devices, steps=20):
  model = TV2TV(exp.model)
  batches = [synthetic.random_batch(i, exp.seq, exp.model, exp.train.batch_size)
             for i in range(4)]
  mesh = sharding.make_mesh(mesh_cfg, devices)
  rules = sharding.rules_from_config(cfg)
  state, shardings = sharding.init_sharded_state(model, exp, mesh, rules, jax.random.key(0))
  step = sharding.make_sharded_train_step(model, exp, mesh, rules, shardings)
  out = []
  with jax.set_mesh(mesh):
    for i in range(steps):
      state, m = step(state, sharding.put_batch(batches[i % 4], mesh), jax.random.key(1))
      out.append(float(m["loss"]))
  return np.array(out), state


def test_eight_devices_match_one(tiny_exp):
  assert jax.device_count() == 8
  cfg = toy_world.get_config("tiny")
  one, _ = _losses(tiny_exp, cfg, sharding.MeshConfig(data=1), jax.devices()[:1])
  eight, state = _losses(tiny_exp, cfg, sharding.MeshConfig(data=2, fsdp=2, tensor=2),
                         jax.devices())
  np.testing.assert_allclose(eight, one, rtol=1e-5)
  # The parameters really are sharded on the 2x2x2 mesh.
  wq = state.params["stack"]["layers"]["text"]["qkv"]["wq"]
  assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert len(wq.addressable_shards) == 8


@pytest.mark.parametrize("mesh,field", [
    (dict(data=3), "mesh.data"),
    (dict(data=-1, fsdp=-1), "mesh.fsdp"),
    (dict(data=-1, fsdp=3), "mesh.fsdp"),
    (dict(tensor=0), "mesh.tensor"),
    (dict(pipeline=2), "mesh.pipeline"),
])
def test_bad_mesh_names_field(mesh, field):
  with pytest.raises(config_lib.ConfigError) as err:
    sharding.make_mesh(sharding.mesh_config(mesh))
  assert err.value.field == field


def test_mesh_must_divide_shapes(tiny_exp):
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, tensor=8))
  with pytest.raises(config_lib.ConfigError, match="model.num_heads"):
    sharding.check_divisibility(tiny_exp, mesh)


def _tiny_cfg(**train):
  cfg = toy_world.get_config("tiny")
  cfg.train.update(**{"log_every": 2, "eval_batches": 1, **train})
  return cfg


@pytest.mark.slow  # restores and evaluates on three meshes: ~50 s
def test_restore_onto_other_meshes_gives_identical_eval(tmp_path):
  cfg = _tiny_cfg(num_steps=4)
  cfg.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, sequence=1))
  records = trainer.train(cfg, str(tmp_path), log=lambda _: None)
  in_run = [r for r in records if "eval/video_mse" in r][-1]
  results = [run_state.evaluate_checkpoint(str(tmp_path), devices=jax.devices()[:n])
             for n in (1, 4)]
  for r in results:
    assert r["step"] == 4
    for key in ("eval/text_ce", "eval/video_mse"):
      assert r[key] == pytest.approx(in_run[key], rel=1e-6), key
  assert results[0]["eval/video_mse"] == results[1]["eval/video_mse"]
  assert results[0]["eval/text_ce"] == results[1]["eval/text_ce"]
  # A params-only export evaluates to the same numbers.
  run, params, _, _ = run_state.load_params(str(tmp_path), devices=jax.devices()[:1])
  from tv2tv_jax import checkpoints
  checkpoints.export_params(params, str(tmp_path / "export"))
  exported = run_state.evaluate_checkpoint(str(tmp_path), params_dir=str(tmp_path / "export"),
                                          devices=jax.devices()[:2])
  assert exported["eval/video_mse"] == results[0]["eval/video_mse"]


def _largest_file(root):
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.slow  # two 8-device trainings: ~50 s
def test_truncated_newest_checkpoint_falls_back(tmp_path):
  cfg = _tiny_cfg(num_steps=4, save_every=2)
  trainer.train(cfg, str(tmp_path), log=lambda _: None, devices=jax.devices()[:1])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  victim = _largest_file(tmp_path / "checkpoints" / "4" / "state")
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  lines = []
  cfg.train.num_steps = 6
  records = trainer.train(cfg, str(tmp_path), log=lines.append, devices=jax.devices()[:1])
  text = "\n".join(lines)
  assert "checkpoint at step 4" in text and "falling back" in text
  assert "resumed from checkpoint step 2" in text
  assert [r["step"] for r in records if "loss" in r][0] == 3


class _NaNAfter:
  """A training stream whose batches carry NaN latents from batch `k` on."""

  def __init__(self, inner, k):
    self.inner, self.k = inner, k

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.inner)
    if self.inner.index > self.k:
      batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
  real = inputs.make_train_input
  monkeypatch.setattr(inputs, "make_train_input",
                      lambda exp, cfg, **kw: _NaNAfter(real(exp, cfg, **kw), 4))
  cfg = _tiny_cfg(num_steps=20, save_every=2, max_nonfinite_steps=3, log_every=1)
  with pytest.raises(trainer.NonFiniteLossError, match=r"3 consecutive non-finite losses "
                     r"\(steps 5\.\.7\); stopping\. Last good checkpoint: 4 .*the training "
                     r"inputs went non-finite"):
    trainer.train(cfg, str(tmp_path), log=lambda _: None, devices=jax.devices()[:1])
  logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["skipped"] for r in logged] == [0, 0, 0, 0, 1, 1]
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4]
  # The skipped steps left the parameters as they were after step 4.
  run, params4, _, _ = run_state.load_params(str(tmp_path), step=4, devices=jax.devices()[:1])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params4))


def _write_llama(path, exp, seed=0):
  """A Llama-format checkpoint (config.json + model.safetensors) shaped like `exp`'s towers."""
  from safetensors.numpy import save_file
  m = exp.model
  rng = np.random.default_rng(seed)
  w = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  t = {"model.embed_tokens.weight": w(m.vocab_size, m.d_model),
       "model.norm.weight": w(m.d_model), "lm_head.weight": w(m.vocab_size, m.d_model)}
  for i in range(m.num_layers):
    p = f"model.layers.{i}."
    t.update({p + "self_attn.q_proj.weight": w(m.num_heads * m.head_dim, m.d_model),
              p + "self_attn.k_proj.weight": w(m.num_kv_heads * m.head_dim, m.d_model),
              p + "self_attn.v_proj.weight": w(m.num_kv_heads * m.head_dim, m.d_model),
              p + "self_attn.o_proj.weight": w(m.d_model, m.num_heads * m.head_dim),
              p + "mlp.gate_proj.weight": w(m.mlp_dim, m.d_model),
              p + "mlp.up_proj.weight": w(m.mlp_dim, m.d_model),
              p + "mlp.down_proj.weight": w(m.d_model, m.mlp_dim),
              p + "input_layernorm.weight": w(m.d_model),
              p + "post_attention_layernorm.weight": w(m.d_model)})
  os.makedirs(path, exist_ok=True)
  save_file(t, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(architectures=["LlamaForCausalLM"], model_type="llama",
                   hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                   num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                   head_dim=m.head_dim, intermediate_size=m.mlp_dim, vocab_size=m.vocab_size,
                   rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                   tie_word_embeddings=False), f)
  return t


def test_trainer_initialises_text_tower_from_llama(tmp_path, tiny_exp):
  tensors = _write_llama(str(tmp_path / "llama"), tiny_exp)
  cfg = _tiny_cfg(num_steps=1)
  cfg.optim.learning_rate = 1e-6  # one step barely moves the loaded weights
  cfg.init = ml_collections.ConfigDict(dict(llama_dir=str(tmp_path / "llama"),
                                            video_tower_from_llama=False))
  lines = []
  trainer.train(cfg, str(tmp_path / "run"), log=lines.append, devices=jax.devices()[:1])
  _, params, _, _ = run_state.load_params(str(tmp_path / "run"), devices=jax.devices()[:1])
  np.testing.assert_allclose(np.asarray(params["embed"]["embedding"]),
                             tensors["model.embed_tokens.weight"], atol=1e-4)
  wq = np.asarray(params["stack"]["layers"]["text"]["qkv"]["wq"][1])  # layer 1, [D, H, dh]
  m = tiny_exp.model
  hf = tensors["model.layers.1.self_attn.q_proj.weight"].reshape(m.num_heads, m.head_dim,
                                                                 m.d_model)
  np.testing.assert_allclose(wq, hf.transpose(2, 0, 1), atol=1e-4)
  # The video tower was not taken from Llama (config choice).
  wq_video = np.asarray(params["stack"]["layers"]["video"]["qkv"]["wq"][1])
  assert not np.allclose(wq_video, hf.transpose(2, 0, 1), atol=1e-2)
