"""Shared parts of the paper-scale experiments whose text tower starts from Llama-3.

Used by `experiments/csgo_3b.py` (Llama-3.2-3B towers) and `experiments/sports_8b.py`
(Llama-3.1-8B towers). Values the paper does not state are marked **default**.

Special token ids. The TV2TV roles map to Llama-3 tokens by name
(`data_pipelines.tokenizer.LLAMA3_SPECIALS`); in the Llama-3.1 / 3.2 `tokenizer.json`
those names have the ids below (Llama-3.0 differs for pad: 128004). The ids are
written out because a config cannot read a tokenizer file; `check_tokenizer` (or
`data_pipelines.tokenizer.check_compatible`) must confirm them against the actual
`tokenizer.json` before training.
"""

import dataclasses

import ml_collections

from tv2tv_jax import config as config_lib

from experiments import sharding_rules

# Tower shapes of the Hugging Face config.json files (`tv2tv_jax.llama_init` checks them),
# RoPE scaling included: both declare rope_type "llama3" with the factors below.
_LLAMA3_ROPE = dict(rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position_embeddings=8192)
LLAMA_3_2_3B = dict(vocab_size=128256, d_model=3072, num_layers=28, num_heads=24,
                    num_kv_heads=8, head_dim=128, mlp_dim=8192, rope_theta=500_000.0,
                    rope_factor=32.0, **_LLAMA3_ROPE, norm_eps=1e-5)
LLAMA_3_1_8B = dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                    num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_theta=500_000.0,
                    rope_factor=8.0, **_LLAMA3_ROPE, norm_eps=1e-5)

# role -> (Llama-3.1/3.2 token, id); the tokens are LLAMA3_SPECIALS of data_pipelines.tokenizer.
LLAMA3_1_SPECIAL_IDS = {
    "pad": ("<|reserved_special_token_2|>", 128005),
    "bof": ("<|reserved_special_token_0|>", 128002),
    "eof": ("<|reserved_special_token_1|>", 128003),
    "eos": ("<|end_of_text|>", 128001),
}

# Frames per latent frame of the causal video VAE (Cosmos CV4x8x8-like): 4x in time,
# 8x8 in space, 16 latent channels; 1 + 4k frames -> 1 + k latents.
VAE_TIME, VAE_SPACE, VAE_CHANNELS = 4, 8, 16
FPS = 16


def latent_shape(height: int, width: int) -> tuple[int, int, int]:
  """Latent [h, w, c] of one (height x width) RGB frame chunk under the CV4x8x8 VAE."""
  if height % VAE_SPACE or width % VAE_SPACE:
    raise ValueError(f"frame {height}x{width} is not a multiple of {VAE_SPACE}")
  return (height // VAE_SPACE, width // VAE_SPACE, VAE_CHANNELS)


def chunks_for_seconds(seconds: float) -> int:
  """Latent frames (= clean chunk copies) of a clip of about `seconds` at 16 fps: 1 + k,
  k = round(seconds * fps / 4); the first latent is the given first frame."""
  return 1 + round(seconds * FPS / VAE_TIME)


def base(tower: dict) -> ml_collections.ConfigDict:
  """Every section of a Llama-initialised experiment; callers set shapes of the video side."""
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      tower,
      latent_shape=(16, 30, VAE_CHANNELS), patch_size=2,
      # U-Net around patchify (**default**: the paper gives no widths).
      unet_channels=256, unet_blocks=2, unet_groups=32, time_embed_dim=256,
      # bf16 activations, f32 master weights; the Pallas kernel, scanned and remat'd layers
      # are what fits these row lengths on TPU (benchmarks/kernel_memory_aot.py).
      dtype="bfloat16", param_dtype="float32", attention_impl="pallas", scan_layers=True,
      remat=True))
  c.seq = ml_collections.ConfigDict(dict(
      layout="tv2tv", text_len=512, max_chunks=25,
      **{f"{role}_id": tid for role, (_, tid) in LLAMA3_1_SPECIAL_IDS.items()}))
  # Defaults of docs/design.md, section 3: `FlowConfig` / `LossConfig` are their one source.
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(config_lib.FlowConfig()))
  c.loss = ml_collections.ConfigDict(dataclasses.asdict(config_lib.LossConfig()))
  # **default**: a fine-tuning-sized peak LR, since the text tower starts pretrained.
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=2000, total_steps=250_000, end_lr_fraction=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=512, grad_accum_steps=1, num_steps=250_000, log_every=50, seed=0,
      save_every=1000, keep_last=3, keep_every=25_000, async_checkpoints=True,
      eval_every=5000, eval_batches=4, eval_times=(0.25, 0.5, 0.75), max_nonfinite_steps=5))
  # **default**: FSDP over every device (params, grads and Adam state sharded over the
  # width); raise `tensor` (<= 8 KV heads) when the per-device batch gets too small.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
  c.sharding_rules = sharding_rules.fsdp_tensor_rules()
  # Where the weights come from (read by tv2tv_jax.llama_init.init_from_config):
  #   llama_dir               a Hugging Face checkpoint directory (config.json + *.safetensors);
  #                           "" trains from scratch.
  #   video_tower_from_llama  also start the video tower from the same Llama weights
  #                           (**default** False: the paper initialises the text tower).
  c.init = ml_collections.ConfigDict(dict(llama_dir="", video_tower_from_llama=False))
  c.data = ml_collections.ConfigDict(dict(
      # The configs set source ('csgo' / 'captioned_video') and builder_config; the
      # trainer reads the prepared directory data_dir ('' = <workdir>/data), which
      # `python -m tv2tv_jax.prepare` (and `main`, before training) builds from the raw
      # files in manual_dir (docs/data.md), encoding with the video tokenizer vae_kind:
      # the paper's, NVIDIA Cosmos CV4x8x8, converted from its diffusers weights in
      # vae_dir (docs/vae.md); 'own' copies a VAE trained with tv2tv_jax.vae.train.
      # Latents are normalised per channel over vae_stats_clips training clips ('data';
      # 'published' takes config.json's); vae_tile_latents > 0 encodes long clips in
      # temporal tiles (same latents, less memory).
      # `--config.data.source=synthetic` trains on random latents (benchmarks, AOT).
      source="synthetic", data_dir="", builder_config={}, manual_dir="", vae_dir="",
      vae_kind="cosmos", vae_stats="data", vae_stats_clips=64, vae_tile_latents=0,
      synthetic_batches=0, max_examples_per_row=1, max_text_len=8,
      prompt="", shuffle_seed=0, num_workers=0,
      # tokenizer.json of the Llama checkpoint; "" means <init.llama_dir>/tokenizer.json
      # (`tokenizer_path` below); preparation copies it into the prepared directory.
      tokenizer_path=""))
  return c


def tokenizer_path(c: ml_collections.ConfigDict) -> str:
  """The tokenizer.json a config uses ("" when neither path is set)."""
  from data_pipelines import preparation  # local: configs import without data code
  return preparation.tokenizer_source(c)


def builder_config(name: str, height: int, width: int, max_chunks: int) -> dict:
  """The TFDS builder config (`data.builder_config`) of clips that fill a row: frames
  height x width, max_chunks - 1 chunks after the first frame."""
  return dict(name=name, height=height, width=width, num_chunks=max_chunks - 1)


def cpu_test(c: ml_collections.ConfigDict, builder_name: str) -> None:
  """A CPU-sized variant that keeps what real data exercises: the Llama-3 vocabulary and
  special ids, the CV4x8x8 latent layout (64x64 frames -> [8, 8, 16]), clips of the
  prepared-data path. Tiny towers, 4-chunk clips, fp32, XLA attention; a few steps
  (tests/test_real_data.py)."""
  c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, latent_shape=latent_shape(64, 64), unet_channels=16,
                 unet_groups=4, time_embed_dim=16, dtype="float32", attention_impl="xla",
                 scan_layers=True, remat=False)
  # Text room for 4 chunks of CS:GO action text or captions even at one token per byte
  # (the tests' stand-in tokenizer has no merges; Llama-3's needs ~10 tokens per chunk).
  c.seq.update(text_len=384, max_chunks=5)
  c.optim.update(learning_rate=1e-3, warmup_steps=1, total_steps=20)
  c.train.update(batch_size=2, num_steps=3, log_every=1, save_every=0, keep_every=0,
                 async_checkpoints=False, eval_every=0, eval_batches=1)
  c.mesh.update(data=-1, fsdp=1)
  c.data.builder_config = builder_config(builder_name, 64, 64, c.seq.max_chunks)


def check_tokenizer(c: ml_collections.ConfigDict):
  """Loads the config's tokenizer.json and checks the special ids and vocab against it
  (ConfigError naming the field on a mismatch). Returns the TextTokenizer."""
  from data_pipelines import tokenizer as tok_lib  # local: configs import without tokenizers
  path = tokenizer_path(c)
  if not path:
    raise ValueError("no tokenizer: set data.tokenizer_path or init.llama_dir")
  tok = tok_lib.load_tokenizer(path, specials=tok_lib.LLAMA3_SPECIALS)
  tok_lib.check_compatible(tok, c)
  return tok

