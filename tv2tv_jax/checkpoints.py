"""Orbax checkpoints: train state + data-iterator state + config, restorable on any mesh.

Layout of a work directory's `checkpoints/<step>/`:
  state/   step, params, opt_state (Orbax StandardSave; arrays sharded as saved)
  data/    the input iterator's state (JSON), so input resumes exactly
  config/  the experiment config (JSON)

Saves are asynchronous: `save` returns once the arrays are copied off device, and
the write finishes in the background. A failed background write is raised by the
next `save` or by `wait` (never swallowed). Restoring takes an abstract target
(`jax.ShapeDtypeStruct`s carrying the *current* mesh's shardings), so a checkpoint
written on 8 devices restores onto 1 or 4. If the newest checkpoint cannot be read
(truncated, corrupt) or holds a non-finite value (a corruption that still parses), the
previous one is used and the reason is reported; the training run (only it: evaluation
and sampling are read-only) moves the bad step aside so that it can write it again.

A params-only export (`export_params`) holds just the parameters, for evaluation.

Directories are local paths or gs:// URIs (`tv2tv_jax.workdirs`); Orbax takes either as
an `epath.Path`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tv2tv_jax import train_step, workdirs


def state_tree(state: train_step.TrainState) -> dict[str, Any]:
  """The saved part of a TrainState (the optimizer itself is rebuilt from the config)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def abstract_target(abstract_state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (same tree) for restoring onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, shardings)


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored; the message lists why."""


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` holding NaN or inf (one device
  reduction per leaf, one host transfer for all)."""
  leaves = [(jax.tree_util.keystr(path), x) for path, x in
            jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return []
  ok = np.asarray(jax.device_get(jnp.stack([jnp.isfinite(x).all() for _, x in leaves])))
  return [name for (name, _), good in zip(leaves, ok) if not good]


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints, plus every `keep_every`-th step if set.

  `directory`: local path or gs:// URI (str or path); `self.directory` is its epath.Path.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               keep_every: int | None = None, async_save: bool = True):
    self.directory = workdirs.as_path(directory, "checkpoint directory")
    workdirs.check_reachable(self.directory, "checkpoint directory")
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every,
                                           enable_async_checkpointing=async_save, create=True)
    self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                      item_names=("state", "data", "config"))

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state: train_step.TrainState, data_state: Any,
           config: dict[str, Any]) -> None:
    """Starts saving; raises an earlier background save's failure, if any."""
    self._mgr.check_for_errors()
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_tree(state)),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)

  def wait(self) -> None:
    """Blocks until background writes finish; raises their failure."""
    self._mgr.wait_until_finished()
    self._mgr.check_for_errors()

  def saved_config(self, step: int | None = None) -> tuple[int, dict[str, Any]] | None:
    """(step, config dict) of the newest checkpoint whose config item reads (or of
    `step`), without reading any array; None if there is no checkpoint or none reads."""
    self._mgr.reload()
    for s in [step] if step is not None else sorted(self._mgr.all_steps(), reverse=True):
      try:
        out = self._mgr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
      except Exception:  # noqa: BLE001 -- unreadable: `restore` reports it, with the reason
        continue
      return s, dict(out["config"])
    return None

  def restore(self, target: dict[str, Any], log: Callable[[str], None] = print,
              step: int | None = None, set_aside: bool = False):
    """Restores the newest good checkpoint (or exactly `step`).

    A checkpoint is bad when it cannot be read or its state holds NaN or inf; a bad one
    is reported and the previous one tried.

    Args:
      target: `abstract_target(...)` of `state_tree(state)` for the current mesh.
      set_aside: move bad newer steps to `<directory>.unreadable/` (the training run
        does, so that it can write those steps again; read-only commands must not).
    Returns:
      (step, state tree, data state, config dict), or None if there is no checkpoint.
    Raises:
      CheckpointError: checkpoints exist but none is good (or `step` is not).
    """
    self._mgr.reload()
    steps = [step] if step is not None else sorted(self._mgr.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for s in steps:
      try:
        out = self._mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous one"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      else:
        bad = nonfinite_leaves(out["state"])
        if not bad:
          if failures:
            if set_aside:
              self.set_aside([f for f, _ in failures], log)
            log(f"restored checkpoint step {s} instead of the newest ({len(failures)} bad)")
          return s, out["state"], out["data"], out["config"]
        reason = (f"non-finite values in {len(bad)} arrays, e.g. {', '.join(bad[:3])} "
                  f"(corrupt or poisoned)")
      failures.append((s, reason))
      if step is None:
        log(f"checkpoint at step {s} in {self.directory} cannot be restored ({reason}); "
            f"falling back to the previous one")
    raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n  "
                          + "\n  ".join(f"step {f}: {r}" for f, r in failures))

  def set_aside(self, steps: list[int], log: Callable[[str], None],
                kind: str = "unreadable") -> None:
    """Moves step directories to `<directory>.<kind>/` (kept for inspection, never
    deleted), so training can write those steps again. kind: 'unreadable' or 'poisoned'
    (readable, but the run went non-finite from it)."""
    if jax.process_index() == 0:
      aside = self.directory.parent / f"{self.directory.name}.{kind}"
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        src = self.directory / str(step)
        dst = aside / f"{step}-{int(time.time())}"
        if src.exists():
          src.rename(dst)  # a sibling directory: a rename locally, copy + delete on GCS
          log(f"moved {kind} checkpoint {src} to {dst}")
    self._mgr.reload()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()


def export_params(params: Any, path: str | os.PathLike) -> None:
  """Writes a params-only checkpoint (for evaluation and sampling) to `path` (local or
  gs://)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(workdirs.as_path(path, "--export_params"), params, force=True)
  ckptr.wait_until_finished()


def restore_params(path: str | os.PathLike, target: Any) -> Any:
  """Reads a params-only export (local or gs://) onto `target`'s shardings (abstract
  params tree)."""
  return ocp.StandardCheckpointer().restore(workdirs.as_path(path, "--params"), target)
