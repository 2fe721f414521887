"""The Flax Wan 2.1 VAE without the reference: shapes, causality, temporal tiles equal to
whole clips, the clamp, the safetensors converter's checks, config errors and the tokenizer
interface. (Agreement with diffusers: tests/test_wan_reference.py.)

Random weights at small widths (base_dim 8: widths 8, 16, 32, 32); every test runs on CPU in
seconds.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import pretrained_vae_checks as checks
from tv2tv_jax.config import ConfigError
from tv2tv_jax.vae import convert, pretrained, wan

SMALL = wan.WanConfig(base_dim=8, num_res_blocks=1)


def _params(cfg=SMALL, seed=0):
  """Random params with non-trivial RMS-norm gammas (init leaves them 1, which would hide a
  norm mapped to the wrong tensor)."""
  params = wan.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  def perturb(path, x):
    if path[-1].key == "gamma":
      return x * (1 + 0.3 * rng.standard_normal(x.shape).astype(np.float32))
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)


@pytest.fixture(scope="module")
def params():
  return _params()


_frames, _rel = checks.frames, checks.rel


def test_shapes_and_first_frame_alone(params):
  for frames in (1, 13):
    z = wan.encode(params, _frames(frames), SMALL)
    assert z.shape == (1, 1 + (frames - 1) // 4, 2, 3, 16)
    assert wan.decode(params, z, SMALL).shape == (1, frames, 16, 24, 3)
  with pytest.raises(ValueError, match="is not 1 \\+ 4k"):
    wan.encode(params, _frames(4), SMALL)
  with pytest.raises(ValueError, match="not a multiple"):
    wan.encode(params, _frames(1, h=12), SMALL)
  with pytest.raises(ValueError, match="tile_latents must be >= 1"):
    wan.encode(params, _frames(5), SMALL, tile_latents=0)


def test_encoder_and_decoder_are_causal(params):
  x = _frames(13)
  z = wan.encode(params, x, SMALL)
  z1 = wan.encode(params, x.at[:, 1].add(0.5), SMALL)  # frame 1 starts latent 1
  np.testing.assert_array_equal(z1[:, 0], z[:, 0])
  assert np.abs(np.asarray(z1[:, 1] - z[:, 1])).max() > 1e-3
  z2 = wan.encode(params, x.at[:, 6].add(0.5), SMALL)  # frame 6 is in latent 2 (frames 5..8)
  np.testing.assert_allclose(z2[:, :2], z[:, :2], atol=1e-6)
  assert np.abs(np.asarray(z2[:, 2] - z[:, 2])).max() > 1e-3
  d = wan.decode(params, z, SMALL)
  d2 = wan.decode(params, z.at[:, 2].add(0.5), SMALL)
  np.testing.assert_allclose(d2[:, :5], d[:, :5], atol=1e-6)
  assert np.abs(np.asarray(d2[:, 5:9] - d[:, 5:9])).max(axis=(0, 2, 3, 4)).min() > 1e-4


def test_decode_clamps_to_unit_range(params):
  """diffusers clamps decoded frames to [-1, 1]; a large conv_out bias saturates them."""
  z = wan.encode(params, _frames(13), SMALL)
  out = params["decoder"]["conv_out"]
  shifted = {**params, "decoder": {**params["decoder"], "conv_out": {
      **out, "bias": out["bias"] + jnp.array([5.0, -5.0, 0.0])}}}
  d = np.asarray(wan.decode(shifted, z, SMALL))
  assert (d[..., 0] == 1.0).all() and (d[..., 1] == -1.0).all()
  assert np.abs(d[..., 2]).max() <= 1.0 and np.abs(d[..., 2]).min() < 0.99


# Tiles of m latents. m = 1: the first tile is frame 0 alone, whose temporal resamplers run
# their convs on no frames; 17 frames in tiles of 2: [5, 8, 4] frames and [2, 2, 1] latents,
# so the first tile, the scan and a shorter last tile all run.
@pytest.mark.parametrize("frames,tile", [(13, 1), (17, 2)], ids=["single-latent", "remainder"])
def test_tiled_equals_untiled(params, frames, tile):
  """Causal state carried between tiles: conv pasts and the strided windows of the
  temporal downsamplers, the first frame's pass-through in the temporal resamplers."""
  x = _frames(frames, b=2)
  z = wan.encode(params, x, SMALL)
  zt = wan.encode(params, x, SMALL, tile_latents=tile)
  d = wan.decode(params, z, SMALL)
  dt = wan.decode(params, z, SMALL, tile_latents=tile)
  print(f"tiled vs whole clip: latents {_rel(zt, z):.1e}, frames {_rel(dt, d):.1e}")
  # Only the order of float32 sums differs (XLA blocks a tile's convs differently), and the
  # per-pixel RMS norms amplify it in pixels of small norm: in float64 the two agree to
  # 4e-15 (docs/vae.md), a wrong carried state is off by more than 1e-3.
  assert _rel(zt, z) < 2e-5 and _rel(dt, d) < 2e-5


# --------------------------------------------------------------------------- converter

def _write(path, cfg, tensors, class_name="AutoencoderKLWan", **extra):
  path.mkdir(parents=True, exist_ok=True)
  fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()
            if k != "dtype"}
  with open(path / "config.json", "w") as f:
    json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1",
               "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16, **fields, **extra}, f)
  save_file(tensors, str(path / convert.WEIGHTS_NAME))
  return path


@pytest.fixture(scope="module")
def state(params):
  return convert.to_state_dict(params)


def test_roundtrip_through_safetensors(tmp_path, params, state):
  # diffusers' names and PyTorch shapes; RMS-norm gammas keep their [C, 1, 1(, 1)] shape.
  for name, shape in [("encoder.down_blocks.0.norm1.gamma", (8, 1, 1, 1)),
                      ("encoder.mid_block.attentions.0.norm.gamma", (32, 1, 1)),
                      ("encoder.mid_block.attentions.0.to_qkv.weight", (96, 32, 1, 1)),
                      # down_blocks: resnet, resample, resnet, resample, resnet, resample, resnet
                      ("encoder.down_blocks.1.resample.1.weight", (8, 8, 3, 3)),
                      ("encoder.down_blocks.5.time_conv.weight", (32, 32, 3, 1, 1)),
                      ("decoder.up_blocks.0.upsamplers.0.time_conv.weight", (64, 32, 3, 1, 1)),
                      ("decoder.up_blocks.1.resnets.0.conv_shortcut.weight", (32, 16, 1, 1, 1)),
                      ("quant_conv.weight", (32, 32, 1, 1, 1)),
                      ("decoder.conv_out.weight", (3, 8, 3, 3, 3))]:
    assert state[name].shape == shape, name
  _write(tmp_path / "vae", SMALL, state)
  # A pipeline directory: the converter finds its vae/ subfolder.
  tok = pretrained.load_pretrained_tokenizer("wan", tmp_path)
  assert tok.config == SMALL
  jax.tree.map(np.testing.assert_array_equal, tok.params, jax.tree.map(np.asarray, params))


def _edit(state, fn):
  state = {k: v.copy() for k, v in state.items()}
  fn(state)
  return state


@pytest.mark.parametrize("error,edit,pattern", [
    (convert.MissingTensorError,
     lambda s: s.pop("decoder.up_blocks.1.upsamplers.0.time_conv.weight"),
     r"'decoder\.up_blocks\.1\.upsamplers\.0\.time_conv\.weight'.*missing"),
    (convert.UnexpectedTensorError,
     lambda s: s.update({"encoder.mid_block.attentions.0.norm.bias": np.zeros(32, np.float32)}),
     r"'encoder\.mid_block\.attentions\.0\.norm\.bias'"),
    (convert.TensorShapeError,
     lambda s: s.update({"encoder.down_blocks.0.norm1.gamma": np.ones((8,), np.float32)}),
     r"'encoder\.down_blocks\.0\.norm1\.gamma': expected shape \(8, 1, 1, 1\), found \(8,\)"),
    (convert.NonFiniteTensorError,
     lambda s: s["decoder.mid_block.resnets.1.norm2.gamma"].__setitem__((3, 0, 0, 0), np.nan),
     r"'decoder\.mid_block\.resnets\.1\.norm2\.gamma' holds 1 NaN"),
], ids=["missing", "extra", "misshaped", "nan"])
def test_converter_errors_name_the_tensor(tmp_path, state, error, edit, pattern):
  _write(tmp_path, SMALL, _edit(state, edit))
  with pytest.raises(error, match=pattern):
    pretrained.load_pretrained_tokenizer("wan", tmp_path)


def test_layout_follows_config(tmp_path, state):
  """Weights of one layout under another config.json: the difference is named."""
  _write(tmp_path, dataclasses.replace(SMALL, num_res_blocks=2), state)
  with pytest.raises(convert.MissingTensorError, match="is missing"):
    pretrained.load_pretrained_tokenizer("wan", tmp_path)


@pytest.mark.parametrize("change,field", [
    ({"use_quant_conv": True}, "wan.use_quant_conv"),
    ({"is_residual": True}, "wan.is_residual"),
    ({"patch_size": 2}, "wan.patch_size"),
    ({"temperal_downsample": [False, True]}, "wan.temperal_downsample"),
    ({"temperal_downsample": [True, True, True]}, "wan.temperal_downsample"),
    ({"scale_factor_spatial": 16}, "wan.scale_factor_spatial"),
    ({"base_dim": 0}, "wan.base_dim"),
    ({"dropout": 1.5}, "wan.dropout"),
    ({"attn_scales": [1.0]}, "wan.attn_scales"),
], ids=["unknown", "wan2.2-residual", "wan2.2-patch", "stages", "8x-time", "ratio", "width",
        "dropout", "down-attention"])
def test_config_errors_name_the_field(change, field):
  with pytest.raises(ConfigError, match=f"'{field}'"):
    wan.WanConfig.from_diffusers({"_class_name": "AutoencoderKLWan", **change})


def test_config_reads_published_and_saved_forms():
  published = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0.dev0",
               "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4], "dropout": 0.0,
               "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16, "num_res_blocks": 2,
               "temperal_downsample": [False, True, True], "z_dim": 16, "clip_output": False}
  cfg = wan.WanConfig.from_diffusers(published)
  assert cfg == wan.WAN_2_1
  assert (cfg.temporal_compression_ratio, cfg.spatial_compression_ratio,
          cfg.latent_channels) == (4, 8, 16)
  assert cfg.num_latents(17) == 5
  bf16 = wan.WanConfig.from_diffusers(published, dtype="bfloat16")
  # The saved form of a converted tokenizer (dataclasses.asdict, as JSON) reads back.
  assert wan.WanConfig.from_diffusers(json.loads(json.dumps(dataclasses.asdict(bf16)))) == bf16
  with pytest.raises(ConfigError, match="'wan.dtype'"):
    wan.WanConfig(dtype="float16")


def test_tokenizer_interface(tmp_path, state, params):
  _write(tmp_path, SMALL, state)
  with pytest.raises(convert.PretrainedVAEError, match="AutoencoderKLWan"):
    pretrained.load_pretrained_tokenizer("cosmos", tmp_path)
  tok = pretrained.load_pretrained_tokenizer("wan", tmp_path, tile_latents=2)
  assert (tok.temporal_factor, tok.spatial_factor, tok.latent_channels) == (4, 8, 16)
  assert tok.latent_shape(17, 128, 240) == (5, 16, 30, 16)
  x = _frames(17, b=2)
  np.testing.assert_allclose(tok.encode(x), wan.encode(params, x, SMALL, tile_latents=2),
                             rtol=1e-6, atol=1e-6)
