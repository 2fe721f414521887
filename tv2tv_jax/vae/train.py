r"""Trains the video VAE on toy-world clips; evaluates held-out PSNR; saves and reloads params.

    python -m tv2tv_jax.vae.train --config=experiments/vae_toy_world.py:quick --workdir=/tmp/vae \
        [--config.train.num_steps=500 ...]

Writes into the work directory (a local path or a gs:// URI, `tv2tv_jax.workdirs`):
  config.json         the full experiment config
  metrics.jsonl       one JSON object per logged step (loss, recon, kl, psnr, grad norm, lr, clips/s)
  vae_config.json     the frozen VAEConfig (what `video_tokenizer.load_tokenizer` rebuilds the model from)
  params.msgpack      the trained parameters (flax msgpack serialisation)
  latent_stats.json   per-channel mean/std of latent means over `stats_clips` training clips
  eval.json           held-out PSNR (clips from `eval_seed_start`, never trained on)

Loss: reconstruction (`recon_loss`: mean |x - x_hat| or mean squared error over pixels in
[-1, 1]) + `kl_weight` * mean KL(q(z|x) || N(0, I)) over latent elements. PSNR is measured on
[0, 1] pixels (= the uint8 PSNR): 10 log10(1 / MSE), reconstructions clipped to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import threading
import time
from typing import Any, Iterable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import oracle, toy_world
from tv2tv_jax import workdirs
from tv2tv_jax.config import ConfigError
from tv2tv_jax.vae import model as vae_model
from tv2tv_jax.vae.model import LatentStats, VAEConfig, VideoVAE
from tv2tv_jax.vae.video_tokenizer import reconstruct, save, to_float, to_uint8

RECON_LOSSES = ("l1", "mse")


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
  """Optimisation, data seeds and evaluation of one VAE run (validated on construction)."""
  batch_size: int = 8  # clips per step
  clip_chunks: int = 2  # k: training clips have 1 + 4k frames
  num_steps: int = 2000
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  end_lr_fraction: float = 0.05  # cosine decay ends at learning_rate * this
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.99
  grad_clip: float = 1.0
  recon_loss: str = "l1"
  # Per-pixel weight of the sprites (pixels that differ from the clip's static arena:
  # agent and projectiles) in the reconstruction loss; 1 = plain mean. The agent is 16 of
  # 4096 pixels, so a plain mean lets the VAE blur it away at almost no cost.
  foreground_weight: float = 1.0
  kl_weight: float = 1e-4
  seed: int = 0  # parameter init and reparameterisation noise
  train_seed_start: int = 0  # step s uses clip seeds start + s * batch_size + [0, batch_size)
  eval_seed_start: int = 1_000_000  # held-out clips: eval_seed_start + [0, eval_clips)
  eval_clips: int = 32
  eval_chunks: int = 4
  eval_batch: int = 8
  stats_clips: int = 32  # clips for the latent normalisation statistics
  log_every: int = 100
  prefetch: int = 2  # batches generated ahead by a background thread

  def __post_init__(self):
    def require(cond, name, message):
      if not cond:
        raise ConfigError(f"train.{name}", message)
    for name in ("batch_size", "clip_chunks", "num_steps", "eval_clips", "eval_chunks",
                 "eval_batch", "stats_clips", "log_every", "prefetch"):
      require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    require(self.learning_rate > 0, "learning_rate", "must be positive")
    require(0 <= self.warmup_steps < self.num_steps, "warmup_steps",
            f"must lie in [0, num_steps={self.num_steps})")
    require(self.recon_loss in RECON_LOSSES, "recon_loss", f"one of {RECON_LOSSES}, got "
            f"{self.recon_loss!r}")
    require(self.kl_weight >= 0, "kl_weight", "must be >= 0")
    require(self.foreground_weight >= 1.0, "foreground_weight",
            f"must be >= 1 (1 = unweighted), got {self.foreground_weight}")
    last_train_seed = self.train_seed_start + self.num_steps * self.batch_size
    # Held-out means held out: no training step may draw an evaluation clip.
    require(self.eval_seed_start >= last_train_seed
            or self.eval_seed_start + self.eval_clips <= self.train_seed_start,
            "eval_seed_start", f"evaluation seeds [{self.eval_seed_start}, "
            f"{self.eval_seed_start + self.eval_clips}) overlap training seeds "
            f"[{self.train_seed_start}, {last_train_seed})")


def configs_from_config_dict(cfg: Mapping[str, Any]) -> tuple[VAEConfig, VAETrainConfig]:
  """(VAEConfig, VAETrainConfig) from an experiment ConfigDict with sections `vae` and `train`."""
  vae_cfg = vae_model.vae_config_from_dict(cfg["vae"])
  values = dict(cfg["train"].to_dict() if hasattr(cfg["train"], "to_dict") else cfg["train"])
  names = {f.name for f in dataclasses.fields(VAETrainConfig)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"train.{unknown[0]}", f"unknown field; VAETrainConfig has {sorted(names)}")
  train_cfg = VAETrainConfig(**values)
  world = toy_world.ToyWorldConfig()
  if vae_cfg.frame_size != world.size or vae_cfg.in_channels != 3:
    raise ConfigError("vae.frame_size", f"toy-world clips are {world.size}x{world.size} RGB; "
                      f"got frame_size={vae_cfg.frame_size}, in_channels={vae_cfg.in_channels}")
  return vae_cfg, train_cfg


# --------------------------------------------------------------------------- data

def clip_frames(seeds: Iterable[int], num_chunks: int) -> np.ndarray:
  """Toy-world clips as one batch: f32[len(seeds), 1 + 4 * num_chunks, 64, 64, 3] in [-1, 1]."""
  return clip_batch(seeds, num_chunks)[0]


def clip_batch(seeds: Iterable[int], num_chunks: int) -> tuple[np.ndarray, np.ndarray]:
  """Toy-world clips and their sprite masks.

  Returns:
    frames: f32[B, 1 + 4k, 64, 64, 3] in [-1, 1];
    foreground: bool[B, 1 + 4k, 64, 64] pixels that differ from the clip's static arena
      (the agent and projectiles), where `foreground_weight` applies.
  """
  clips = [toy_world.generate_clip(int(s), num_chunks) for s in seeds]
  frames = np.stack([to_float(c.frames) for c in clips])
  fg = np.stack([(c.frames != c.layout[None]).any(-1) for c in clips])
  return frames, fg


def step_seeds(cfg: VAETrainConfig, step: int) -> range:
  """The clip seeds of training step `step` (deterministic, disjoint across steps)."""
  start = cfg.train_seed_start + step * cfg.batch_size
  return range(start, start + cfg.batch_size)


def train_batches(cfg: VAETrainConfig, start_step: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(frames, foreground) batches (`clip_batch`) for steps start_step, start_step + 1, ...,
  generated `prefetch` ahead in a thread.

  Generation is NumPy (about 8 ms per 4-chunk clip), so it overlaps the jitted step, which
  releases the GIL while it runs.
  """
  q: queue.Queue = queue.Queue(maxsize=cfg.prefetch)
  stop = threading.Event()

  def worker():
    step = start_step
    while not stop.is_set() and step < cfg.num_steps:
      batch = clip_batch(step_seeds(cfg, step), cfg.clip_chunks)
      while not stop.is_set():
        try:
          q.put(batch, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    for _ in range(start_step, cfg.num_steps):
      yield q.get()
  finally:
    stop.set()


# --------------------------------------------------------------------------- training

@flax.struct.dataclass
class VAETrainState:
  step: jax.Array  # int32[]
  params: Any
  opt_state: Any


def make_optimizer(cfg: VAETrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on a linear-warmup cosine schedule."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.num_steps, end_value=cfg.learning_rate * cfg.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


def create_train_state(vae_cfg: VAEConfig, cfg: VAETrainConfig, rng: jax.Array) -> VAETrainState:
  params = vae_model.init_params(vae_cfg, rng, 1 + vae_cfg.temporal_factor * cfg.clip_chunks)
  return VAETrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=make_optimizer(cfg).init(params))


def psnr_from_mse(mse: Any) -> Any:
  """PSNR in dB on [0, 1] pixels from the MSE of [-1, 1] pixels (their range is 2, so / 4)."""
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def make_train_step(vae_cfg: VAEConfig, cfg: VAETrainConfig):
  """jit((state, frames f32[B, 1+4k, H, W, 3], foreground bool[B, 1+4k, H, W], rng)
  -> (state, metrics)); the state is donated.

  The reconstruction loss weighs foreground pixels by `foreground_weight` and normalises by
  the total weight, so with weight 1 it is the plain mean.

  The reparameterisation noise of step s is drawn from fold_in(rng, s), so a run is a pure
  function of its config.
  """
  model, tx = VideoVAE(vae_cfg), make_optimizer(cfg)
  schedule_lr = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.num_steps,
      cfg.learning_rate * cfg.end_lr_fraction)

  def loss_fn(params, frames, foreground, rng):
    recon, mean, logvar = model.apply({"params": params}, frames, rng, sample=True)
    err = recon - frames
    mse = jnp.mean(jnp.square(err))
    w = 1.0 + (cfg.foreground_weight - 1.0) * foreground.astype(jnp.float32)[..., None]
    per_px = jnp.abs(err) if cfg.recon_loss == "l1" else jnp.square(err)
    rec = jnp.sum(w * per_px) / (jnp.sum(w) * per_px.shape[-1])
    kl = jnp.mean(vae_model.kl_divergence(mean, logvar))
    loss = rec + cfg.kl_weight * kl
    return loss, {"loss": loss, "recon": rec, "kl": kl, "psnr": psnr_from_mse(mse),
                  "latent_std": jnp.mean(jnp.exp(0.5 * logvar))}

  def step(state: VAETrainState, frames: jax.Array, foreground: jax.Array, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, frames, foreground, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule_lr(state.step))
    return VAETrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(step, donate_argnums=0)


@jax.jit
def _clip_mse(recon: jax.Array, frames: jax.Array) -> jax.Array:
  """Per-clip MSE of [-1, 1] pixels after clipping: f32[B, T, H, W, 3] x2 -> f32[B]."""
  return jnp.mean(jnp.square(jnp.clip(recon, -1.0, 1.0) - frames), axis=(1, 2, 3, 4))


def evaluate(vae_cfg: VAEConfig, params: Any, cfg: VAETrainConfig) -> dict[str, float]:
  """Held-out reconstruction quality (latent means, no sampling) on `eval_clips` clips.

  Returns psnr_mean (mean of per-clip PSNR), psnr_min, psnr_global (from the pooled MSE),
  first_frame_psnr (frame 0, encoded alone), num_clips, num_frames (per clip), and what
  the toy-world oracle reads back from the reconstructions (uint8, as a decoded sample
  would be): oracle_movement / oracle_fire / oracle_both, the share of chunks whose
  read action equals the true one, and oracle_valid_frames, the share of frames that
  pass the oracle's strict validity check against the true first frame. PSNR is dominated
  by the background; the oracle scores say whether the agent survived the VAE.
  """
  mses, first, read, truth, valid = [], [], [], [], []
  seeds = list(range(cfg.eval_seed_start, cfg.eval_seed_start + cfg.eval_clips))
  for i in range(0, len(seeds), cfg.eval_batch):
    clips = [toy_world.generate_clip(s, cfg.eval_chunks) for s in seeds[i:i + cfg.eval_batch]]
    frames = np.stack([to_float(c.frames) for c in clips])
    recon = reconstruct(params, frames, vae_cfg)
    mses.append(np.asarray(_clip_mse(recon, frames)))
    first.append(np.asarray(_clip_mse(recon[:, :1], frames[:, :1])))
    for clip, rec in zip(clips, to_uint8(recon)):
      read += oracle.classify_chunks(rec)
      truth += clip.actions
      valid += list(oracle.frame_validity(rec, clip.frames[0])[0])
  mse, first_mse = np.concatenate(mses), np.concatenate(first)
  psnr = np.asarray(psnr_from_mse(mse))
  agree = oracle.action_agreement(read, truth)
  return {"psnr_mean": float(psnr.mean()), "psnr_min": float(psnr.min()),
          "psnr_global": float(psnr_from_mse(mse.mean())),
          "first_frame_psnr": float(psnr_from_mse(first_mse.mean())),
          "num_clips": len(seeds), "num_frames": 1 + 4 * cfg.eval_chunks,
          "oracle_movement": agree["movement"], "oracle_fire": agree["fire"],
          "oracle_both": agree["both"], "oracle_valid_frames": float(np.mean(valid))}


def compute_latent_stats(vae_cfg: VAEConfig, params: Any, seeds: Iterable[int],
                         num_chunks: int, batch: int = 8) -> LatentStats:
  """Per-channel mean/std of latent means over toy-world clips `seeds` (1 + 4*num_chunks frames)."""
  seeds = list(seeds)
  return vae_model.latent_stats(
      vae_model.encode(params, clip_frames(seeds[i:i + batch], num_chunks), vae_cfg)
      for i in range(0, len(seeds), batch))


# --------------------------------------------------------------------------- the loop

def train_vae(cfg: Any, workdir: str | os.PathLike, log=print) -> dict[str, Any]:
  """Trains, evaluates held-out PSNR, computes latent stats, saves; returns a summary dict.

  Args:
    cfg: an experiment ConfigDict (`experiments/vae_toy_world.py`), sections vae and train.
    workdir: output directory (created; local or gs://); see the module docstring for its
      files.
    log: where progress lines go.
  """
  vae_cfg, tcfg = configs_from_config_dict(cfg)  # validates before any compile
  wd = workdirs.as_path(workdir)
  workdirs.check_reachable(wd)
  wd.mkdir(parents=True, exist_ok=True)
  (wd / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True) if hasattr(
      cfg, "to_json_best_effort") else json.dumps(dict(cfg), default=str))

  init_rng, step_rng = jax.random.split(jax.random.key(tcfg.seed))
  state = create_train_state(vae_cfg, tcfg, init_rng)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  batches = train_batches(tcfg)
  first = next(batches)
  t0 = time.time()
  step_fn = make_train_step(vae_cfg, tcfg).lower(state, *first, step_rng).compile()
  mem = step_fn.memory_analysis()
  log(f"vae: {n_params / 1e6:.2f}M params, clips of {first[0].shape[1]} frames -> "
      f"{vae_cfg.num_latents(first[0].shape[1])} latents "
      f"{vae_cfg.latent_shape(first[0].shape[1])[1:]}, "
      f"batch {tcfg.batch_size}, compiled in {time.time() - t0:.1f}s"
      + (f", temp {mem.temp_size_in_bytes / 2**20:.0f} MiB" if mem is not None else ""))

  records = []
  t_start = t_log = time.time()
  # On GCS the object appears when the file closes (fsspec uploads in blocks).
  with (wd / "metrics.jsonl").open("w") as mf:
    batch = first
    for step in range(tcfg.num_steps):
      if step > 0:
        batch = next(batches)
      state, metrics = step_fn(state, *batch, step_rng)
      if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.num_steps:
        rec = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        done = (step + 1) % tcfg.log_every or tcfg.log_every
        rec.update(step=step + 1, clips_per_s=done * tcfg.batch_size / (now - t_log),
                   elapsed_s=now - t_start)
        t_log = now
        records.append(rec)
        mf.write(json.dumps(rec) + "\n")
        mf.flush()
        log(f"step {step + 1:5d}  loss {rec['loss']:.4f}  recon {rec['recon']:.4f}  "
            f"kl {rec['kl']:.2f}  psnr {rec['psnr']:.2f}  gnorm {rec['grad_norm']:.3f}  "
            f"lr {rec['lr']:.2e}  {rec['clips_per_s']:.1f} clips/s")
  train_time = time.time() - t_start

  params = state.params
  result = evaluate(vae_cfg, params, tcfg)
  result.update(train_steps=tcfg.num_steps, train_time_s=train_time, num_params=n_params)
  log(f"held-out ({result['num_clips']} clips x {result['num_frames']} frames): "
      f"PSNR {result['psnr_mean']:.2f} dB mean, {result['psnr_min']:.2f} min, "
      f"{result['psnr_global']:.2f} pooled, first frame {result['first_frame_psnr']:.2f}; "
      f"oracle reads movement {result['oracle_movement']:.3f}, fire {result['oracle_fire']:.3f}, "
      f"both {result['oracle_both']:.3f}, valid frames {result['oracle_valid_frames']:.3f}")
  stats_seeds = range(tcfg.train_seed_start, tcfg.train_seed_start + tcfg.stats_clips)
  stats = compute_latent_stats(vae_cfg, params, stats_seeds, tcfg.eval_chunks, tcfg.eval_batch)
  save(wd, vae_cfg, params, stats)
  (wd / "eval.json").write_text(json.dumps(result, indent=2))
  return {"records": records, "eval": result, "stats": stats, "params": params,
          "vae_config": vae_cfg}


def _main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  summary = train_vae(_CONFIG.value, _WORKDIR.value)
  print("done:", json.dumps(summary["eval"]))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (tests, the
  # data pipeline) never collides with other entry points' --config/--workdir flags.
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "VAE experiment config file[:variant].",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)
