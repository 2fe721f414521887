"""The video tokenizer: a causal 3D-CNN VAE (4x in time, 8x8 in space); see docs/vae.md.

`model`: VAEConfig, VideoVAE, encode(params, frames, config), decode(params, latents, config),
LatentStats, normalize, denormalize. `video_tokenizer`: a trained VAE ready to use
(VideoTokenizer, save / load_tokenizer, to_float / to_uint8). `train`: the training loop
(train_vae, VAETrainConfig), held-out PSNR, compute_latent_stats, and the
`python -m tv2tv_jax.vae.train` entry.

Pretrained: `cosmos` (NVIDIA's Cosmos tokenizer as diffusers' AutoencoderKLCosmos builds
it), `wan` (Wan 2.1's VAE as diffusers' AutoencoderKLWan builds it), `causal3d` (what they
share: the causal convolution with carried state, the temporal tiling, the config mixin),
`convert` (diffusers safetensors -> Flax params), `pretrained` (load_pretrained_tokenizer:
the same encode/decode interface as our VAE's VideoTokenizer).
"""
