"""A trained run, restored onto the devices present: its parameters, its config, its data.

Shared by the commands that read a run's checkpoint (`evaluate`, `generate`, `main`'s
sample after training, the study's generation evaluation), so that they are siblings and
none imports another:

- `load_params`: the newest restorable checkpoint (or a given step, or a params-only
  export), its `trainer.Run` rebuilt from the checkpoint's own config on a mesh of the
  present devices, and the identity of the data it was trained on.
- `evaluate_checkpoint`: the held-out losses of that checkpoint (`heldout_losses`).
- `load_assets`: what generation needs: the restored model plus the run's text tokenizer
  and VAE, found through the data directory the run recorded and checked against the data
  identity the checkpoint holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from tv2tv_jax import (checkpoints, config as config_lib, heldout_losses, inputs, resume_check,
                       trainer, workdirs)


class GenerateError(ValueError):
  """A generation input is missing or malformed; the message names the flag / field."""


def load_params(workdir: str | os.PathLike, step: int | None = None,
                params_dir: str | os.PathLike | None = None, devices=None):
  """(Run on the present devices, params restored onto its mesh, step or None, the
  identity of the data the checkpoint was trained on: {} for a params-only export or a
  checkpoint that predates it).

  `workdir` (and `params_dir`): local paths or gs:// URIs.
  """
  wd = workdirs.as_path(workdir, "--workdir")
  workdirs.check_reachable(wd, "--workdir")
  if params_dir:
    run = run_from_config(workdirs.read_json(wd / "config.json", "--workdir"), devices)
    target = checkpoints.abstract_target(run.abstract_state().params, run.shardings.params)
    return run, checkpoints.restore_params(params_dir, target), None, {}
  ckpt = checkpoints.Checkpointer(wd / "checkpoints")
  # Newest first; a step whose state is bad (unreadable, non-finite) falls back to the
  # previous one, whose own config is read again. Read-only: nothing is moved aside.
  steps = [step] if step is not None else sorted(ckpt.all_steps(), reverse=True)
  if not steps:
    raise checkpoints.CheckpointError(f"no checkpoint in {ckpt.directory}")
  failures = []
  for s in steps:
    saved = ckpt.saved_config(s)
    if saved is None:
      failures.append(f"step {s}: its config cannot be read")
      continue
    run = run_from_config(saved[1], devices)
    try:
      restored = ckpt.restore(run.restore_target(), step=s)
    except checkpoints.CheckpointError as e:
      failures.append(str(e).split("\n", 1)[-1].strip())
      continue
    return run, restored.state["params"], restored.step, restored.data_identity
  raise checkpoints.CheckpointError(f"no checkpoint in {ckpt.directory} could be restored:"
                                    f"\n  " + "\n  ".join(failures))

def run_from_config(cfg_dict: dict, devices) -> trainer.Run:
  """The `trainer.Run` of a saved config (a dict), on a data-parallel mesh of `devices`."""
  cfg = config_lib.run_config_from_config_dict(cfg_dict)
  # Whatever devices are here, all data-parallel (the default mesh).
  return trainer.Run(dataclasses.replace(cfg, mesh=config_lib.MeshConfig()), devices)

def evaluate_checkpoint(workdir: str | os.PathLike, step: int | None = None,
                        params_dir: str | os.PathLike | None = None, devices=None,
                        loaded: tuple | None = None) -> dict:
  """The held-out losses of a checkpoint (see `heldout_losses`), plus its step.

  loaded: what `load_params(workdir, step, params_dir, devices)` returned, when the caller
  has it already (restoring twice costs a second pass over the checkpoint).
  """
  run, params, step, trained_on = loaded or load_params(workdir, step, params_dir, devices)
  # The data is checked before any batch is built from it.
  identity, data_dir = inputs.data_identity(run.exp, run.config, workdir=workdir)
  resume_check.check_data_identity(trained_on, identity, step, data_dir)
  batches = inputs.make_eval_batches(run.exp, run.config, workdir=workdir)
  metrics = heldout_losses.evaluate(run.eval_fn(), params, batches, run.exp.train.eval_times,
                                run.mesh)
  return {"step": step, "devices": run.mesh.size, **metrics}


@dataclasses.dataclass
class Assets:
  """What generation needs from a run: the restored model and its tokenizers.

  run: `trainer.Run` (run.exp, run.model, run.config); params: the TV2TV param tree;
  step: the checkpoint step (None for a params-only export); text: `TextTokenizer`;
  video: `VideoTokenizer` with latent statistics (decodes normalised latents);
  data_dir: the prepared data directory they came from ('' when not from one).
  """
  run: Any
  params: Any
  step: int | None
  text: Any
  video: Any
  data_dir: str = ""


def data_dir_of(workdir: str, cfg: Any) -> str:
  """The run's prepared data directory (`inputs.data_dir` of its config: a RunConfig, or a
  raw one such as config.json's), where generation finds its text tokenizer and VAE; a
  local path (WorkdirError naming data.data_dir otherwise: set it in the run's
  config.json to a local copy)."""
  return inputs.data_dir(cfg, workdir)


def load_tokenizers(data_dir: str, exp: Any):
  """(TextTokenizer, video tokenizer with stats) of a prepared data dir, checked against
  `exp` and against the latents the run trained on.

  The video tokenizer is whichever `data.vae_kind` prepared (`tokenizer_store.load`: our
  VAE, or a converted Cosmos / Wan one). It must be the one that encoded the latents
  (latents/meta.json records its kind and weights hash), and its latents must have the
  model's `latent_shape` as the latent dataset records it (any frame size); without
  latents (a run on the synthetic source), as our VAE's config gives it, or the channels
  of a pretrained one.

  Raises GenerateError naming the missing file or the incompatible field, and
  tokenizer_store.TokenizerMismatchError when the tokenizer is not the one that encoded
  the training latents.
  """
  from data_pipelines import tokenizer as tokenizer_lib
  from tv2tv_jax.config import ConfigError
  from tv2tv_jax.vae import model as vae_model, tokenizer_store
  tok_path = os.path.join(data_dir, "tokenizer.json")
  vae_dir = os.path.join(data_dir, "vae")
  meta_path = os.path.join(data_dir, "latents", "meta.json")
  missing = [p for p in (tok_path, os.path.join(vae_dir, tokenizer_store.PARAMS_FILE))
             if not os.path.exists(p)]
  if missing:
    raise GenerateError(f"--workdir: the run's data directory {data_dir} lacks "
                        f"{', '.join(os.path.relpath(p, data_dir) for p in missing)}; "
                        f"generation needs the run's text tokenizer and VAE")
  text = tokenizer_lib.load_tokenizer(tok_path)
  try:
    tokenizer_lib.check_compatible(text, exp)
  except ConfigError as e:
    raise GenerateError(f"tokenizer.json does not fit the checkpoint's config: {e}") from e
  try:
    video = tokenizer_store.load(vae_dir)
  except FileNotFoundError as e:
    raise GenerateError(f"--workdir: {e}") from e
  # A run on the synthetic source trained on no latents: nothing to match then.
  meta = {}
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    tokenizer_store.check_matches(vae_dir, meta.get("encoder_info", {}),
                                  os.path.relpath(meta_path, data_dir))
  if video.stats is None:
    stats_path = os.path.join(data_dir, "latents", "latent_stats.json")
    if not os.path.exists(stats_path):
      raise GenerateError(f"--workdir: neither vae/latent_stats.json nor "
                          f"latents/latent_stats.json in {data_dir}; decoding the model's "
                          f"normalised latents needs the latent statistics")
    with open(stats_path) as f:
      video = dataclasses.replace(video, stats=vae_model.LatentStats.from_json(json.load(f)))
  shape, where = meta.get("latent_shape"), os.path.relpath(meta_path, data_dir)
  if shape is None and isinstance(video.config, vae_model.VAEConfig):
    side = video.config.frame_size // video.config.spatial_factor  # our VAE: square frames
    shape, where = (side, side, video.config.latent_channels), "vae/vae_config.json"
  if shape is None:
    shape, where = (*exp.model.latent_shape[:2], video.latent_channels), "vae/"
  if tuple(shape) != tuple(exp.model.latent_shape):
    raise GenerateError(f"the video tokenizer's latents ({where}) are {tuple(shape)}, but "
                        f"model.latent_shape is {tuple(exp.model.latent_shape)}")
  return text, video

def load_assets(workdir: str, checkpoint: int | None = None, devices=None) -> Assets:
  """Restores `workdir`'s checkpoint (newest, or step `checkpoint`) onto the present devices
  and loads its tokenizers. Raises GenerateError naming --workdir / --checkpoint."""
  wd = workdirs.as_path(workdir, "--workdir")
  workdirs.check_reachable(wd, "--workdir")
  if not (wd / "config.json").exists():
    raise GenerateError(f"--workdir: {workdir} has no config.json (not a training run?)")
  try:
    run, params, step, trained_on = load_params(workdir, checkpoint, devices=devices)
  except checkpoints.CheckpointError as e:
    raise GenerateError(f"--checkpoint: {e}") from e
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise GenerateError(f"--checkpoint: cannot restore step {checkpoint} of {workdir} "
                        f"onto its config ({type(e).__name__}: {e})") from e
  # The model comes from the checkpoint's own config; where the data lives may have moved
  # since (data.data_dir is safe to change on resume), so that is read from config.json.
  try:
    latest = workdirs.read_json(wd / "config.json", "--workdir")
  except workdirs.WorkdirError as e:
    raise GenerateError(str(e)) from e
  data_dir = data_dir_of(workdir, latest)
  from data_pipelines import prepared  # local: heavy imports
  try:
    resume_check.check_data_identity(trained_on, prepared.data_identity(data_dir), step,
                                     data_dir)
  except resume_check.ResumeError as e:
    raise GenerateError(f"--workdir: {e}") from e
  text, video = load_tokenizers(data_dir, run.exp)
  return Assets(run, params, step, text, video, data_dir)
