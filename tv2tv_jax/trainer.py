"""The training loop: mesh, sharded init or resume, train, evaluate, checkpoint, log.

`main.py` only parses flags. Writes into the work directory (process 0):
  config.json        the experiment config
  metrics.jsonl      one JSON object per logged step (appended across resumes; steps a
                     resume from an older checkpoint runs again replace the earlier
                     records, which move to metrics.superseded.jsonl)
  tensorboard/       TensorBoard event files of the same scalars
  checkpoints/<step> Orbax checkpoints (state, input-iterator state, config, fingerprints
                     and data identity)
  LOCK               held while a run writes (`run_lock`; LOCK.guard, local only, stays:
                     removing it could let two processes lock different files)

A run resumes from the newest good checkpoint in `workdir/checkpoints`; the
input stream and the per-step randomness (fold_in(seed, step)) resume with it, so a
resumed run logs exactly the losses an uninterrupted one would. Before anything is
restored or written, the requested config is compared with the one the newest
checkpoint was trained with (`resume_check`): a change that alters what the
checkpoint means is refused, naming each field; `config.json` is written only after.

One process writes a work directory at a time: the run holds `<workdir>/LOCK`
(`run_lock`) and a second start is refused, naming the holder.

`workdir` is a local path or a gs:// URI (`tv2tv_jax.workdirs`); what cannot use a
bucket (the prepared data directory) is refused before anything is built.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from tv2tv_jax import (checkpoints, flops, heldout_losses, inputs, llama_init, metric_logging,
                       resume_check, run_lock, sharding, train_step, workdirs)
from tv2tv_jax import config as config_lib
from tv2tv_jax.model import TV2TV


class NonFiniteLossError(RuntimeError):
  """Too many consecutive non-finite losses; the last good checkpoint is intact."""


def _config_dict(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as plain JSON values: what config.json and every checkpoint record."""
  if hasattr(cfg, "to_json_best_effort"):
    return json.loads(cfg.to_json_best_effort())
  return json.loads(json.dumps(dict(cfg), default=str))


class Run:
  """Everything a training or evaluation process builds from one config.

  `cfg`: a `config.RunConfig`, or a raw config (ConfigDict or saved config.json dict)
  parsed into one, which validates it before any compile. `run.config` is the
  RunConfig, `run.exp` its Experiment.
  """

  def __init__(self, cfg: config_lib.RunConfig | ml_collections.ConfigDict, devices=None):
    self.config = config_lib.as_run_config(cfg)
    self.exp = self.config.exp
    self.mesh = sharding.make_mesh(self.config.mesh, devices)
    self.rules = self.config.sharding_rules
    sharding.check_divisibility(self.exp, self.mesh)
    self.model = TV2TV(self.exp.model)
    self.init_rng, self.step_rng = jax.random.split(jax.random.key(self.exp.train.seed))
    self.shardings = sharding.state_shardings(self.model, self.exp, self.mesh, self.rules)

  def abstract_state(self):
    return jax.eval_shape(lambda r: nn.unbox(train_step.boxed_train_state(
        self.model, self.exp, r)), self.init_rng)

  def restore_target(self):
    """Abstract saved tree carrying this mesh's shardings."""
    return checkpoints.abstract_target(checkpoints.state_tree(self.abstract_state()),
                                       checkpoints.state_tree(self.shardings))

  def state_from_tree(self, tree) -> train_step.TrainState:
    return train_step.TrainState(step=tree["step"], params=tree["params"],
                                 opt_state=tree["opt_state"],
                                 tx=train_step.make_optimizer(self.exp.optim))

  def eval_fn(self):
    return heldout_losses.make_eval_fn(self.model, self.exp, self.mesh, self.rules,
                                   self.shardings.params)


def check_workdir(cfg: config_lib.RunConfig, workdir: str | os.PathLike):
  """The run's work directory as an epath.Path, checked before anything is built.

  Raises workdirs.WorkdirError naming the flag or field: a scheme other than gs://, a
  gs:// directory without the packages to reach it, or a prepared data directory that
  is not local (`data.data_dir`; see `inputs.data_dir` for its default).
  """
  wd = workdirs.as_path(workdir, "--workdir")
  workdirs.check_reachable(wd, "--workdir")
  if cfg.data.source in config_lib.PREPARED_SOURCES:
    inputs.data_dir(cfg, wd)
  return wd


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike,
          log: Callable[[str], None] = print, devices=None,
          allow_config_change: tuple[str, ...] = ()) -> list[dict[str, float]]:
  """Trains (or resumes) the configured model; returns the records logged by this call.

  `cfg`: the experiment config (ConfigDict or dict): parsed once into a
  `config.RunConfig`, and recorded as given (config.json, every checkpoint).

  `workdir`: a local path or gs:// URI (str or path). `devices` (default: all) are the
  devices the mesh is built on. `allow_config_change`: dotted config fields (or section
  prefixes) a resume may change beyond `resume_check.SAFE_TO_CHANGE`.

  Raises:
    config.ConfigError: a config field that cannot work (before any compile).
    resume_check.ResumeError: the config changes what the existing checkpoints mean
      (before anything is restored or written).
    workdirs.WorkdirError: a work or data directory that cannot be used (before any
      compile; see `check_workdir`).
    run_lock.WorkdirLockedError: another live process writes `workdir` (its lock,
      `run_lock`, is taken before anything is read or written).
    NonFiniteLossError: `train.max_nonfinite_steps` consecutive skipped updates.
  """
  config = config_lib.as_run_config(cfg)  # every field checked first
  wd = check_workdir(config, workdir)
  run = Run(config, devices)
  wd.mkdir(parents=True, exist_ok=True)
  lock = _lock_workdir(wd, log)
  try:
    return _train(run, _config_dict(cfg), wd, log, allow_config_change, lock)
  finally:
    if lock is not None:
      lock.release()


def _lock_workdir(wd, log: Callable[[str], None]) -> run_lock.WorkdirLock | None:
  """Process 0 takes the work directory's lock (returned; None elsewhere); every process
  raises WorkdirLockedError if it could not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = run_lock.WorkdirLock(wd, log).acquire()
    except run_lock.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise run_lock.WorkdirLockedError(f"--workdir {wd}: process 0 could not take its "
                                        f"lock (its log says why)")
  if error is not None:
    raise error
  return lock


def _train(run: Run, record: dict[str, Any], wd, log: Callable[[str], None],
           allow_config_change: tuple[str, ...], lock: run_lock.WorkdirLock | None
           ) -> list[dict[str, float]]:
  """`train` once the work directory is locked; `record`: the config as JSON values,
  written to config.json and every checkpoint (everything read comes from run.config)."""
  exp, mesh, cfg = run.exp, run.mesh, run.config
  tc = exp.train
  ckpt = checkpoints.Checkpointer(wd / "checkpoints",
                                  max_to_keep=tc.keep_last, keep_every=tc.keep_every or None,
                                  async_save=tc.async_checkpoints)
  saved = ckpt.saved_config()
  changes = (resume_check.check_resume(saved[1], record, saved[0],
                                       allow_config_change) if saved else [])
  data = inputs.make_train_input(exp, cfg, workdir=wd)
  identity, data_dir = inputs.data_identity(exp, cfg, workdir=wd)
  restored = ckpt.restore(run.restore_target(),
                          log if jax.process_index() == 0 else lambda _: None, set_aside=True)
  if restored is not None:
    changes += resume_check.check_data_identity(restored.data_identity, identity,
                                                restored.step, data_dir, allow_config_change)
  # Only now, with the config and the data checked against the checkpoint, is anything
  # of this start written.
  if jax.process_index() == 0:
    (wd / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True))
  logger = metric_logging.MetricLogger(wd, tc.num_steps, log,
                                       start_step=restored.step if restored else 0)
  for line in changes:
    logger.message(f"config changed on resume (allowed): {line}")
  if restored is not None:
    start = restored.step
    state = run.state_from_tree(restored.state)
    data.set_state(restored.data)
    logger.message(f"resumed from checkpoint step {start} in {ckpt.directory}")
  else:
    start = 0
    state, _ = sharding.init_sharded_state(run.model, exp, mesh, run.rules, run.init_rng)
    if cfg.init.llama_dir:
      # Text tower (and optionally the video tower) from a Llama-3 checkpoint; the
      # optimizer state is all zeros, so it need not be rebuilt.
      state = state.replace(params=llama_init.init_from_config(
          cfg.init, exp.model, state.params, log=logger.message))

  step_fn = sharding.make_sharded_train_step(run.model, exp, mesh, run.rules, run.shardings)
  eval_fn, eval_batches = run.eval_fn(), inputs.make_eval_batches(exp, cfg, workdir=wd)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  step_flops = flops.train_step_flops(exp, tc.batch_size)
  peak = flops.device_peak_flops() * mesh.size
  logger.message(
      f"model: {n_params / 1e6:.2f}M params; row length {exp.row_len} (text {exp.seq.text_len}"
      f", {exp.seq.num_noisy} noisy + {exp.seq.max_chunks} clean chunk copies x "
      f"{exp.model.tokens_per_chunk} tokens); "
      f"layout {exp.seq.layout}; {step_flops / 1e9:.2f} GFLOP/step; mesh "
      f"{dict(mesh.shape)}")

  records, consecutive_bad, skipped_total = [], 0, 0
  tokens_per_step = tc.batch_size * exp.row_len
  steps_in_window, t_start = 0, time.perf_counter()
  with jax.set_mesh(mesh):
    first = sharding.put_batch(next(data), mesh)
    compiled = step_fn.lower(state, first, run.step_rng).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
      logger.message(f"compiled step per device: temp {mem.temp_size_in_bytes / 2**20:.1f} "
                     f"MiB, arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB")
    batch = first
    t_window = time.perf_counter()  # step times exclude the compile above
    for step in range(start, tc.num_steps):
      state, metrics = compiled(state, batch, run.step_rng)
      done = step + 1
      if lock is not None:
        lock.heartbeat()  # raises if another process took the directory meanwhile
      skipped = int(metrics["skipped"])
      skipped_total += skipped
      consecutive_bad = consecutive_bad + 1 if skipped else 0
      steps_in_window += 1
      if consecutive_bad >= tc.max_nonfinite_steps:
        ckpt.wait()
        first_bad = done - consecutive_bad + 1
        # Every skipped step ran from the parameters after step first_bad - 1. Whether they
        # or the inputs are to blame, the held-out batches tell: if those parameters give
        # non-finite held-out losses, a checkpoint of them (or later) is poisoned and is
        # moved aside, so a resume starts before the trouble; else the inputs went bad.
        held_out = heldout_losses.evaluate(eval_fn, state.params, eval_batches, tc.eval_times,
                                       mesh)
        params_bad = not all(np.isfinite(float(v)) for v in held_out.values())
        poisoned = [s for s in ckpt.all_steps() if s >= first_bad - 1] if params_bad else []
        if poisoned:
          ckpt.set_aside(poisoned, logger.message, kind="poisoned")
        kept = ckpt.all_steps()
        if params_bad:
          cause = (" (the parameters give non-finite held-out losses"
                   + (f"; checkpoints {poisoned} held them: moved to "
                      f"{ckpt.directory.name}.poisoned/)" if poisoned else ")"))
        else:
          cause = (" (the parameters still give finite held-out losses: the training inputs "
                   "went non-finite)")
        raise NonFiniteLossError(
            f"{consecutive_bad} consecutive non-finite losses (steps {first_bad}..{done}); "
            f"stopping. Last good checkpoint: {kept[-1] if kept else 'none'} in "
            f"{ckpt.directory}" + cause)
      if done == start + 1 or done % tc.log_every == 0 or done == tc.num_steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        dt = (now - t_window) / steps_in_window
        t_window, steps_in_window = now, 0
        bad_examples = inputs.skipped_examples(data.get_state())
        m.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                 mfu=step_flops / dt / peak, skipped_total=skipped_total,
                 bad_examples_skipped=bad_examples, eta_s=dt * (tc.num_steps - done))
        logger.write(done, m)
        records.append({"step": done, **m})
        logger.console(
            f"step {done:6d}/{tc.num_steps}  loss {m['loss']:.4f}  text_ce {m['text_ce']:.4f}"
            f"  video_mse {m['video_mse']:.4f}  |g| {m['grad_norm']:.3f}  lr "
            f"{m['learning_rate']:.2e}  {m['tokens_per_s']:.0f} tok/s  mfu {m['mfu']:.1%}  "
            f"eta {metric_logging.format_eta(m['eta_s'])}"
            + (f"  skipped {skipped_total}" if skipped_total else "")
            + (f"  bad examples {bad_examples}" if bad_examples else ""),
            final=done == tc.num_steps)
      if (tc.eval_every and done % tc.eval_every == 0) or done == tc.num_steps:
        ev = heldout_losses.evaluate(eval_fn, state.params, eval_batches, tc.eval_times, mesh)
        logger.write(done, ev)
        records.append({"step": done, **ev})
        logger.message(f"eval @ {done}: {heldout_losses.format_eval(ev)}")
      if (tc.save_every and done % tc.save_every == 0) or done == tc.num_steps:
        if consecutive_bad:
          # Keep the last checkpoint before the trouble as the newest one.
          logger.message(f"not saving a checkpoint at step {done}: its update was skipped "
                         f"(non-finite loss)")
        else:
          ckpt.save(done, state, data.get_state(), record, identity)
      if done < tc.num_steps:
        batch = sharding.put_batch(next(data), mesh)
  ckpt.wait()
  ckpt.close()
  logger.message(f"finished {tc.num_steps} steps in {time.perf_counter() - t_start:.1f} s"
                 + (f" ({skipped_total} updates skipped)" if skipped_total else ""))
  logger.close()
  return records


def final_summary(records: list[dict[str, float]]) -> str:
  """One line comparing the first and last logged training losses."""
  train_records = [r for r in records if "text_ce" in r]
  if not train_records:
    return "no training steps run (already complete)"
  a, b = train_records[0], train_records[-1]
  return (f"text_ce {a['text_ce']:.3f} -> {b['text_ce']:.3f}, "
          f"video_mse {a['video_mse']:.3f} -> {b['video_mse']:.3f} "
          f"(steps {int(a['step'])}..{int(b['step'])})")
