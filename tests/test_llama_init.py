"""Llama checkpoint -> text tower: our model's logits match Hugging Face transformers'.

A small random `LlamaForCausalLM` (2 layers, d 64, 4 heads / 2 KV heads, FFN 128, vocab 300,
RoPE theta 5e5) is saved with `save_pretrained` (safetensors), loaded into TV2TV's text tower,
and run on a text-only packed row (video slots all padding). Every weight is re-drawn with
O(1) scale, norms included (HF initialises norm scales to 1 and weights at std 0.02, which
would hide a swapped norm or a wrong head reshape behind near-zero logits). A second one
declares Llama-3.1's RoPE scaling (rope_type "llama3") at sizes where every band of the
scaling acts within the row.

Needs the test-only packages torch and transformers (skipped cleanly without them).
Damaged checkpoint files (truncated, not JSON, NaN/inf tensors) are tested without them
in test_llama_init_files.py.
"""

import functools
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tv2tv_jax import flow, losses, sequence, train_step  # noqa: E402
from tv2tv_jax import layers, llama_init  # noqa: E402
from tv2tv_jax.config import ConfigError  # noqa: E402
from tv2tv_jax.config import ModelConfig, SequenceConfig, Experiment, FlowConfig  # noqa: E402
from tv2tv_jax.config import LossConfig, OptimConfig, TrainConfig  # noqa: E402
from tv2tv_jax.model import TV2TV  # noqa: E402

HF_SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=300,
                 rope_theta=5e5, rms_norm_eps=1e-5)
T = 24  # text slots of the test row
REL_TOL = 1e-4


def _model_cfg(**overrides) -> ModelConfig:
  base = dict(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, mlp_dim=128, rope_theta=5e5, norm_eps=1e-5, latent_shape=(4, 4, 4),
              patch_size=2, unet_channels=8, unet_groups=4, time_embed_dim=8)
  base.update(overrides)
  return ModelConfig(**base)


def _exp(model_cfg: ModelConfig) -> Experiment:
  return Experiment(model=model_cfg, seq=SequenceConfig(text_len=T, max_chunks=1),
                    flow=FlowConfig(), loss=LossConfig(), optim=OptimConfig(),
                    train=TrainConfig(batch_size=1))


def _save_hf(path, seed=0, tie=False, dtype=None, rope_parameters=None, **save_kwargs):
  """Saves a random LlamaForCausalLM with O(1)-scale weights; returns the torch model.

  rope_parameters: transformers>=5's RoPE dict (rope_type, rope_theta, ...), replacing
  HF_SHAPES' plain rope_theta."""
  torch.manual_seed(seed)
  shapes = dict(HF_SHAPES)
  if rope_parameters is not None:
    del shapes["rope_theta"]
    shapes["rope_parameters"] = dict(rope_parameters)
  hf_cfg = transformers.LlamaConfig(**shapes, tie_word_embeddings=tie,
                                    attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5)
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(path, **save_kwargs)
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama_tiny")
  return path, _save_hf(path)


def _random_params(cfg: ModelConfig, boxed: bool = False, seed: int = 1):
  """Random params of the right tree, shapes and dtypes, without compiling an init: the
  tree comes from `jax.eval_shape` and every leaf is drawn in NumPy (small values; the
  U-Nets only ever see padding here)."""
  abstract = jax.eval_shape(lambda r: train_step.init_params(TV2TV(cfg), _exp(cfg), r),
                            jax.random.key(0))
  rng = np.random.default_rng(seed)
  draw = lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)
  if boxed:
    return jax.tree.map(lambda b: b.replace_boxed(draw(b.unbox())), abstract,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return jax.tree.map(draw, nn.unbox(abstract))


@pytest.fixture(scope="module")
def init_params():
  """Random TV2TV params (unboxed) for both layer layouts, keyed by scan_layers."""
  return {scan: _random_params(_model_cfg(scan_layers=scan)) for scan in (True, False)}


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  """A jitted text-logits forward, compiled once per config (tests share it)."""
  def fn(params, batch):
    sample = flow.fixed_flow(batch["latents"].shape, 1.0)
    kwargs, _ = losses.model_inputs(batch, sample, cfg.tokens_per_chunk)
    return TV2TV(cfg).apply({"params": params}, **kwargs)[0]
  return jax.jit(fn)


def _text_row(tokens_per_segment):
  """A packed batch (B=1) holding text-only examples; all video slots are padding."""
  exp = _exp(_model_cfg())
  row = sequence.empty_row(exp.seq, exp.model)
  start = 0
  for seg, tokens in enumerate(tokens_per_segment, start=1):
    sl = slice(start, start + len(tokens))
    row["text_tokens"][sl] = tokens
    row["segment_ids"][sl] = seg
    row["modality"][sl] = sequence.TEXT
    row["positions"][sl] = np.arange(len(tokens))  # positions restart per example
    row["order"][sl] = np.arange(len(tokens))
    start += len(tokens)
  return {k: v[None] for k, v in row.items()}


def _our_logits(cfg: ModelConfig, params, batch):
  return np.asarray(_forward(cfg)(params, batch)[0])


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].numpy()


def _rel_err(ours, theirs):
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_logits_match_transformers(hf_dir, init_params, scan):
  path, hf_model = hf_dir
  cfg = _model_cfg(scan_layers=scan)
  params = llama_init.load_llama_params(path, cfg, init_params[scan])
  rng = np.random.default_rng(0)
  # Two packed examples: the second's RoPE positions restart at 0 and it must not see the first.
  a, b = rng.integers(4, 300, size=15), rng.integers(4, 300, size=T - 15)
  ours = _our_logits(cfg, params, _text_row([a, b]))
  err_a = _rel_err(ours[:15], _hf_logits(hf_model, a))
  err_b = _rel_err(ours[15:], _hf_logits(hf_model, b))
  print(f"max rel logit error vs transformers ({'scanned' if scan else 'unrolled'}): "
        f"{err_a:.2e}, {err_b:.2e}")
  assert np.abs(_hf_logits(hf_model, a)).max() > 1.0  # the comparison is not near zero
  assert err_a < REL_TOL and err_b < REL_TOL


def test_params_placed_and_rest_kept(hf_dir, init_params):
  """Layer i of the checkpoint lands in layer i of the stack; the video tower, video norm
  and U-Nets keep their values unless video_tower_from_llama."""
  path, hf_model = hf_dir
  cfg = _model_cfg(scan_layers=True)
  old = init_params[True]
  sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  new = llama_init.load_llama_params(path, cfg, old)
  np.testing.assert_array_equal(new["stack"]["layers"]["text"]["ffn"]["w_down"][1],
                                sd["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(new["lm_head"]["kernel"], sd["lm_head.weight"].T)
  for key in ("down", "up", "video_norm"):
    jax.tree.map(np.testing.assert_array_equal, new[key], old[key])
  jax.tree.map(np.testing.assert_array_equal, new["stack"]["layers"]["video"],
               old["stack"]["layers"]["video"])
  both = llama_init.load_llama_params(path, cfg, old, video_tower_from_llama=True)
  jax.tree.map(np.testing.assert_array_equal, both["stack"]["layers"]["video"],
               both["stack"]["layers"]["text"])
  np.testing.assert_array_equal(both["video_norm"]["scale"], sd["model.norm.weight"])
  jax.tree.map(np.testing.assert_array_equal, both["up"], old["up"])


def test_boxed_params_keep_their_boxes(hf_dir):
  path, _ = hf_dir
  cfg = _model_cfg(scan_layers=True)
  boxed = _random_params(cfg, boxed=True)
  new = llama_init.load_llama_params(path, cfg, boxed)
  wq = new["stack"]["layers"]["text"]["qkv"]["wq"]
  assert wq.names == boxed["stack"]["layers"]["text"]["qkv"]["wq"].names
  assert wq.value.shape == (2, 64, 4, 16)


def test_tied_embeddings(tmp_path, init_params):
  """Llama-3.2 ties lm_head to the embedding and saves no lm_head.weight."""
  hf_model = _save_hf(tmp_path, seed=3, tie=True)
  cfg = _model_cfg(scan_layers=True)
  params = llama_init.load_llama_params(tmp_path, cfg, init_params[True])
  tokens = np.random.default_rng(1).integers(4, 300, size=T)
  assert _rel_err(_our_logits(cfg, params, _text_row([tokens])),
                  _hf_logits(hf_model, tokens)) < REL_TOL


def test_sharded_and_bf16_checkpoints(tmp_path, hf_dir, init_params):
  path, hf_model = hf_dir
  cfg = _model_cfg(scan_layers=False)
  single = llama_init.load_llama_params(path, cfg, init_params[False])
  sharded_dir = tmp_path / "sharded"
  hf_model.save_pretrained(sharded_dir, max_shard_size="50KB")
  shards = [f for f in os.listdir(sharded_dir) if f.endswith(".safetensors")]
  assert len(shards) > 2 and (sharded_dir / llama_init.INDEX_FILE).exists()
  sharded = llama_init.load_llama_params(sharded_dir, cfg, init_params[False])
  jax.tree.map(np.testing.assert_array_equal, sharded, single)
  # bfloat16 checkpoint (how Llama-3 ships) into float32 params: the bf16 values exactly.
  bf16_model = _save_hf(tmp_path / "bf16", dtype=torch.bfloat16)
  got = llama_init.load_llama_params(tmp_path / "bf16", cfg, init_params[False])
  want = bf16_model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T.reshape(64, 2, 16)
  assert got["stack"]["layer_1"]["text"]["qkv"]["wk"].dtype == np.float32
  np.testing.assert_array_equal(got["stack"]["layer_1"]["text"]["qkv"]["wk"], want)


def _rewrite(src, dst, edit):
  """Copies the single-file checkpoint `src` to `dst` with its tensors edited by `edit`."""
  os.makedirs(dst, exist_ok=True)
  tensors = safetensors_torch.load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  safetensors_torch.save_file(tensors, os.path.join(dst, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)


def test_missing_tensor_is_named(tmp_path, hf_dir, init_params):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(hf_dir[0], tmp_path, lambda t: t.pop(name))
  with pytest.raises(llama_init.MissingTensorError, match=name.replace(".", r"\.")):
    llama_init.load_llama_params(tmp_path, _model_cfg(), init_params[True])


def test_misshaped_tensor_is_named(tmp_path, hf_dir, init_params):
  name = "model.layers.0.self_attn.q_proj.weight"
  _rewrite(hf_dir[0], tmp_path, lambda t: t.update({name: t[name][:48].clone()}))
  with pytest.raises(llama_init.TensorShapeError) as err:
    llama_init.load_llama_params(tmp_path, _model_cfg(), init_params[True])
  assert name in str(err.value)
  assert "expected shape (64, 64), found (48, 64)" in str(err.value)


def test_unexpected_tensor_is_named(tmp_path, hf_dir, init_params):
  name = "model.layers.0.self_attn.q_proj.bias"
  _rewrite(hf_dir[0], tmp_path, lambda t: t.update({name: torch.zeros(64)}))
  with pytest.raises(llama_init.UnexpectedTensorError, match=name.replace(".", r"\.")):
    llama_init.load_llama_params(tmp_path, _model_cfg(), init_params[True])


@pytest.mark.parametrize("field,value", [
    ("d_model", 128), ("num_layers", 3), ("num_heads", 8), ("num_kv_heads", 4),
    ("head_dim", 32), ("mlp_dim", 256), ("vocab_size", 512), ("rope_theta", 1e4),
    ("norm_eps", 1e-6)])
def test_config_mismatch_names_field(hf_dir, init_params, field, value):
  with pytest.raises(llama_init.LlamaConfigMismatch) as err:
    llama_init.load_llama_params(hf_dir[0], _model_cfg(**{field: value}), init_params[True])
  assert err.value.field == f"model.{field}"
  assert str(value) in str(err.value)


# Llama-3.1-style scaling at toy sizes: with head_dim 16 and theta 100 the 8 wavelengths
# 2*pi*100^(i/8) are 6.3, 11, 20, 35, 63, ...; against a pretraining context of 32 that
# puts i=0 in the kept band (< 32/4), i=1,2 in the interpolated band and i>=3 in the
# divided band (> 32/1), so every branch of the scaling shapes the logits at T=24.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
LLAMA3_MODEL = dict(rope_type="llama3", rope_theta=100.0, rope_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position_embeddings=32)


def _edit_config(path, edit):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def _to_hub_style(cfg):
  """transformers>=5 `rope_parameters` -> the Hub's Llama-3.x layout (rope_theta +
  rope_scaling), as in Llama-3.2-3B's config.json."""
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = rope


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama3_tiny")
  return path, _save_hf(path, seed=5, rope_parameters=LLAMA3_ROPE)


@pytest.mark.parametrize("style", ["transformers5", "hub"])
def test_llama3_rope_scaling_matches_transformers(tmp_path, llama3_dir, init_params, style):
  """Llama-3.1/3.2's rope_type 'llama3': frequencies and logits match transformers'."""
  path, hf_model = llama3_dir
  if style == "hub":
    _rewrite(path, tmp_path, lambda t: None)
    _edit_config(tmp_path, _to_hub_style)
    path = tmp_path
  with open(os.path.join(path, "config.json")) as f:
    assert ("rope_scaling" in json.load(f)) == (style == "hub")
  cfg = _model_cfg(scan_layers=True, **LLAMA3_MODEL)
  ours_freq = np.asarray(layers.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
  hf_freq = hf_model.model.rotary_emb.inv_freq.numpy()
  np.testing.assert_allclose(ours_freq, hf_freq, rtol=1e-6)
  params = llama_init.load_llama_params(path, cfg, init_params[True])
  rng = np.random.default_rng(2)
  a, b = rng.integers(4, 300, size=15), rng.integers(4, 300, size=T - 15)
  ours = _our_logits(cfg, params, _text_row([a, b]))
  hf_a, hf_b = _hf_logits(hf_model, a), _hf_logits(hf_model, b)
  err_a, err_b = _rel_err(ours[:15], hf_a), _rel_err(ours[15:], hf_b)
  # The same weights under plain RoPE: how far off ignoring the scaling would be.
  plain_cfg = _model_cfg(scan_layers=True, rope_theta=100.0)
  plain = _our_logits(plain_cfg, params, _text_row([a, b]))
  plain_err = _rel_err(plain[:15], hf_a)
  print(f"llama3 RoPE ({style}): max rel logit error vs transformers {err_a:.2e}, {err_b:.2e}; "
        f"plain RoPE would be off by {plain_err:.2e}")
  assert err_a < REL_TOL and err_b < REL_TOL
  assert plain_err > 100 * REL_TOL  # the scaling matters at these positions


@pytest.mark.parametrize("field,value", [
    ("rope_factor", 32.0), ("rope_low_freq_factor", 2.0), ("rope_high_freq_factor", 8.0),
    ("rope_original_max_position_embeddings", 64)])
def test_llama3_rope_mismatch_names_field(llama3_dir, init_params, field, value):
  cfg = _model_cfg(**dict(LLAMA3_MODEL, **{field: value}))
  with pytest.raises(llama_init.LlamaConfigMismatch) as err:
    llama_init.load_llama_params(llama3_dir[0], cfg, init_params[True])
  assert err.value.field == f"model.{field}"
  assert str(value) in str(err.value)


def test_rope_type_mismatch_names_field(hf_dir, llama3_dir, init_params):
  """A llama3 checkpoint into a plain-RoPE config, and the reverse."""
  with pytest.raises(llama_init.LlamaConfigMismatch) as err:
    llama_init.load_llama_params(llama3_dir[0], _model_cfg(rope_theta=100.0),
                                 init_params[True])
  assert err.value.field == "model.rope_type" and "llama3" in str(err.value)
  with pytest.raises(llama_init.LlamaConfigMismatch) as err:
    llama_init.load_llama_params(hf_dir[0], _model_cfg(**dict(LLAMA3_MODEL, rope_theta=5e5)),
                                 init_params[True])
  assert err.value.field == "model.rope_type"


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
@pytest.mark.parametrize("style", ["hub", "transformers5"])
def test_other_rope_types_raise(tmp_path, hf_dir, init_params, kind, style):
  scaling = {"rope_type": kind, "factor": 4.0, "original_max_position_embeddings": 8192}
  def edit(cfg):
    if style == "hub":
      cfg.pop("rope_parameters", None)
      cfg.update(rope_theta=5e5, rope_scaling=scaling)
    else:
      cfg["rope_parameters"] = dict(scaling, rope_theta=5e5)
  _rewrite(hf_dir[0], tmp_path, lambda t: None)
  _edit_config(tmp_path, edit)
  with pytest.raises(llama_init.RopeScalingError,
                     match=f"rope_type '{kind}' is not implemented"):
    llama_init.load_llama_params(tmp_path, _model_cfg(), init_params[True])


def test_init_from_config_section(hf_dir, init_params):
  """The `init` section of experiments/csgo_3b.py: empty llama_dir is a no-op."""
  cfg = _model_cfg(scan_layers=True)
  old = init_params[True]
  assert llama_init.init_from_config({"llama_dir": ""}, cfg, old) is old
  got = llama_init.init_from_config(
      {"llama_dir": str(hf_dir[0]), "video_tower_from_llama": True}, cfg, old, log=None)
  want = llama_init.load_llama_params(hf_dir[0], cfg, old, video_tower_from_llama=True)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # The old opt-in to plain RoPE is gone (the scaling is implemented): a clear error.
  with pytest.raises(ConfigError, match="init.ignore_rope_scaling"):
    llama_init.init_from_config({"llama_dir": str(hf_dir[0]), "ignore_rope_scaling": True},
                                cfg, old, log=None)


def test_sharded_params_keep_their_shardings(hf_dir, init_params):
  """Params already placed on a mesh (as the trainer's sharded init leaves them) come back
  on the same NamedShardings."""
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 8 fake CPU devices)")
  mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  P = jax.sharding.PartitionSpec
  def place(x):  # split the second-to-last axis over 2 devices where it divides
    split = x.ndim >= 2 and x.shape[-2] % 2 == 0
    spec = P(*([None] * (x.ndim - 2)), "fsdp", None) if split else P()
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  cfg = _model_cfg(scan_layers=True)
  placed = jax.tree.map(place, init_params[True])
  got = llama_init.load_llama_params(hf_dir[0], cfg, placed)
  want = llama_init.load_llama_params(hf_dir[0], cfg, init_params[True])
  for g, p, w in zip(jax.tree.leaves(got), jax.tree.leaves(placed), jax.tree.leaves(want)):
    assert g.sharding == p.sharding
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
