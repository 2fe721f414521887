r"""Evaluates a checkpoint on whatever devices this process has.

    python -m tv2tv_jax.evaluate --workdir=<train dir> [--checkpoint=<step>]
    python -m tv2tv_jax.evaluate --workdir=<train dir> --params=<params-only export dir>

The experiment config is read from the restored checkpoint itself (or
`<workdir>/config.json` for a params-only export), never from a later start's
`config.json`; `--config.mesh.*` style overrides are not needed: the mesh
is rebuilt from the devices present. Prints the evaluation losses as JSON. --workdir,
--params and --export_params may be local paths or gs:// URIs (`tv2tv_jax.workdirs`).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
import jax
import ml_collections

from tv2tv_jax import (checkpoints, distributed, evaluation, inputs, resume_check, trainer,
                       workdirs)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("checkpoint", None, "Step to restore (default: newest).")
  flags.DEFINE_string("params", None, "A params-only export to evaluate instead.")
  flags.DEFINE_string("export_params", None, "Also write a params-only export here.")
  flags.mark_flags_as_required(["workdir"])


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
    run = _run_from(workdirs.read_json(wd / "config.json", "--workdir"), devices)
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
    run = _run_from(saved[1], devices)
    try:
      restored = ckpt.restore(run.restore_target(), step=s)
    except checkpoints.CheckpointError as e:
      failures.append(str(e).split("\n", 1)[-1].strip())
      continue
    return run, restored.state["params"], restored.step, restored.data_identity
  raise checkpoints.CheckpointError(f"no checkpoint in {ckpt.directory} could be restored:"
                                    f"\n  " + "\n  ".join(failures))


def _run_from(cfg_dict: dict, devices) -> trainer.Run:
  cfg = ml_collections.ConfigDict(cfg_dict)
  cfg.mesh = ml_collections.ConfigDict({"data": -1})  # whatever devices are here
  return trainer.Run(cfg, devices)


def evaluate_checkpoint(workdir: str | os.PathLike, step: int | None = None,
                        params_dir: str | os.PathLike | None = None, devices=None) -> dict:
  """The evaluation losses of a checkpoint (see `evaluation`), plus its step."""
  run, params, step, trained_on = load_params(workdir, step, params_dir, devices)
  batches = inputs.make_eval_batches(run.exp, run.cfg, workdir=workdir)
  identity, data_dir = inputs.data_identity(run.exp, run.cfg, workdir=workdir)
  resume_check.check_data_identity(trained_on, identity, step, data_dir)
  metrics = evaluation.evaluate(run.eval_fn(), params, batches, run.exp.train.eval_times,
                                run.mesh)
  return {"step": step, "devices": run.mesh.size, **metrics}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.setup_process()
  result = evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.params)
  if FLAGS.export_params:
    run, params, _, _ = load_params(FLAGS.workdir, FLAGS.checkpoint, FLAGS.params)
    checkpoints.export_params(params, FLAGS.export_params)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)
