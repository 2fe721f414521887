"""RoPE frequencies with Llama-3.1's "llama3" scaling, its config fields, and the Llama
checkpoint checks of rope types (no torch needed; tests/test_llama_init.py compares the
logits with transformers)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from tv2tv_jax import config as config_lib
from tv2tv_jax import layers, llama_init
from tv2tv_jax.config import ConfigError, Llama3RopeScaling, ModelConfig

# head_dim 16, theta 100: wavelengths 2*pi*100^(i/8) = 6.3, 11, 20, 35, 63, ...; context 32
# with low 1 / high 4 splits them into kept (< 8), interpolated (8..32) and divided (> 32).
SCALING = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=32)
LLAMA3_FIELDS = dict(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_position_embeddings=32)


def test_llama3_inverse_frequencies_follow_three_bands():
  plain = np.asarray(layers.rope_inv_freq(16, 100.0))
  np.testing.assert_allclose(plain, 100.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
  scaled = np.asarray(layers.rope_inv_freq(16, 100.0, SCALING))
  wavelen = 2 * math.pi / plain
  kept = wavelen < 32 / 4
  divided = wavelen > 32 / 1
  between = ~kept & ~divided
  assert kept.sum() == 1 and between.sum() == 2 and divided.sum() == 5
  np.testing.assert_array_equal(scaled[kept], plain[kept])
  np.testing.assert_allclose(scaled[divided], plain[divided] / 8, rtol=1e-6)
  # In between: a blend weighted by where the wavelength sits, strictly inside the bounds.
  s = (32 / wavelen[between] - 1) / (4 - 1)
  assert np.all((s > 0) & (s < 1))
  np.testing.assert_allclose(scaled[between], (1 - s) * plain[between] / 8 + s * plain[between],
                             rtol=1e-6)
  assert np.all(scaled[between] < plain[between])
  assert np.all(scaled[between] > plain[between] / 8)
  # Frequencies stay ordered (longest wavelengths last).
  assert np.all(np.diff(scaled) < 0)


def test_llama3_bands_meet_continuously():
  """On a band edge the interpolation equals the outer band: s=0 at context/low (divided),
  s=1 at context/high (kept)."""
  for edge, want in ((32 / 1, 1 / 8), (32 / 4, 1.0)):
    theta = (edge / (2 * math.pi)) ** (16 / 2)  # puts frequency i=1 of head_dim 16 on the edge
    plain = np.asarray(layers.rope_inv_freq(16, theta))
    scaled = np.asarray(layers.rope_inv_freq(16, theta, SCALING))
    np.testing.assert_allclose(2 * math.pi / plain[1], edge, rtol=1e-5)
    np.testing.assert_allclose(scaled[1], plain[1] * want, rtol=1e-4)


def test_factor_one_is_plain_rope():
  one = Llama3RopeScaling(1.0, 1.0, 4.0, 32)
  np.testing.assert_allclose(layers.rope_inv_freq(16, 100.0, one),
                             layers.rope_inv_freq(16, 100.0), rtol=1e-6)


def test_apply_rope_rotates_by_scaled_frequencies():
  """x = e_i in the first half at position p comes out as (cos, sin)(p * f_i) in pair i."""
  dh, p = 16, 21
  freq = np.asarray(layers.rope_inv_freq(dh, 100.0, SCALING))
  x = jnp.eye(dh // 2, dh)[None]  # [1, 8, dh]: row i is e_i (first half)
  out = np.asarray(layers.apply_rope(x[:, :, None, :], jnp.full((1, dh // 2), p), 100.0,
                                     SCALING))[0, :, 0]
  i = np.arange(dh // 2)
  np.testing.assert_allclose(out[i, i], np.cos(p * freq), atol=1e-5)
  np.testing.assert_allclose(out[i, i + dh // 2], np.sin(p * freq), atol=1e-5)


def test_model_config_rope_scaling_property():
  assert ModelConfig().rope_scaling is None
  assert ModelConfig(**LLAMA3_FIELDS).rope_scaling == SCALING


def _validate_model(**model):
  return config_lib.experiment_from_config_dict({"model": model})


@pytest.mark.parametrize("model,field", [
    (dict(rope_type="yarn"), "model.rope_type"),
    (dict(rope_type="linear"), "model.rope_type"),
    (dict(rope_factor=8.0), "model.rope_factor"),  # scaling numbers without rope_type
    (dict(rope_original_max_position_embeddings=4096),
     "model.rope_original_max_position_embeddings"),
    (dict(LLAMA3_FIELDS, rope_factor=0.5), "model.rope_factor"),
    (dict(LLAMA3_FIELDS, rope_low_freq_factor=0.0), "model.rope_low_freq_factor"),
    (dict(LLAMA3_FIELDS, rope_high_freq_factor=1.0), "model.rope_high_freq_factor"),
    (dict(LLAMA3_FIELDS, rope_original_max_position_embeddings=32.5),
     "model.rope_original_max_position_embeddings"),
    (dict(rope_theta=0.0), "model.rope_theta"),
])
def test_bad_rope_fields_are_named(model, field):
  with pytest.raises(ConfigError) as err:
    _validate_model(**model)
  assert err.value.field == field


def test_unknown_rope_type_message():
  with pytest.raises(ConfigError, match="'yarn'.*not implemented"):
    _validate_model(rope_type="yarn")
  assert _validate_model(**LLAMA3_FIELDS).model.rope_scaling == SCALING


def _llama_dir(tmp_path, **extra):
  cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=300,
             rms_norm_eps=1e-5, **extra)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  return tmp_path


_SHAPES = dict(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, norm_eps=1e-5)


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic", "longrope"])
def test_llama_checkpoint_with_other_rope_type_is_clear_error(tmp_path, kind):
  d = _llama_dir(tmp_path, rope_theta=5e5,
                 rope_scaling={"rope_type": kind, "factor": 4.0})
  spec = llama_init.read_llama_config(d)
  with pytest.raises(llama_init.RopeScalingError, match=f"rope_type '{kind}' is not implemented"):
    llama_init.check_config(spec, ModelConfig(rope_theta=5e5, **_SHAPES))


def test_llama_checkpoint_llama3_rope_is_checked_field_by_field(tmp_path):
  rope = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  spec = llama_init.read_llama_config(_llama_dir(tmp_path, rope_parameters=rope))
  llama_init.check_config(spec, ModelConfig(rope_theta=100.0, **LLAMA3_FIELDS, **_SHAPES))
  with pytest.raises(llama_init.LlamaConfigMismatch) as err:
    llama_init.check_config(spec, ModelConfig(rope_theta=100.0, **dict(
        LLAMA3_FIELDS, rope_factor=32.0), **_SHAPES))
  assert err.value.field == "model.rope_factor"
  incomplete = {k: v for k, v in rope.items() if k != "low_freq_factor"}
  spec = llama_init.read_llama_config(_llama_dir(tmp_path, rope_parameters=incomplete))
  with pytest.raises(llama_init.RopeScalingError, match="low_freq_factor"):
    llama_init.check_config(spec, ModelConfig(rope_theta=100.0, **LLAMA3_FIELDS, **_SHAPES))
