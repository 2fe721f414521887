"""The Flax Cosmos tokenizer without the reference: Haar patching, causality, temporal tiles
equal to whole clips, batch sharding, the safetensors converter's checks, and the
tokenizer interface. (Agreement with diffusers: tests/test_cosmos_reference.py.)

Random weights at small widths; every test runs on CPU in seconds.
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
from tv2tv_jax.vae import convert, cosmos, pretrained

# Small widths; resolution 128 with patch 4 puts attention in the first down block (and the
# last up block) too, so the block-level attention path is exercised, not only the mid block.
SMALL = dict(encoder_block_out_channels=(8, 16, 16, 16), decode_block_out_channels=(8, 16, 16, 16),
             num_layers=1, resolution=128)
CV4 = cosmos.CosmosConfig(temporal_compression_ratio=4, **SMALL)
CV8 = cosmos.CosmosConfig(temporal_compression_ratio=8, **SMALL)


def _params(cfg, seed=0):
  """Random params with non-trivial norm affines (init leaves scale 1 and bias 0, which
  would hide a norm mapped to the wrong tensor)."""
  params = cosmos.init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  def perturb(path, x):
    name = path[-1].key
    if name in ("scale", "bias"):
      return x + 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return x
  return jax.tree_util.tree_map_with_path(perturb, params)


_frames, _rel = checks.frames, checks.rel


def test_haar_is_invertible_and_scaled():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 8, 8, 3)), jnp.float32)
  y = cosmos.patchify(x, 4, "haar")
  assert y.shape == (2, 1, 2, 2, 192)
  np.testing.assert_allclose(cosmos.unpatchify(y, 4, "haar"), x, atol=1e-5)
  # A constant voxel lands in band 0 only, at 1/8 of the signed sum per level: c * 8/8.
  const = cosmos.haar_dwt(jnp.full((1, 2, 2, 2, 1), 3.0))
  np.testing.assert_allclose(const[0, 0, 0, 0], [3.0] + [0.0] * 7, atol=1e-6)
  r = cosmos.patchify(x, 2, "rearrange")
  np.testing.assert_array_equal(cosmos.unpatchify(r, 2, "rearrange"), x)


def test_shapes_and_first_frame_alone():
  cfg, params = CV4, _params(CV4)
  t = cfg.temporal_compression_ratio
  for frames in (1, 1 + 2 * t):
    z = cosmos.encode(params, _frames(frames), cfg)
    assert z.shape == (1, 1 + (frames - 1) // t, 2, 3, 16)
    assert cosmos.decode(params, z, cfg).shape == (1, frames, 16, 24, 3)
  with pytest.raises(ValueError, match="is not 1 \\+"):
    cosmos.encode(params, _frames(t), cfg)
  with pytest.raises(ValueError, match="not a multiple"):
    cosmos.encode(params, _frames(1, h=12), cfg)
  with pytest.raises(ValueError, match="tile_latents must be >= 1"):
    cosmos.encode(params, _frames(5), cfg, tile_latents=0)


def test_encoder_and_decoder_are_causal():
  cfg, params = CV4, _params(CV4)
  x = _frames(13)
  z = cosmos.encode(params, x, cfg)
  x2 = x.at[:, 6].add(0.5)  # frame 6 is in chunk 2 (frames 5..8)
  z2 = cosmos.encode(params, x2, cfg)
  np.testing.assert_allclose(z2[:, :2], z[:, :2], atol=1e-6)
  assert np.abs(np.asarray(z2[:, 2] - z[:, 2])).max() > 1e-3
  d = cosmos.decode(params, z, cfg)
  d2 = cosmos.decode(params, z.at[:, 2].add(0.5), cfg)
  np.testing.assert_allclose(d2[:, :5], d[:, :5], atol=1e-6)
  assert np.abs(np.asarray(d2[:, 5:9] - d[:, 5:9])).max(axis=(0, 2, 3, 4)).min() > 1e-4


# Tiles of m latents: [2, 2, 2] (the last two through the scan) and [4, 2] (a shorter last
# tile); CV8x8x8 adds the strided temporal down/upsampling (slow tier: more compiles).
@pytest.mark.parametrize("cfg,tile", [
    (CV4, 2), pytest.param(CV4, 4, marks=pytest.mark.slow),
    pytest.param(CV8, 2, marks=pytest.mark.slow)],
    ids=["CV4x8x8-even", "CV4x8x8-remainder", "CV8x8x8"])
def test_tiled_equals_untiled(cfg, tile):
  """Causal state carried between tiles: conv pasts, strided windows, attention caches."""
  params = _params(cfg)
  x = _frames(1 + 5 * cfg.temporal_compression_ratio, b=2)
  z = cosmos.encode(params, x, cfg)
  zt = cosmos.encode(params, x, cfg, tile_latents=tile)
  d = cosmos.decode(params, z, cfg)
  dt = cosmos.decode(params, z, cfg, tile_latents=tile)
  print(f"tiled vs whole clip: latents {_rel(zt, z):.1e}, frames {_rel(dt, d):.1e}")
  # Only the order of float32 sums differs (the attention cache is masked, not shorter).
  assert _rel(zt, z) < 1e-5 and _rel(dt, d) < 1e-5


def test_tiles_need_the_carried_state():
  """The counterpart without state: the frames of a second tile (with the frame before them
  as the first frame) encoded as a clip of their own give other latents, so the equality
  above depends on the carried state."""
  params = _params(CV4)
  x = _frames(13)
  z = cosmos.encode(params, x, CV4)
  fresh = cosmos.encode(params, x[:, 4:], CV4)  # frames 4..12: latents of 5..8, 9..12 follow
  assert _rel(fresh[:, 1:], z[:, 2:]) > 1e-3


def test_batch_sharded_encode_matches():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices (tests/conftest.py sets 8 fake CPU devices)")
  cfg, params = CV4, _params(CV4)
  x = _frames(5, b=2)
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:2])
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  z = cosmos.encode(params, sharded, cfg)
  assert z.sharding.spec[0] == "data"
  np.testing.assert_allclose(z, cosmos.encode(params, x, cfg), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- converter

def _write(path, cfg, tensors, class_name="AutoencoderKLCosmos"):
  path.mkdir(parents=True, exist_ok=True)
  fields = {k: v for k, v in cfg.__dict__.items() if k != "dtype"}
  with open(path / "config.json", "w") as f:
    json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1", "scaling_factor": 1.0,
               "latents_mean": None, "latents_std": None, **fields}, f)
  save_file(tensors, str(path / convert.WEIGHTS_NAME))
  return path


@pytest.fixture(scope="module")
def cv4_state():
  params = _params(CV4, seed=1)
  return params, convert.to_state_dict(params)


def test_roundtrip_through_safetensors(tmp_path, cv4_state):
  params, state = cv4_state
  assert "encoder.down_blocks.0.resnets.0.norm1.norm.weight" in state
  assert state["encoder.conv_in.conv_s.weight"].shape == (8, 192, 1, 3, 3)
  _write(tmp_path / "vae", CV4, state)
  # A pipeline directory: the converter finds its vae/ subfolder.
  tok = pretrained.load_pretrained_tokenizer("cosmos", tmp_path)
  assert tok.config == CV4
  jax.tree.map(np.testing.assert_array_equal, tok.params, jax.tree.map(np.asarray, params))


def test_layout_follows_config(tmp_path, cv4_state):
  """CV4x8x8 weights under a CV8x8x8 config.json: the temporal resampler's tensors are
  missing, so the layout mismatch is named, not silently ignored."""
  _write(tmp_path, CV8, cv4_state[1])
  with pytest.raises(convert.MissingTensorError, match=r"samplers\.0\.conv\d\.(weight|bias)' .*is missing"):
    pretrained.load_pretrained_tokenizer("cosmos", tmp_path)


def _edit(state, fn):
  state = dict(state)
  fn(state)
  return state


@pytest.mark.parametrize("error,edit,pattern", [
    (convert.MissingTensorError, lambda s: s.pop("encoder.mid_block.attentions.0.to_q.weight"),
     r"'encoder\.mid_block\.attentions\.0\.to_q\.weight'.*missing"),
    (convert.UnexpectedTensorError,
     lambda s: s.update({"encoder.conv_in.conv_s.extra": np.zeros(3, np.float32)}),
     r"'encoder\.conv_in\.conv_s\.extra'"),
    (convert.TensorShapeError,
     lambda s: s.update({"decoder.conv_out.conv_t.weight":
                         s["decoder.conv_out.conv_t.weight"][:, :, :2].copy()}),
     r"'decoder\.conv_out\.conv_t\.weight': expected shape \(192, 192, 3, 1, 1\), "
     r"found \(192, 192, 2, 1, 1\)"),
    (convert.NonFiniteTensorError,
     lambda s: s["quant_conv.bias"].__setitem__(3, np.nan), r"'quant_conv\.bias' holds 1 NaN"),
    (convert.NonFiniteTensorError,
     lambda s: s["encoder.norm_out.norm.weight"].__setitem__(0, np.inf),
     r"'encoder\.norm_out\.norm\.weight' holds 1 NaN/inf"),
], ids=["missing", "extra", "misshaped", "nan", "inf"])
def test_converter_errors_name_the_tensor(tmp_path, cv4_state, error, edit, pattern):
  state = {k: v.copy() for k, v in cv4_state[1].items()}
  _write(tmp_path, CV4, _edit(state, edit))
  with pytest.raises(error, match=pattern):
    pretrained.load_pretrained_tokenizer("cosmos", tmp_path)


def test_config_and_file_errors(tmp_path, cv4_state):
  _write(tmp_path / "wan", CV4, cv4_state[1], class_name="AutoencoderKLWan")
  with pytest.raises(convert.PretrainedVAEError, match="AutoencoderKLWan"):
    pretrained.load_pretrained_tokenizer("cosmos", tmp_path / "wan")
  path = _write(tmp_path / "odd", CV4, cv4_state[1])
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(cfg, patch_type="dct")))
  with pytest.raises(ConfigError, match="cosmos.patch_type"):
    pretrained.load_pretrained_tokenizer("cosmos", path)
  (path / "config.json").write_text(json.dumps(dict(cfg, use_quant_conv=True)))
  with pytest.raises(ConfigError, match="cosmos.use_quant_conv"):
    pretrained.load_pretrained_tokenizer("cosmos", path)
  (path / convert.WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(convert.CheckpointFileError, match="cannot read as safetensors"):
    pretrained.load_pretrained_tokenizer("cosmos", path)
  with pytest.raises(convert.CheckpointFileError, match="config"):
    pretrained.load_pretrained_tokenizer("cosmos", tmp_path / "nothing")


def test_tokenizer_interface(tmp_path, cv4_state):
  _write(tmp_path, CV4, cv4_state[1])
  tok = pretrained.load_pretrained_tokenizer("cosmos", tmp_path)
  assert (tok.temporal_factor, tok.spatial_factor, tok.latent_channels) == (4, 8, 16)
  assert tok.latent_shape(17, 128, 240) == (5, 16, 30, 16)
  clips = [_frames(9, b=2, seed=s) for s in range(2)]
  with pytest.raises(ValueError, match="no latent statistics"):
    tok.encode(clips[0], normalized=True)
  stats = pretrained.compute_stats(tok, clips)
  tok = dataclasses.replace(tok, stats=stats)
  zn = tok.encode(clips[0], normalized=True)
  z = tok.encode(clips[0])
  np.testing.assert_allclose(zn * stats.std + stats.mean, z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tok.decode(zn, normalized=True), tok.decode(z), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(z, cosmos.encode(tok.params, clips[0], tok.config), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="unknown pretrained tokenizer"):
    pretrained.load_pretrained_tokenizer("vqgan", tmp_path)
