"""Configs: every variant builds; configs that cannot work fail naming the field."""

import pytest

from experiments import toy_world
from tv2tv_jax import config as config_lib, sequence


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
