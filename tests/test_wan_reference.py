"""The Flax Wan 2.1 VAE against diffusers' `AutoencoderKLWan` (the reference).

Each test builds a diffusers model with random weights (RMS-norm gammas redrawn too, so a
norm mapped to the wrong tensor shows), saves it with `save_pretrained` (safetensors),
converts it with `pretrained.load_pretrained_tokenizer`, and compares, in float32, the
latents of `encode` (the posterior mean, `latent_dist.mode()`) and the frames of `decode`
(fed the reference's latents; both clamp to [-1, 1]) on clips of 1 frame (the first frame
alone), 5 and 13 (or 9) frames. diffusers streams the clip (frame 0, then 4 frames at a
time; one latent at a time when decoding); we run whole clips, or tiles of our own.

Tolerance: max |ours - reference| / max |reference| < 2e-5. Both sides compute the same
float32 function with a different order of summation. One 3x3x3 conv over 128 channels
(K = 3456 products per output) is off from its float64 value by 5e-7 of its scale in XLA
and 4e-7 in PyTorch; the decoder chains about 35 convs, up to 27 * 384 = 10368 products each
at the real widths, and its per-pixel RMS norms rescale every pixel to norm sqrt(C), so a
pixel of small norm carries its rounding up to full scale. Against a float64 run of
diffusers, diffusers' own float32 decode is off by up to 2.6e-6 and ours by up to 3.5e-6;
ours against diffusers: up to 3.8e-6 (4.7e-6 with the decoder's conv_out doubled to make
it clamp) (docs/vae.md). 2e-5 keeps a 4x margin above that; a wrong mapping or a wrong
streaming rule (Cosmos' replicated past, q and k swapped, the upsampler's frame order,
frame 0 through a temporal resampler) gives errors of 9e-2 to 1.6.

Needs torch and diffusers (the `reference` extra); skipped cleanly without them.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import pretrained_vae_checks as checks  # noqa: E402
from tv2tv_jax.vae import convert, pretrained, wan  # noqa: E402

REL_TOL = 2e-5
# Wan 2.1's layout at small widths (16, 32, 64, 64).
SMALL = dict(base_dim=16)
# Options the published config leaves at their defaults: a decoder of its own width, fewer
# latent channels, one resnet per block. (Attention in the down blocks, `attn_scales`, is
# refused: diffusers builds it but its encoder cannot run it.)
SMALL_OPTIONS = dict(base_dim=8, decoder_base_dim=16, z_dim=4, num_res_blocks=1)


def _save_reference(path, seed, **config):
  """A random AutoencoderKLWan saved to `path` (safetensors); returns the torch model."""
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLWan(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".gamma"):  # RMS-norm scales: 1 at init
        p.copy_(1 + 0.3 * torch.randn_like(p))
  return checks.save_reference(model, path)


def _compare(model, tok, lengths, size, batch):
  # Mostly compared on values: the clamp to [-1, 1] must not decide the comparison.
  return checks.compare(model, tok, lengths, size, batch, inside_share=0.5)


def _report(label, errors):
  print(f"{label}: max rel error (encode, decode) by clip length: "
        + ", ".join(f"{t}: {e[0]:.1e}, {e[1]:.1e}" for t, e in errors.items()))
  assert all(e < REL_TOL for pair in errors.values() for e in pair), errors


@pytest.mark.parametrize("config", [SMALL, SMALL_OPTIONS], ids=["wan2.1-layout", "options"])
def test_small_widths_match_diffusers(tmp_path, config):
  model = _save_reference(tmp_path, seed=len(config), **config)
  tok = pretrained.load_pretrained_tokenizer("wan", tmp_path)
  # The naming rule reaches every diffusers tensor (the converter also checks it).
  assert set(convert.to_state_dict(tok.params)) == set(model.state_dict())
  _report(f"small {config}", _compare(model, tok, (1, 5, 13), (16, 24), batch=2))


def test_small_widths_tiled_match_diffusers(tmp_path):
  """Our tiles of 1 latent (1 frame, then 4 at a time: diffusers' own chunks) and of 2
  latents ([5, 8] frames, [2, 2] latents) against the reference's whole clip."""
  model = _save_reference(tmp_path, seed=3, **SMALL)
  for tile in (1, 2):
    tok = pretrained.load_pretrained_tokenizer("wan", tmp_path, tile_latents=tile)
    _report(f"small, tiles of {tile} latents", _compare(model, tok, (13,), (16, 24), batch=1))


def test_decode_clamps_like_diffusers(tmp_path):
  """diffusers clamps decoded frames to [-1, 1]; with conv_out scaled up, a good share of
  them saturate, and ours must saturate at the same places."""
  model = _save_reference(tmp_path / "ref", seed=4, **SMALL)
  with torch.no_grad():
    model.decoder.conv_out.weight.mul_(2.0)
  model.save_pretrained(tmp_path / "scaled")
  tok = pretrained.load_pretrained_tokenizer("wan", tmp_path / "scaled")
  z = np.random.default_rng(0).standard_normal((1, 2, 2, 3, 16)).astype(np.float32)
  with torch.no_grad():
    x_ref = checks.to_flax(model.decode(checks.to_torch(z)).sample)
  x = np.asarray(tok.decode(z))
  saturated = np.abs(x_ref) == 1.0
  print(f"clamped: {saturated.mean():.2f} of the frames' values; "
        f"rel error {checks.rel(x, x_ref):.1e}")
  assert 0.05 < saturated.mean() < 0.95
  assert np.abs(x[saturated]).min() > 1 - REL_TOL  # clamped too (or a rounding away)
  assert checks.rel(x, x_ref) < REL_TOL


@pytest.mark.slow
def test_published_wan21_widths_match_diffusers(tmp_path):
  """The real widths (AutoencoderKLWan's defaults, Wan 2.1's VAE: 127M parameters) on small
  frames: 32x32, clips of 1, 5 and 9 frames."""
  model = _save_reference(tmp_path, seed=0)
  tok = pretrained.load_pretrained_tokenizer("wan", tmp_path)
  assert tok.config == wan.WAN_2_1
  _report("published Wan 2.1 widths", _compare(model, tok, (1, 5, 9), (32, 32), batch=1))
