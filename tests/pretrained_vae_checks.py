"""Helpers shared by the pretrained video tokenizers' tests (Cosmos, Wan): random clips, the
relative error, and the comparison against a diffusers model. torch is imported only by
the functions that need it, so the default tier runs without it."""

import numpy as np


def frames(t, b=1, h=16, w=24, seed=0):
  """A random clip f32[b, t, h, w, 3] in [-1, 1] (a JAX array)."""
  import jax.numpy as jnp
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, t, h, w, 3)), jnp.float32)


def rel(ours, ref):
  """max |ours - ref| / max |ref|."""
  ref = np.asarray(ref)
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def to_torch(x):
  """[B, T, H, W, C] (NumPy or JAX) -> a torch tensor [B, C, T, H, W]."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def to_flax(x):
  """A torch tensor [B, C, T, H, W] -> NumPy [B, T, H, W, C]."""
  return x.permute(0, 2, 3, 4, 1).numpy()


def save_reference(model, path):
  """`model.save_pretrained(path)` (safetensors, checked); returns the model."""
  model.save_pretrained(path)
  assert (path / "diffusion_pytorch_model.safetensors").exists()
  return model


def compare(model, tok, lengths, size, batch, inside_share=0.0):
  """Max relative errors (encode, decode) of the converted tokenizer `tok` against the
  diffusers `model`, by clip length, on random clips of `lengths` frames of `size`.

  encode: the latents of the clip (the reference's `latent_dist.mode()`); decode: the
  frames of the reference's latents. `inside_share`: the least share of the reference's
  frame values strictly inside (-1, 1), so that a clamping decoder is compared on values,
  not on its bounds.
  """
  import torch
  errors = {}
  for t in lengths:
    clip = np.random.default_rng(t).uniform(-1, 1, (batch, t, *size, 3)).astype(np.float32)
    with torch.no_grad():
      z_ref = to_flax(model.encode(to_torch(clip)).latent_dist.mode())
      x_ref = to_flax(model.decode(to_torch(z_ref)).sample)
    z = tok.encode(clip)
    x = tok.decode(z_ref)
    assert z.shape == z_ref.shape and x.shape == x_ref.shape == clip.shape
    assert np.abs(z_ref).max() > 0.1 and np.abs(x_ref).max() > 0.1  # not a near-zero comparison
    assert np.mean(np.abs(x_ref) < 1.0) >= inside_share
    errors[t] = (rel(z, z_ref), rel(x, x_ref))
  return errors
