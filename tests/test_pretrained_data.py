"""A pretrained video tokenizer through the whole chain: `data.vae_kind='cosmos'` prepares the
toy world with converted diffusers weights (random, small widths: nothing is downloaded),
the model trains on its latents, and generation decodes with the same tokenizer, refusing
any other (slow tier). Plus, in the default tier, the tokenizer store and its identity
check, and the config errors that stop a run before any stage builds."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import vae_fixtures
from data_pipelines import latent_dataset, preparation
from experiments import toy_world
from tv2tv_jax import config as config_lib, run_state, trainer, video_samples
from tv2tv_jax.vae import pretrained, tokenizer_store, video_tokenizer

NUM_CHUNKS = 2


def _config(weights_dir, data_dir, **data):
  c = toy_world.get_config("tiny")
  c.model.latent_shape = (8, 8, 16)  # 64x64 frames, 8x8 in space, Cosmos's 16 channels
  c.seq.update(text_len=48, max_chunks=6)
  c.train.update(num_steps=2, log_every=1)
  c.data.update(dict(dict(
      source="toy_world", data_dir=str(data_dir), vae_kind="cosmos", vae_dir=str(weights_dir),
      vae_stats_clips=3, toy_world=dict(name="pretrained_test", num_train=6, num_validation=2,
                                        num_chunks=NUM_CHUNKS, caption_mode="dense")), **data))
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("cosmos_run")
  weights = vae_fixtures.write_random(root / "cosmos", "cosmos", vae_fixtures.COSMOS_SMALL)
  cfg = _config(weights, root / "data")
  markers = preparation.prepare(str(root / "data"), cfg, log=lambda _: None)
  trainer.train(cfg, str(root / "run"), log=lambda _: None)
  return root, cfg, markers


@pytest.mark.slow
def test_prepare_converts_and_encodes_with_the_pretrained_tokenizer(run):
  root, cfg, markers = run
  data_dir = root / "data"
  assert markers["vae"]["kind"] == "cosmos"
  assert markers["vae"]["latent_shape"] == [1 + NUM_CHUNKS, 8, 8, 16]
  assert tokenizer_store.kind_of(data_dir / "vae") == "cosmos"
  tok = tokenizer_store.load(data_dir / "vae")
  direct = pretrained.load_pretrained_tokenizer("cosmos", root / "cosmos")
  assert tok.config == direct.config
  meta = json.loads((data_dir / "latents" / "meta.json").read_text())
  assert meta["latent_shape"] == [8, 8, 16]
  assert meta["encoder_info"]["kind"] == "cosmos"

  # The stored latents are the converted tokenizer's, normalised by the saved statistics.
  src = latent_dataset.data_source(str(data_dir / "latents"), "train")
  record = latent_dataset.parse_record(src[0])
  builder = preparation._builder(config_lib.as_run_config(cfg), str(data_dir / "tfds"))
  frames = next(ex["frames"] for ex in builder.as_data_source(split="train")
                if latent_dataset.clip_fields(ex, 1 + 4 * NUM_CHUNKS)[0]["name"] == record["name"])
  want = direct.encode(video_tokenizer.to_float(frames)[None])
  want = (np.asarray(want) - tok.stats.mean) / tok.stats.std
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(record["latents"], want[0], atol=1e-5 * scale)

  # Statistics of the first 3 training clips: the latents of those clips are ~unit scale.
  clips = [video_tokenizer.to_float(np.asarray(ex["frames"]))
           for ex in list(builder.as_data_source(split="train"))[:3]]
  z = np.asarray(direct.encode(np.stack(clips)))
  np.testing.assert_allclose(tok.stats.mean, z.reshape(-1, 16).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_generation_decodes_with_the_tokenizer_that_encoded(run, tmp_path):
  root, _, _ = run
  assets = run_state.load_assets(str(root / "run"))
  assert isinstance(assets.video, pretrained.PretrainedTokenizer)
  # Decoding = the converted weights' decode of the latents de-normalised by the stats
  # the data was encoded with.
  direct = pretrained.load_pretrained_tokenizer("cosmos", root / "cosmos")
  z = np.random.default_rng(0).standard_normal((1 + NUM_CHUNKS, 8, 8, 16)).astype(np.float32)
  got = video_samples.decode_frames(assets, z[0], z[1:])
  stats = assets.video.stats
  want = video_tokenizer.to_uint8(direct.decode((z * stats.std + stats.mean)[None])[0])
  assert got.shape == (1 + 4 * NUM_CHUNKS, 64, 64, 3)
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # rounding at .5 only

  paths = video_samples.generate_to_dir(str(root / "run"), ["toy world"], {0: "left fire"},
                                        NUM_CHUNKS, cfg_scale=2.0, ode_steps=2, seed=0,
                                        out_dir=str(tmp_path), assets=assets)
  doc = json.load(open(tmp_path / "sample.json"))
  # A 2-step model may end (EOS) after the forced chunk 0, never before it.
  assert doc["chunks"][0]["forced"] and doc["chunks"][0]["text"] == "left fire"
  assert any(p.endswith("sample.gif") for p in paths)


@pytest.mark.slow
def test_a_different_tokenizer_is_refused_at_decode(run, tmp_path):
  root, _, _ = run
  data_dir = tmp_path / "data"
  shutil.copytree(root / "data", data_dir)
  # Same kind and config, other weights: the latents were not encoded by these.
  other = pretrained.load_pretrained_tokenizer(
      "cosmos", vae_fixtures.write_random(tmp_path / "other", "cosmos",
                                          vae_fixtures.COSMOS_SMALL, seed=5))
  stats = tokenizer_store.load(data_dir / "vae").stats
  shutil.rmtree(data_dir / "vae")
  tokenizer_store.save_pretrained(data_dir / "vae", dataclasses.replace(other, stats=stats))
  exp = config_lib.as_run_config(run[1]).exp
  with pytest.raises(tokenizer_store.TokenizerMismatchError, match="latents/meta.json.*cosmos"):
    run_state.load_tokenizers(str(data_dir), exp)


def test_store_round_trip_and_identity_check(tmp_path):
  """save_pretrained -> load gives the same tokenizer; the identity check passes for the
  weights that encoded and names both sides for any other (default tier: no training)."""
  tok = pretrained.load_pretrained_tokenizer("cosmos", vae_fixtures.write_random(
      tmp_path / "w", "cosmos", vae_fixtures.COSMOS_SMALL))
  stats = video_tokenizer.LatentStats(np.arange(16, dtype=np.float32),
                                      np.full(16, 2.0, np.float32))
  tokenizer_store.save_pretrained(tmp_path / "vae", dataclasses.replace(tok, stats=stats))
  back = tokenizer_store.load(tmp_path / "vae")
  assert back.config == tok.config and back.kind == "cosmos"
  np.testing.assert_array_equal(back.stats.mean, stats.mean)
  jax_equal = [np.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (back.params,
                                                                          tok.params)))]
  assert all(jax_equal)
  ident = tokenizer_store.identity(tmp_path / "vae")
  tokenizer_store.check_matches(tmp_path / "vae", ident, "meta.json")
  with pytest.raises(tokenizer_store.TokenizerMismatchError, match="own tokenizer"):
    tokenizer_store.check_matches(tmp_path / "vae", {"params_sha256": ident["params_sha256"]},
                                  "meta.json")  # no kind recorded: our own VAE's latents
  with pytest.raises(tokenizer_store.TokenizerMismatchError, match="0000"):
    tokenizer_store.check_matches(tmp_path / "vae", dict(ident, params_sha256="0000"),
                                  "meta.json")
  with pytest.raises(FileNotFoundError, match="no video tokenizer"):
    tokenizer_store.load(tmp_path / "w")


def test_config_errors_name_the_field(tmp_path):
  weights = vae_fixtures.write_random(tmp_path / "cosmos", "cosmos", vae_fixtures.COSMOS_SMALL)
  data_dir = tmp_path / "data"

  def error(cfg):
    with pytest.raises(config_lib.ConfigError) as e:
      preparation.prepare(str(data_dir), cfg, log=lambda _: None)
    return str(e.value)

  assert "data.vae_kind" in error(_config(weights, data_dir, vae_kind="cosmo"))
  assert "did you mean 'cosmos'" in error(_config(weights, data_dir, vae_kind="cosmo"))
  assert "data.vae_dir" in error(_config(tmp_path / "absent", data_dir))
  narrow = _config(weights, data_dir)
  narrow.model.latent_shape = (8, 8, 8)
  assert "model.latent_shape" in error(narrow)
  assert "data.vae_stats" in error(_config(weights, data_dir, vae_stats="published"))
  cv8 = vae_fixtures.write_random(tmp_path / "cv8", "cosmos", dataclasses.replace(
      vae_fixtures.COSMOS_SMALL, temporal_compression_ratio=8))
  assert "4 frames" in error(_config(cv8, data_dir))
  assert not data_dir.exists() or not os.listdir(data_dir)  # nothing was built


def test_published_statistics_are_used_when_asked(tmp_path):
  mean, std = [0.1 * i for i in range(16)], [1.0 + 0.05 * i for i in range(16)]
  weights = vae_fixtures.write_random(tmp_path / "cosmos", "cosmos", vae_fixtures.COSMOS_SMALL,
                                      latents_mean=mean, latents_std=std)
  stats = tokenizer_store.published_stats(weights, "AutoencoderKLCosmos", 16)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(stats.std, std, rtol=1e-6)
  cfg = config_lib.as_run_config(_config(weights, tmp_path / "data", vae_stats="published"))
  preparation.check_config(cfg)  # accepted
  settings = preparation.stage_settings(cfg)["vae"]
  assert settings["kind"] == "cosmos" and settings["stats"] == "published"
  assert "tfds" not in settings  # published statistics do not depend on the clips


def test_vae_kinds_agree_with_the_registry():
  assert config_lib.VAE_KINDS == tokenizer_store.KINDS
