"""TV2TV on the toy world (the project's CS:GO stand-in), at CPU-friendly sizes.

Run (from the repo root):

    python -m tv2tv_jax.main --config=experiments/toy_world.py:quick --workdir=/tmp/tv2tv_quick

Variants (the part after the colon):
  tiny    the test model: trains a few steps in seconds; used throughout tests/.
  quick   the README's main job: the whole toy-world chain with cached stages (build the
          TFDS dataset, train a VAE, encode latents, train a tokenizer; see
          data_pipelines/preparation.py), then a small model for 300 steps, on CPU in minutes.
  small   the throughput/MFU benchmark model (benchmarks/train_step_throughput.py).
  default a larger toy-world model for a workstation or one accelerator.

Layout variants compose with a comma: `quick,t2v` or `quick,think2v` train the
baselines of docs/design.md, section 4 with the same model and code. So do `cosmos` and
`wan`: `quick,cosmos --config.data.vae_dir=<diffusers weights>` encodes the toy world with
the pretrained tokenizer instead of training our VAE (docs/vae.md).

`data.source = 'toy_world'` (quick) reads VAE latents of toy-world clips through the
Grain pipeline (data_pipelines/grain_pipeline.py, docs/pipeline.md); 'synthetic' (the
other variants) trains on random latents and texts laid out by `tv2tv_jax.sequence`
(correct structure, no meaning), enough to exercise and measure every part of the model.
"""

import dataclasses

import ml_collections

from tv2tv_jax import config as config_lib

from experiments import sharding_rules, vae_toy_world


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=512, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
      mlp_dim=768, rope_theta=10_000.0, norm_eps=1e-5, latent_shape=(8, 8, 16), patch_size=2,
      unet_channels=64, unet_blocks=1, unet_groups=8, time_embed_dim=64, dtype="float32",
      param_dtype="float32", attention_impl="xla", scan_layers=True, remat=False))
  # The default row holds one toy-world clip of 15 chunks after its given first frame:
  # 16 clean copies and 15 noisy ones (a first frame has no noisy twin). Its text region
  # is sized to toy-world texts, ~3.2 slots per chunk (prompt, action text, BOF, EOF, EOS):
  # 57-62 slots for such a clip, depending on the tokenizer (docs/pipeline.md, packing).
  c.seq = ml_collections.ConfigDict(dict(
      layout="tv2tv", text_len=64, max_chunks=16, noisy_chunks=15, pad_id=0, bof_id=1,
      eof_id=2, eos_id=3))
  # Defaults of docs/design.md, section 3: `FlowConfig` / `LossConfig` are their one source.
  c.flow = ml_collections.ConfigDict(dataclasses.asdict(config_lib.FlowConfig()))
  c.loss = ml_collections.ConfigDict(dataclasses.asdict(config_lib.LossConfig()))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=50, total_steps=2000, end_lr_fraction=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, grad_accum_steps=1, num_steps=2000, log_every=20, seed=0,
      save_every=500, keep_last=3, keep_every=0, async_checkpoints=True,
      eval_every=500, eval_batches=2, eval_times=(0.25, 0.5, 0.75), max_nonfinite_steps=5))
  # Sampling after training (`python -m tv2tv_jax.generate` with these settings): needs the
  # toy-world data's tokenizer and VAE, so only the 'toy_world' source turns it on.
  c.sample = ml_collections.ConfigDict(dict(
      after_training=False, prompt="toy world", interventions=("1:left fire",),
      num_chunks=3, cfg_scale=2.0, ode_steps=16, seed=0))
  # Device mesh (-1: all remaining devices) and where logical axes go on it.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
  c.sharding_rules = sharding_rules.fsdp_tensor_rules()
  # Trainer-only settings (not part of the frozen Experiment).
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",
      # 'synthetic': how many distinct batches to cycle through (0 = fresh every step).
      synthetic_batches=0,
      max_examples_per_row=3, max_text_len=3,
      # 'toy_world', 'csgo', 'captioned_video': the trainer reads the prepared directory
      # data_dir ('' = <workdir>/toy_world_data here, <workdir>/data for CS:GO and video),
      # which `python -m tv2tv_jax.prepare` (and `main`, before training) builds
      # (data_pipelines/preparation.py).
      data_dir="",
      # TFDS builder config: a registered name only ({name: 'small'}) or custom sizes.
      toy_world=dict(name="quick", num_train=256, num_validation=16, num_chunks=3,
                     caption_mode="dense"),
      # The toy world's VAE recipe (experiments/vae_toy_world.py; its latent channels
      # become model.latent_shape[-1]): 'quick' trained for 300 steps.
      vae=vae_recipe("quick", train=dict(num_steps=300, eval_clips=8, stats_clips=16)),
      prompt="toy world",  # meta-prompt text of every example
      shuffle_seed=0, num_workers=0,
      caption_every=1,  # keep the text of every k-th chunk only
      wrong_caption_rate=0.0,  # share of kept texts replaced by another chunk's text
      plan_drop_rate=0.0,  # share of clips with every text dropped (plan-free CFG branch)
      max_open=4, window=64))  # RowPacker rows kept open; examples per packing window
  return c


def vae_recipe(variant: str, **overrides) -> ml_collections.ConfigDict:
  """The VAE experiment config `variant` of experiments/vae_toy_world.py, with
  `overrides` ({section: {field: value}}) applied."""
  v = vae_toy_world.get_config(variant)
  for section, values in overrides.items():
    v[section].update(values)
  return v


def _tiny(c):
  c.model.update(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, latent_shape=(4, 4, 4), patch_size=2,
                 unet_channels=16, unet_groups=4, time_embed_dim=16)
  c.seq.update(text_len=32, max_chunks=4, noisy_chunks=0)
  c.optim.update(learning_rate=3e-3, warmup_steps=10, total_steps=300)
  c.train.update(batch_size=8, num_steps=20, log_every=5, save_every=0, eval_every=0,
                 eval_batches=1)


def _quick(c):
  c.model.update(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, latent_shape=(8, 8, 8), unet_channels=32)
  # Rows of 2 toy-world clips of 3 chunks: 2 x 4 clean copies fill max_chunks=8 and
  # 2 x 3 noisy copies noisy_chunks=6 (given first frames have no noisy twin); their
  # texts (prompt, ~1.2 tokens per chunk text, BOF/EOF, EOS) take at most 30 text slots.
  c.seq.update(text_len=32, max_chunks=8, noisy_chunks=6)
  c.optim.update(learning_rate=2e-3, warmup_steps=30, total_steps=300)
  c.train.update(batch_size=4, num_steps=300, log_every=25, save_every=100, eval_every=100)
  # The whole chain on CPU in minutes (data_pipelines/preparation.py): 256 clips, a 300-step
  # VAE with 8 latent channels, a character-level BPE tokenizer, then this model.
  c.data.update(source="toy_world", synthetic_batches=4)
  # ...and end by generating a video whose chunk 1 is forced to "left fire".
  c.sample.after_training = True


def _small(c):
  c.model.update(vocab_size=1024, d_model=512, num_layers=4, num_heads=8, num_kv_heads=4,
                 head_dim=64, mlp_dim=1536, latent_shape=(8, 8, 16), unet_channels=64)
  c.train.update(batch_size=8)


def _pretrained(kind: str):
  def apply(c):
    """The toy world encoded by a pretrained tokenizer (docs/vae.md) instead of our VAE:
    its diffusers weights directory goes in `--config.data.vae_dir`; 16 latent channels."""
    c.data.update(vae_kind=kind, vae_dir="", vae_stats="data", vae_stats_clips=64,
                  vae_tile_latents=0)
    c.model.latent_shape = (*c.model.latent_shape[:2], 16)
  return apply


_VARIANTS = {"tiny": _tiny, "quick": _quick, "small": _small, "default": lambda c: None,
             "cosmos": _pretrained("cosmos"), "wan": _pretrained("wan")}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  """`arg`: a size variant, optionally followed by `,<layout>` (`config_lib.LAYOUTS`)."""
  c = _base()
  config_lib.apply_config_arg(c, arg, _VARIANTS)
  if c.seq.layout == "think2v":
    # Think2V closes every plan item with EOF: one more text slot per chunk (after the
    # size variant, whatever the order of the parts).
    c.seq.text_len += c.seq.max_chunks
  return c
