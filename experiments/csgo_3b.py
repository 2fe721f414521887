"""TV2TV on CS:GO at paper scale: a 3B-MoT whose towers are shaped like Llama-3.2-3B.

Run (from the repo root; a TPU slice, the Llama-3.2-3B Hugging Face checkpoint directory
holding config.json, *.safetensors and tokenizer.json):

    python -m tv2tv_jax.main --config=experiments/csgo_3b.py:6s --workdir=$WORKDIR \
        --config.init.llama_dir=$LLAMA_3_2_3B

Llama-3.2-3B's config.json declares RoPE scaling rope_type "llama3" (factor 32); the towers
carry the same (`model.rope_*`, from llama3_common), which `llama_init` checks.
Without `init.llama_dir` the model trains from scratch.

Towers (each; docs/design.md, section 7): 28 layers, d 3072, 24 heads / 8 KV heads, head_dim 128,
FFN 8192, vocab 128256, RoPE theta 5e5, RMSNorm eps 1e-5. Parameter count of the `6s`
variant (tests/test_paper_configs.py: jax.eval_shape equals the analytic count):
6,438,423,568 = 2 towers x 2,818,744,320 + embedding and untied lm_head 2 x 394,002,432
+ both U-Nets 12,923,920 + text/video final norms 2 x 3,072. Llama-3.2-3B itself has
3,212,749,824 (its lm_head is tied to the embedding; ours is initialised from it, then untied).

Video side (**default**, the paper does not state it): frames 128x240 (the `r128` config of
data_pipelines/csgo_tfds.py, from the 150x280 source), CV4x8x8 latents [16, 30, 16], patch 2
-> 8x15 = 120 tokens per chunk copy; a chunk is 4 frames = 0.25 s at 16 fps.

Variants (the part after the colon; a layout may follow after a comma, e.g. `6s,t2v`):
  6s       (= default) clips of 1 + 4*24 frames (~6 s) -> 1 + 24 latents: max_chunks 25
           (24 generated chunks + the given first frame), text_len 512 (~10 tokens of
           action text + BOF + EOF per chunk, plus the prompt). Row: 512 + 2*25*120 = 6512.
  64s      1 + 4*256 frames (64 s) -> 1 + 256 latents in one row: max_chunks 257,
           text_len 4096. Row: 4096 + 2*257*120 = 65776 (for long-context training and
           ahead-of-time memory studies; the paper reaches 64 s by windowed generation).
  hires    frames 256x480 (upsampled source) -> latents [32, 60, 16], patch 2 -> 480
           tokens per copy; 6 s rows: 512 + 2*25*480 = 24512. (No builder config of that
           size exists: for compile and memory studies, with data.source=synthetic.)
  cpu_test tiny towers with the Llama-3 vocabulary, 64x64 frames, 4-chunk clips, a few
           steps on CPU from data prepared in the test (tests/test_real_data.py).

Data (docs/data.md, "CS:GO"): `data.source = 'csgo'`, clips of the variant's frame size and
length (`data.builder_config`); `python -m tv2tv_jax.main` first
prepares `data.data_dir` (default <workdir>/data) from the HDF5 files in
`data.manual_dir`, encoding with the VAE in `data.vae_dir`; or run
`python -m tv2tv_jax.prepare` once and point every run at the prepared directory.
"""

import ml_collections

from tv2tv_jax import config as config_lib

from experiments import llama3_common as common


def _six_seconds(c):
  c.model.latent_shape = common.latent_shape(128, 240)
  c.seq.update(max_chunks=common.chunks_for_seconds(6), text_len=512)
  c.data.builder_config = common.builder_config("r128_6s", 128, 240, c.seq.max_chunks)


def _sixty_four_seconds(c):
  c.model.latent_shape = common.latent_shape(128, 240)
  c.seq.update(max_chunks=common.chunks_for_seconds(64), text_len=4096)
  c.train.batch_size = 32  # **default**: ~10x longer rows than 6s at a similar token budget
  c.data.builder_config = common.builder_config("r128_64s", 128, 240, c.seq.max_chunks)


def _hires(c):
  c.model.latent_shape = common.latent_shape(256, 480)


def _cpu_test(c):
  common.cpu_test(c, "cpu64")
  c.data.builder_config.validation_every = 3  # a few test files still hold validation clips


_VARIANTS = {"default": _six_seconds, "6s": _six_seconds, "64s": _sixty_four_seconds,
             "hires": _hires, "cpu_test": _cpu_test}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  """`arg`: `6s` (default), `64s`, `hires` or `cpu_test`, optionally `,<layout>` (tv2tv,
  t2v, think2v)."""
  c = common.base(common.LLAMA_3_2_3B)
  # **default** (paper: 95 h of play at 16 Hz): a batch of 256 six-second rows.
  c.train.update(batch_size=256, num_steps=100_000)
  c.optim.update(total_steps=100_000)
  _six_seconds(c)
  c.data.update(source="csgo", prompt="cs:go deathmatch")
  config_lib.apply_config_arg(c, arg, _VARIANTS)
  return c
