"""The toy-world study: TV2TV against T2V and Think2V, trained identically, scored by generation.

Run the whole study (data, VAE, tokenizer shared by every arm; then each arm and seed
trained, evaluated by generation, and the report written), resuming whatever is done:

    python -m tv2tv_jax.study --config=experiments/toy_study.py --workdir=/tmp/toy_study

Variants (the part after the colon):
  default  the study (docs/results.md): clips of 12 chunks (3 s after the first frame, so
           an action can be inserted at 1 s and at 3 s), a 4-layer d=128 model per arm.
  smoke    the same chain at test size (tests/test_study.py): tiny VAE, tiny model, a few
           steps; checks the plumbing, measures nothing.

Everything an arm trains with comes from this one config; the study command only sets
`seq.layout` and `train.seed` per arm (`study.arms` x `study.seeds`), so the arms share
model, data, steps, optimiser and seeds by construction.
"""

import ml_collections

from tv2tv_jax import config as config_lib

from experiments import toy_world


def _study(c: ml_collections.ConfigDict) -> None:
  # 16x16x8 latents (the `study` VAE, spatial factor 4: the oracle reads the agent back
  # from its reconstructions, docs/vae.md) patchified 4x4 -> n = 16 tokens per chunk.
  c.model.update(vocab_size=256, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, latent_shape=(16, 16, 8), patch_size=4,
                 unet_channels=32, unet_groups=8, time_embed_dim=64)
  # One clip per row: first frame + 12 chunks = 13 clean copies, 12 noisy copies. Text:
  # prompt, EOF after the first frame, per chunk its action (1-3 tokens), BOF and EOF
  # (Think2V: plus an EOF closing each plan item), EOS: at most ~70 slots.
  c.seq.update(text_len=80, max_chunks=13, noisy_chunks=12)
  # 1000 steps of batch 8: ~0.8 s per step on 2 CPU cores, ~14 minutes per arm and seed.
  c.optim.update(learning_rate=2e-3, warmup_steps=100, total_steps=1000, end_lr_fraction=0.05)
  c.train.update(batch_size=8, num_steps=1000, log_every=25, save_every=200, keep_last=2,
                 eval_every=500, eval_batches=2)
  c.data.update(
      source="toy_world", synthetic_batches=0, max_examples_per_row=1,
      toy_world=dict(name="study", num_train=2048, num_validation=32, num_chunks=12,
                     caption_mode="dense"),
      prompt="toy world")
  # Replaced, not updated: ConfigDict.update merges dicts, which would keep the main
  # job's 300-step VAE training.
  c.data.vae = toy_world.vae_recipe("study")
  c.sample.after_training = False
  # The study: arms x seeds, and the generation evaluation of every run.
  c.study = ml_collections.ConfigDict(dict(
      arms=config_lib.LAYOUTS, seeds=(0, 1, 2),
      # uncond: CFG's second branch, 'mask' or 'plan_free' (docs/model.md); plan_free
      # wants data.plan_drop_rate > 0.
      eval=dict(num_clips=32, batch=8, cfg_scale=3.0, ode_steps=16, times=(1.0, 3.0),
                seed=0, uncond="mask"),
      bootstrap_resamples=2000))


def _smoke(c: ml_collections.ConfigDict) -> None:
  _study(c)
  c.model.update(vocab_size=128, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                 head_dim=16, mlp_dim=64, latent_shape=(8, 8, 4), patch_size=4,
                 unet_channels=8, unet_groups=4, time_embed_dim=16)
  c.seq.update(text_len=40, max_chunks=5, noisy_chunks=4)
  c.optim.update(warmup_steps=1, total_steps=3)
  c.train.update(batch_size=8, num_steps=3, log_every=1, save_every=0, eval_every=0)
  c.data.update(toy_world=dict(name="smoke", num_train=8, num_validation=2, num_chunks=4,
                               caption_mode="dense"))
  c.data.vae = toy_world.vae_recipe("tiny")
  c.study.update(seeds=(0,))
  c.study.eval.update(num_clips=2, batch=2, ode_steps=1, times=(0.25, 0.75))
  c.study.bootstrap_resamples = 200


_VARIANTS = {"default": _study, "smoke": _smoke}


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
  """`arg`: default or smoke."""
  c = toy_world.get_config("default")
  arg = (arg or "default").strip()
  if arg not in _VARIANTS:
    raise ValueError(f"unknown config variant {arg!r}; known {sorted(_VARIANTS)}")
  _VARIANTS[arg](c)
  return c
