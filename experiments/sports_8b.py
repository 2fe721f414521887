"""TV2TV on captioned sports video at paper scale: an 8B-MoT with Llama-3.1-8B-shaped towers.

Run (from the repo root; a TPU slice, the Llama-3.1-8B Hugging Face checkpoint directory
holding config.json, *.safetensors and tokenizer.json):

    python -m tv2tv_jax.main --config=experiments/sports_8b.py:default --workdir=$WORKDIR \
        --config.init.llama_dir=$LLAMA_3_1_8B

Llama-3.1-8B's config.json declares RoPE scaling rope_type "llama3" (factor 8); the towers
carry the same (`model.rope_*`, from llama3_common), which `llama_init` checks.

Towers (each; docs/design.md, section 7): 32 layers, d 4096, 32 heads / 8 KV heads, head_dim 128,
FFN 14336, vocab 128256, RoPE theta 5e5, RMSNorm eps 1e-5. Paper recipe: 8K hours, a caption
every 1.9 s on average, 250K steps at batch 512 (the defaults here; `default` accumulates it
over 2 microbatches so that it fits a v5p-128 slice, docs/aot.md). Parameter count of the
`default` variant (tests/test_paper_configs.py: jax.eval_shape equals the analytic count):
15,025,207,312 = 2 towers x 6,979,584,000 + embedding and lm_head 2 x 525,336,576 + both
U-Nets 15,357,968 + text/video final norms 2 x 4,096 (Llama-3.1-8B itself: 8,030,261,248).

Video side (**default**): frames 256x448 (16:9-ish broadcast video), CV4x8x8 latents
[32, 56, 16], patch 2 -> 16x28 = 448 tokens per chunk copy; 16 fps, 4 frames per chunk.

Variants (the part after the colon; a layout may follow after a comma, e.g. `default,think2v`):
  default  ~6 s clips (1 + 24 latents, max_chunks 25) with about three captions each;
           text_len 512. Row: 512 + 2*25*448 = 22912.
  lowres   frames 128x224 -> latents [16, 28, 16], 112 tokens per copy.
           Row: 512 + 2*25*112 = 6112.
  12s      ~12 s clips (1 + 48 latents, max_chunks 49), text_len 1024, frames 128x224.
           Row: 1024 + 2*49*112 = 12000.
  cpu_test tiny towers with the Llama-3 vocabulary, 64x64 frames, 4-chunk clips, a few
           steps on CPU from data prepared in the test (tests/test_real_data.py).

Data (docs/data.md, "Captioned video"): `data.source = 'captioned_video'`, clips of the
variant's frame size and length (`data.builder_config`); `main` first prepares `data.data_dir`
(default <workdir>/data) from the videos and captions.json in `data.manual_dir`, encoding
with the VAE in `data.vae_dir`.
"""

import ml_collections

from tv2tv_jax import config as config_lib

from experiments import llama3_common as common


def _default(c):
  c.model.latent_shape = common.latent_shape(256, 448)
  c.seq.update(max_chunks=common.chunks_for_seconds(6), text_len=512)
  # The paper batch of 512 rows in 2 microbatches of 256: compiled for v5p-128 (the slice
  # this variant is sized for), one pass needs 129.9 GiB per chip of 95, two need 65.1 GiB
  # (docs/aot.md). Larger slices may take `--config.train.grad_accum_steps=1`.
  c.train.grad_accum_steps = 2
  c.data.builder_config = common.builder_config("r256x448_6s", 256, 448, c.seq.max_chunks)


def _lowres(c):
  c.model.latent_shape = common.latent_shape(128, 224)
  c.data.builder_config = common.builder_config("r128x224_6s", 128, 224, c.seq.max_chunks)


def _twelve_seconds(c):
  c.model.latent_shape = common.latent_shape(128, 224)
  c.seq.update(max_chunks=common.chunks_for_seconds(12), text_len=1024)
  c.data.builder_config = common.builder_config("r128x224_12s", 128, 224, c.seq.max_chunks)


def _cpu_test(c):
  common.cpu_test(c, "cpu64")


_VARIANTS = {"default": _default, "lowres": _lowres, "12s": _twelve_seconds,
             "cpu_test": _cpu_test}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  """`arg`: `default`, `lowres`, `12s` or `cpu_test`, optionally `,<layout>` (tv2tv, t2v,
  think2v)."""
  c = common.base(common.LLAMA_3_1_8B)
  _default(c)
  c.data.update(source="captioned_video", prompt="sports broadcast")
  config_lib.apply_config_arg(c, arg, _VARIANTS)
  return c
