"""The causal video VAE: shapes, causality of encoder and decoder, config errors, training,
save/reload, latent normalisation statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import vae_toy_world
from tv2tv_jax.config import ConfigError
from tv2tv_jax.vae import model as vm
from tv2tv_jax.vae import train as vt, video_tokenizer

# Small but with every part present: 2 stages, patch 4 -> 8x spatial, 3 temporal taps.
SMALL = vm.VAEConfig(widths=(8, 16), patch_size=4, latent_channels=4, norm_groups=4,
                     kernel_t=3)


def _random_params(cfg, seed=0):
  """Init params plus noise, so zero-initialised convs also carry signal (a stricter test)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.1, p.shape).astype(np.float32),
                      vm.init_params(cfg, jax.random.key(seed)))


def _frames(b, t, seed=0):
  return jax.random.uniform(jax.random.key(seed), (b, t, 64, 64, 3), minval=-1, maxval=1)


def _chunk_of_frame(j):
  """Latent index whose group holds frame j (frame 0 alone, then groups of 4)."""
  return 0 if j == 0 else (j - 1) // 4 + 1


@pytest.fixture(scope="module")
def small_params():
  return _random_params(SMALL)


@pytest.mark.parametrize("k", [0, 3])  # batch 1, 13 frames: shares compiles with the tests below
def test_shapes_one_plus_4k_frames_to_one_plus_k_latents(small_params, k):
  frames = _frames(1, 1 + 4 * k)
  z = vm.encode(small_params, frames, SMALL)
  assert z.shape == (1, 1 + k, 8, 8, 4) and z.dtype == jnp.float32
  assert z.shape[1:] == SMALL.latent_shape(1 + 4 * k)
  out = vm.decode(small_params, z, SMALL)
  assert out.shape == frames.shape and out.dtype == jnp.float32


def test_default_config_latent_shape():
  cfg = vm.VAEConfig()
  assert cfg.spatial_factor == 8 and cfg.latent_shape(1 + 4 * 5) == (6, 8, 8, 16)
  with pytest.raises(ValueError, match="1 \\+ 4k"):
    cfg.num_latents(8)


def test_group_frames_inverts():
  x = np.random.default_rng(0).normal(size=(1, 9, 8, 8, 3)).astype(np.float32)
  g = vm.group_frames(x, 4, 2)
  assert g.shape == (1, 3, 4, 4, 48)
  # Channels are (time, dy, dx, rgb): group 0 holds frame 0 four times, group 1 frames 1..4.
  np.testing.assert_array_equal(g[0, 0, 0, 0].reshape(4, 2, 2, 3),
                                np.broadcast_to(x[0, 0, :2, :2], (4, 2, 2, 3)))
  np.testing.assert_array_equal(g[0, 1, 1, 2].reshape(4, 2, 2, 3), x[0, 1:5, 2:4, 4:6])
  # Group 0 is frame 0 four times; group 1 is frames 1..4.
  np.testing.assert_array_equal(vm.ungroup_frames(g, 4, 2, 3), x)
  np.testing.assert_array_equal(vm.ungroup_frames(g[:, :1], 4, 2, 3), x[:, :1])


@pytest.mark.parametrize("impl", vm.CONV_IMPLS)
def test_encoder_is_causal(small_params, impl):
  """Changing frame j changes no latent before j's chunk, and changes j's chunk latent."""
  cfg = dataclasses.replace(SMALL, conv_impl=impl)
  frames = _frames(1, 13)
  z = np.asarray(vm.encode(small_params, frames, cfg))
  for j in range(13):
    z2 = np.asarray(vm.encode(small_params, frames.at[:, j].set(-frames[:, j]), cfg))
    diff = np.abs(z2 - z).max(axis=(0, 2, 3, 4))
    c = _chunk_of_frame(j)
    np.testing.assert_allclose(diff[:c], 0.0, atol=1e-6, err_msg=f"frame {j} leaked back")
    assert diff[c] > 1e-3, f"frame {j} did not change latent {c}"


@pytest.mark.parametrize("impl", vm.CONV_IMPLS)
def test_decoder_is_causal(small_params, impl):
  """Changing latent j changes no frame before chunk j's frames, and changes chunk j's frames."""
  cfg = dataclasses.replace(SMALL, conv_impl=impl)
  z = jax.random.normal(jax.random.key(3), (1, 4, 8, 8, 4))
  out = np.asarray(vm.decode(small_params, z, cfg))
  for j in range(4):
    out2 = np.asarray(vm.decode(small_params, z.at[:, j].add(1.0), cfg))
    diff = np.abs(out2 - out).max(axis=(0, 2, 3, 4))
    first = 0 if j == 0 else 4 * j - 3  # first frame of chunk j
    np.testing.assert_allclose(diff[:first], 0.0, atol=1e-6, err_msg=f"latent {j} leaked back")
    assert diff[first:4 * j + 1].min() > 1e-3, f"latent {j} did not change its own frames"


def test_conv_impls_agree(small_params):
  frames = _frames(1, 13, seed=5)
  a = vm.encode(small_params, frames, dataclasses.replace(SMALL, conv_impl="conv3d"))
  b = vm.encode(small_params, frames, dataclasses.replace(SMALL, conv_impl="stacked2d"))
  np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8, 8, 6))
  conv = vm.CausalConv(5, kernel_t=3, stride=2)
  p = jax.jit(conv.init)(jax.random.key(1), x)
  y3 = jax.jit(vm.CausalConv(5, kernel_t=3, stride=2, impl="conv3d").apply)(p, x)
  np.testing.assert_allclose(jax.jit(conv.apply)(p, x), y3, atol=1e-5)
  assert y3.shape == (2, 5, 4, 4, 5)


@pytest.mark.parametrize("fields, name", [
    (dict(frame_size=60), "vae.frame_size"),
    (dict(frame_size=72, widths=(16, 32, 32, 32)), "vae.frame_size"),  # factor 16 vs 72
    (dict(norm_groups=3), "vae.norm_groups"),
    (dict(latent_channels=0), "vae.latent_channels"),
    (dict(conv_impl="fft"), "vae.conv_impl"),
    (dict(widths=()), "vae.widths"),
])
def test_vae_config_errors_name_the_field(fields, name):
  with pytest.raises(ConfigError) as err:
    vm.VAEConfig(**fields)
  assert err.value.field == name and f"'{name}'" in str(err.value)


def test_unknown_and_train_fields_raise():
  with pytest.raises(ConfigError, match="vae.widht"):
    vm.vae_config_from_dict({"widht": (8,)})
  with pytest.raises(ConfigError, match="train.eval_seed_start"):
    # training reaches seed 39
    vt.VAETrainConfig(num_steps=10, batch_size=4, warmup_steps=0, eval_seed_start=20)
  with pytest.raises(ConfigError, match="train.recon_loss"):
    vt.VAETrainConfig(recon_loss="l3")
  cfg = vae_toy_world.get_config("tiny")
  cfg.vae.frame_size = 32
  with pytest.raises(ConfigError, match="vae.frame_size"):
    vt.configs_from_config_dict(cfg)
  with pytest.raises(ValueError, match="unknown config variant"):
    vae_toy_world.get_config("huge")


@pytest.mark.parametrize("variant", ["tiny", "quick", "long", "default"])
def test_experiment_variants_build(variant):
  vae_cfg, train_cfg = vt.configs_from_config_dict(vae_toy_world.get_config(variant))
  assert vae_cfg.latent_size * vae_cfg.spatial_factor == 64
  assert train_cfg.eval_seed_start >= train_cfg.num_steps * train_cfg.batch_size


def test_training_data_is_deterministic_and_disjoint():
  cfg = vt.VAETrainConfig(batch_size=2, clip_chunks=1, num_steps=3, warmup_steps=0)
  batches = list(vt.train_batches(cfg))
  assert len(batches) == 3 and batches[0][0].shape == (2, 5, 64, 64, 3)
  np.testing.assert_array_equal(batches[2][0], vt.clip_frames([4, 5], 1))
  assert batches[0][0].min() >= -1 and batches[0][0].max() <= 1
  # The foreground is the sprites: every frame has the agent (16 px), nothing else static.
  frames, fg = batches[0]
  assert fg.shape == frames.shape[:-1]
  assert (fg.sum((2, 3)) >= 16).all() and (fg.sum((2, 3)) < 64).all()
  assert not set(vt.step_seeds(cfg, 0)) & set(vt.step_seeds(cfg, 1))


def test_psnr_and_kl_formulas():
  # MSE 0.004 on [-1, 1] pixels = 0.001 on [0, 1] pixels = 30 dB.
  assert float(vt.psnr_from_mse(0.004)) == pytest.approx(30.0, abs=1e-4)
  assert float(vm.kl_divergence(jnp.zeros(()), jnp.zeros(()))) == 0.0
  assert float(vm.kl_divergence(jnp.ones(()), jnp.zeros(()))) == pytest.approx(0.5)
  u8 = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(video_tokenizer.to_uint8(video_tokenizer.to_float(u8)), u8)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One end-to-end tiny run (train, eval, stats, save); shared by the tests below."""
  cfg = vae_toy_world.get_config("tiny")
  cfg.train.num_steps = 6
  workdir = str(tmp_path_factory.mktemp("vae_tiny"))
  summary = vt.train_vae(cfg, workdir, log=lambda *_: None)
  return workdir, summary


def test_tiny_training_reduces_loss(tiny_run):
  _, summary = tiny_run
  losses = [r["loss"] for r in summary["records"]]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert losses[-1] < 0.85 * losses[0], losses
  ev = summary["eval"]
  assert ev["num_clips"] == 2 and np.isfinite(ev["psnr_mean"]) and ev["psnr_min"] <= ev["psnr_mean"]


def test_save_reload_gives_identical_outputs(tiny_run):
  workdir, summary = tiny_run
  tok = video_tokenizer.load_tokenizer(workdir)
  assert tok.config == summary["vae_config"]
  frames = vt.clip_frames([123, 124], 2)  # the eval batch shape: reuses its compile
  z_ref = vm.encode(summary["params"], frames, summary["vae_config"])
  z = tok.encode(frames)
  np.testing.assert_array_equal(z, z_ref)
  np.testing.assert_array_equal(tok.decode(z), vm.decode(summary["params"], z_ref, tok.config))
  np.testing.assert_array_equal(tok.stats.mean, summary["stats"].mean)


def test_latent_stats_round_trip(tiny_run):
  workdir, summary = tiny_run
  tok = video_tokenizer.load_tokenizer(workdir)
  cfg = vae_toy_world.get_config("tiny")
  seeds = range(cfg.train.stats_clips)
  stats = vt.compute_latent_stats(tok.config, tok.params, seeds, cfg.train.eval_chunks,
                                  cfg.train.eval_batch)
  np.testing.assert_allclose(stats.mean, summary["stats"].mean, atol=1e-6)
  assert stats.mean.shape == stats.std.shape == (tok.config.latent_channels,)
  # Normalised latents of the same clips have zero mean and unit std per channel.
  z = tok.encode(vt.clip_frames(seeds, cfg.train.eval_chunks), normalized=True)
  flat = np.asarray(z).reshape(-1, tok.config.latent_channels)
  np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-3)
  np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-3)
  # normalize and denormalize are inverse; the JSON form loses nothing.
  np.testing.assert_allclose(vm.denormalize(vm.normalize(z, stats), stats), z, atol=1e-5)
  again = vm.LatentStats.from_json(stats.to_json())
  np.testing.assert_array_equal(again.std, stats.std)
  np.testing.assert_allclose(tok.decode(z, normalized=True),
                             tok.decode(vm.denormalize(z, tok.stats)), atol=1e-6)
