"""The Flax Cosmos tokenizer against diffusers' `AutoencoderKLCosmos` (the reference).

Each test builds a diffusers model with random weights (norm affines redrawn too, so a norm
mapped to the wrong tensor shows), saves it with `save_pretrained` (safetensors), converts
it with `pretrained.load_pretrained_tokenizer`, and compares, in float32, the latents of
`encode` and the frames of `decode` (fed the reference's latents) on clips of 1 frame (the
first frame alone), 1 + t and 1 + 3t frames.

Tolerance: max |ours - reference| / max |reference| < 1e-5. Both sides compute the same
float32 function with a different order of summation (XLA's convolutions, einsums and
reductions against PyTorch's), so each layer adds rounding of order sqrt(K) * 2^-24 of its
output scale (K up to 3*3*512 = 4608 products per output: about 4e-6 worst-case-typical);
per-frame normalisation keeps the scale from growing through depth, so the errors add
rather than compound. Measured: 3e-7 to 1.5e-6 at small widths, up to 2.1e-6 at the real
ones (docs/vae.md). A wrong mapping (a transposed kernel, a swapped Haar band, a norm on
the wrong tensor) gives errors of order 1e-1 to 1.

Needs torch and diffusers (the `reference` extra); skipped cleanly without them.
"""

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import pretrained_vae_checks as checks  # noqa: E402
from tv2tv_jax.vae import cosmos, pretrained  # noqa: E402

REL_TOL = 1e-5
# Small widths; resolution 128 with patch 4 puts attention in a down and an up block too.
SMALL = dict(encoder_block_out_channels=(16, 32, 32, 32), decode_block_out_channels=(16, 32, 32, 32),
             num_layers=1, resolution=128)
# The published Cosmos-0.1-Tokenizer-CV4x8x8 architecture as diffusers configures it
# (AutoencoderKLCosmos's defaults, which are CV8x8x8's, with temporal_compression_ratio 4).
CV4X8X8_PUBLISHED = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    encoder_block_out_channels=(128, 256, 512, 512), decode_block_out_channels=(256, 512, 512, 512),
    attention_resolutions=(32,), resolution=1024, num_layers=2, patch_size=4, patch_type="haar",
    scaling_factor=1.0, spatial_compression_ratio=8, temporal_compression_ratio=4)


def _save_reference(path, seed, **config):
  """A random AutoencoderKLCosmos saved to `path` (safetensors); returns the torch model."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLCosmos(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".norm." in name:  # GroupNorm affines: 1 and 0 at init
        p.add_(0.2 * torch.randn_like(p))
  return checks.save_reference(model, path)


_compare = checks.compare


@pytest.mark.parametrize("temporal", [4, 8], ids=["CV4x8x8", "CV8x8x8"])
@pytest.mark.parametrize("patch_type", ["haar", "rearrange"])
def test_small_widths_match_diffusers(tmp_path, temporal, patch_type):
  model = _save_reference(tmp_path, seed=temporal, temporal_compression_ratio=temporal,
                          patch_type=patch_type, **SMALL)
  tok = pretrained.load_pretrained_tokenizer("cosmos", tmp_path)
  assert tok.config.temporal_compression_ratio == temporal
  errors = _compare(model, tok, (1, 1 + temporal, 1 + 3 * temporal), (16, 24), batch=2)
  print(f"small {patch_type} 1x{temporal}: max rel error (encode, decode) by clip length: "
        + ", ".join(f"{t}: {e[0]:.1e}, {e[1]:.1e}" for t, e in errors.items()))
  assert all(e < REL_TOL for pair in errors.values() for e in pair), errors


def test_small_widths_tiled_match_diffusers(tmp_path):
  """Tiles of 1 latent frame (1 frame, then 4 at a time) against the reference's whole clip."""
  model = _save_reference(tmp_path, seed=3, temporal_compression_ratio=4, **SMALL)
  tok = pretrained.load_pretrained_tokenizer("cosmos", tmp_path, tile_latents=1)
  errors = _compare(model, tok, (13,), (16, 24), batch=1)
  print(f"small CV4x8x8, tiles of 1 latent: {errors}")
  assert all(e < REL_TOL for e in errors[13])


@pytest.mark.slow
def test_published_cv4x8x8_widths_match_diffusers(tmp_path):
  """The real widths (105M parameters) on small frames: 32x32, clips of 1, 5 and 9 frames."""
  model = _save_reference(tmp_path, seed=0, **CV4X8X8_PUBLISHED)
  tok = pretrained.load_pretrained_tokenizer("cosmos", tmp_path)
  assert tok.config == cosmos.CV4x8x8
  errors = _compare(model, tok, (1, 5, 9), (32, 32), batch=1)
  print("published CV4x8x8 widths: max rel error (encode, decode) by clip length: "
        + ", ".join(f"{t}: {e[0]:.1e}, {e[1]:.1e}" for t, e in errors.items()))
  assert all(e < REL_TOL for pair in errors.values() for e in pair), errors
