"""Orbax checkpoints: train state + data-iterator state + config, restorable on any mesh.

Layout of a work directory's `checkpoints/<step>/`:
  state/   step, params, opt_state (Orbax StandardSave; arrays sharded as saved)
  data/       the input iterator's state (JSON), so input resumes exactly
  config/     the experiment config (JSON)
  integrity/  a fingerprint of every state array, and the identity of the prepared data
              (tokenizer, VAE, latents) the run trained on (JSON)

Saves are asynchronous: `save` returns once the arrays are copied off device, and
the write finishes in the background. A failed background write is raised by the
next `save` or by `wait` (never swallowed). Restoring takes an abstract target
(`jax.ShapeDtypeStruct`s carrying the *current* mesh's shardings), so a checkpoint
written on 8 devices restores onto 1 or 4. If the newest checkpoint cannot be read
(truncated, corrupt) or holds a non-finite value (a corruption that still parses), the
previous one is used and the reason is reported; the training run (only it: evaluation
and sampling are read-only) moves the bad step aside so that it can write it again.
Corruption that reads back as finite values (flipped bytes in an array file) is caught by
the fingerprints: each state array's is computed on device when saving and again after
restoring, and a mismatch makes the checkpoint bad like an unreadable one. Checkpoints
written before fingerprints existed restore unverified, and say so.

A params-only export (`export_params`) holds just the parameters, for evaluation.

Directories are local paths or gs:// URIs (`tv2tv_jax.workdirs`); Orbax takes either as
an `epath.Path`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
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


# Odd multipliers: each position's weight is odd, hence invertible mod 2**32, so a change
# of any single element always changes the sum; several changes cancel with chance 2**-32.
_MIX, _POS = np.uint32(0x9E3779B1), np.uint32(0x85EBCA77)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """u32[]: a position-weighted, wrapping sum of the bits of `x` (any shape, any
  float / int / bool dtype up to 32 bits).

  Integer sums are exact and order free, so the value does not depend on the mesh, the
  sharding or the CPU; no reshape, so sharded arrays are reduced where they lie.
  """
  if x.dtype == jnp.bool_:
    u = x.astype(jnp.uint32)
  else:
    u = lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    u = u.astype(jnp.uint32)
  pos = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    pos = pos + lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride % 2**32)
    stride *= x.shape[d]
  u = (u ^ (u >> 15)) * _MIX  # spread each element's bits before the weighted sum
  return jnp.sum(u * (pos * _POS * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_fingerprint(x) for x in leaves]


def state_fingerprints(tree: Any) -> dict[str, int]:
  """{leaf path: u32 fingerprint} of every array leaf of `tree` (one jitted pass over
  the arrays where they lie; works with several processes)."""
  named = [(jax.tree_util.keystr(path), x) for path, x in
           jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "dtype")
           and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
  values = _fingerprints([jnp.asarray(x) for _, x in named])
  # A replicated scalar: any local copy holds the value (device_get would refuse a
  # global array spanning several processes).
  return {name: int(np.asarray(v.addressable_data(0))) for (name, _), v in zip(named, values)}


def fingerprint_mismatches(saved: dict[str, int], tree: Any) -> list[str]:
  """Leaf paths whose fingerprint in `tree` differs from `saved` (or that one lacks)."""
  now = state_fingerprints(tree)
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


class Restored(NamedTuple):
  """What `Checkpointer.restore` read: the step, the state tree, the input iterator's
  state, the config dict and the identity of the data the run trained on ({} when the
  checkpoint predates it)."""
  step: int
  state: dict[str, Any]
  data: Any
  config: dict[str, Any]
  data_identity: dict[str, str]


def _state_problem(state: Any, integrity: dict[str, Any] | None) -> str | None:
  """Why a restored state tree is bad (non-finite values, fingerprints that differ from
  the saved ones), or None when it is good."""
  bad = nonfinite_leaves(state)
  if bad:
    return (f"non-finite values in {len(bad)} arrays, e.g. {', '.join(bad[:3])} "
            f"(corrupt or poisoned)")
  if integrity is not None:
    changed = fingerprint_mismatches(integrity.get("fingerprints") or {}, state)
    if changed:
      return (f"{len(changed)} arrays differ from the fingerprints saved with them, e.g. "
              f"{', '.join(changed[:3])} (corrupt on disk)")
  return None


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
                                      item_names=("state", "data", "config",
                                                  "integrity"))

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state: train_step.TrainState, data_state: Any,
           config: dict[str, Any], data_identity: dict[str, str] | None = None) -> None:
    """Starts saving; raises an earlier background save's failure, if any.

    `data_identity`: the prepared data the run trains on (`inputs.data_identity`),
    checked when the checkpoint is resumed, evaluated or sampled from.
    """
    self._mgr.check_for_errors()
    tree = state_tree(state)
    integrity = {"fingerprints": state_fingerprints(tree), "data": data_identity or {}}
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
        integrity=ocp.args.JsonSave(integrity)), force=True)

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

  def _integrity(self, step: int) -> dict[str, Any] | None:
    """The integrity item of `step`; None when the checkpoint predates it."""
    if not (self.directory / str(step) / "integrity").exists():
      return None
    out = self._mgr.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
    return dict(out["integrity"])

  def restore(self, target: dict[str, Any], log: Callable[[str], None] = print,
              step: int | None = None, set_aside: bool = False) -> Restored | None:
    """Restores the newest good checkpoint (or exactly `step`).

    A checkpoint is bad when it cannot be read, its state holds NaN or inf, or an
    array's fingerprint differs from the one saved with it; a bad one is reported and
    the previous one tried.

    Args:
      target: `abstract_target(...)` of `state_tree(state)` for the current mesh.
      set_aside: move bad newer steps to `<directory>.unreadable/` (the training run
        does, so that it can write those steps again; read-only commands must not).
    Returns:
      `Restored`, or None if there is no checkpoint.
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
        integrity = self._integrity(s)
        out = self._mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous one"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      else:
        reason = _state_problem(out["state"], integrity)
        if reason is None:
          if failures:
            if set_aside:
              self.set_aside([f for f, _ in failures], log)
            log(f"restored checkpoint step {s} instead of the newest ({len(failures)} bad)")
          if integrity is None:
            log(f"checkpoint step {s} predates array fingerprints: restored unverified")
          return Restored(s, out["state"], out["data"], out["config"],
                          dict((integrity or {}).get("data") or {}))
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
