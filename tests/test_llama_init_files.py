"""Damaged Llama checkpoint files: named errors, never a silent load (no torch needed).

The checkpoints are written with `safetensors.numpy` at toy sizes; the params tree is a
plain dict with the paths and shapes `llama_init` fills (the numerics are covered by
test_llama_init.py, which needs the `reference` extra).
"""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from tv2tv_jax import llama_init
from tv2tv_jax.config import ModelConfig

HF_CONFIG = dict(model_type="llama", hidden_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                 intermediate_size=32, vocab_size=40, rope_theta=5e5, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
BAD = "model.layers.0.mlp.up_proj.weight"


def _model_cfg() -> ModelConfig:
  return ModelConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=8, mlp_dim=32, rope_theta=5e5, norm_eps=1e-5,
                     latent_shape=(4, 4, 4), patch_size=2, unet_channels=8, unet_groups=4,
                     time_embed_dim=8)


def _spec():
  return llama_init.LlamaSpec(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"},
                              rope_scaling=None)


def _tensors(dtype=np.float32) -> dict[str, np.ndarray]:
  """Every tensor of the toy checkpoint in HF layout, small random values."""
  s, rng = _spec(), np.random.default_rng(0)
  shapes = {"model.embed_tokens.weight": (s.vocab_size, s.hidden_size),
            "lm_head.weight": (s.vocab_size, s.hidden_size),
            "model.norm.weight": (s.hidden_size,)}
  for suffix, (_, shape, _) in llama_init._layer_table(s).items():
    shapes.update({f"model.layers.{i}.{suffix}": shape for i in range(s.num_hidden_layers)})
  return {k: (0.1 * rng.standard_normal(v)).astype(dtype) for k, v in shapes.items()}


def _params() -> dict:
  """A scanned TV2TV params tree (text tower only) of zeros with the shapes loaded into."""
  s = _spec()
  layers = {}
  for _, (sub, shape, convert) in llama_init._layer_table(s).items():
    layers.setdefault(sub[0], {})[sub[1]] = np.zeros(
        (s.num_hidden_layers, *convert(np.zeros(shape)).shape), np.float32)
  return {"embed": {"embedding": np.zeros((s.vocab_size, s.hidden_size), np.float32)},
          "lm_head": {"kernel": np.zeros((s.hidden_size, s.vocab_size), np.float32)},
          "text_norm": {"scale": np.zeros((s.hidden_size,), np.float32)},
          "stack": {"layers": {"text": layers}}}


def _write(path, tensors=None, config=None) -> str:
  os.makedirs(path, exist_ok=True)
  save_file(_tensors() if tensors is None else tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(HF_CONFIG if config is None else config, f)
  return os.fspath(path)


def _load(path):
  return llama_init.load_llama_params(path, _model_cfg(), _params())


def test_clean_toy_checkpoint_loads(tmp_path):
  """The fixture itself is valid: every tensor lands where the damaged tests expect."""
  want = _tensors()
  out = _load(_write(tmp_path))
  np.testing.assert_array_equal(out["stack"]["layers"]["text"]["ffn"]["w_up"][0], want[BAD].T)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_nonfinite_tensor_names_file_and_tensor(tmp_path, dtype):
  tensors = _tensors(dtype)
  flat = tensors[BAD].reshape(-1)
  flat[[3, 7, 30]] = np.array([np.nan, np.inf, -np.inf], np.float32).astype(dtype)
  path = _write(tmp_path, tensors)
  with pytest.raises(llama_init.NonFiniteTensorError) as err:
    _load(path)
  assert str(err.value) == (f"{os.path.join(path, 'model.safetensors')}: {BAD} holds 3 "
                            f"NaN/inf values (of {flat.size})")
  assert isinstance(err.value, llama_init.LlamaInitError)


@pytest.mark.parametrize("keep", [-4, 0.5, 10, 0])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
  path = _write(tmp_path)
  st = os.path.join(path, "model.safetensors")
  with open(st, "rb") as f:
    data = f.read()
  cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
  with open(st, "wb") as f:
    f.write(data[:cut])
  with pytest.raises(llama_init.CheckpointFileError) as err:
    _load(path)
  assert str(err.value).startswith(f"{st}: cannot open as safetensors")
  assert err.value.__cause__ is not None  # the safetensors error is kept


def test_config_json_that_is_not_json_names_the_file(tmp_path):
  path = _write(tmp_path)
  config = os.path.join(path, "config.json")
  with open(config, "w") as f:
    f.write(json.dumps(HF_CONFIG)[:-20])  # truncated
  with pytest.raises(llama_init.CheckpointFileError, match=rf"^{config}: not valid JSON"):
    _load(path)
  with open(config, "w") as f:
    f.write("[]")
  with pytest.raises(llama_init.CheckpointFileError, match=rf"^{config}: expected a JSON "
                     "object, found a list"):
    _load(path)
  _write(tmp_path, config={k: v for k, v in HF_CONFIG.items() if k != "hidden_size"})
  with pytest.raises(llama_init.LlamaInitError, match=rf"^{config}: lacks the field "
                     "'hidden_size'"):
    _load(path)


def test_index_that_is_not_json_names_the_file(tmp_path):
  path = _write(tmp_path)
  index = os.path.join(path, llama_init.INDEX_FILE)
  with open(index, "w") as f:
    f.write('{"weight_map": {"model.norm.weight": ')
  with pytest.raises(llama_init.CheckpointFileError, match=rf"^{index}: not valid JSON"):
    _load(path)
