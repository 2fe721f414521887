"""Whether a run may resume from its checkpoints with the config it was started with now.

A checkpoint means something only together with the config that trained it: the same
tensors under another `seq.layout` (same shapes) are another model, and resuming
silently with it corrupts the run. So every start compares the requested config with
the one saved in the newest checkpoint, field by field (dotted names, after a JSON round
trip), before anything is restored or written:

  safe to change   `SAFE_TO_CHANGE`: how long to train, how often to log / evaluate /
                   save, how the work is laid out on devices (a checkpoint restores
                   onto any mesh), numerics-preserving implementation choices, and the
                   post-training sample. A change is reported, not refused.
  anything else    refused with `ResumeError`, naming every differing field with both
                   values, unless the caller allows it explicitly (`allow`: dotted
                   names or section prefixes, e.g. `optim.learning_rate` or `optim`),
                   for a deliberate change such as a new learning rate.

Fields added to the configs after a checkpoint was written (`ADDED_FIELDS`) compare
equal to the value that reproduces the behaviour from before they existed.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

# Dotted names or section prefixes ("mesh" covers mesh.*).
SAFE_TO_CHANGE = (
    "train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.eval_times", "train.save_every", "train.keep_last", "train.keep_every",
    "train.async_checkpoints", "train.max_nonfinite_steps",
    # The same update over the same global batch, in fewer or more microbatches (equal
    # up to float rounding; the data stream still yields whole batches).
    "train.grad_accum_steps",
    "mesh", "sharding_rules",
    "model.attention_impl", "model.remat",  # same function, another kernel / memory plan
    "data.num_workers", "data.data_dir",  # where and how fast, not what (see the dataset
                                          # identity the checkpoint records)
    # How the prepared data is made (the VAE recipe, the raw files, the builder config,
    # the tokenizer to copy): what it is, the data identity compares.
    "data.vae", "data.vae_variant", "data.vae_overrides", "data.vae_dir", "data.manual_dir",
    "data.builder_config", "data.tokenizer_path",
    "sample", "init",  # after training / only at a fresh start
)

# field -> the value that behaves as checkpoints written before the field existed.
ADDED_FIELDS: dict[str, Any] = {
    "data.plan_drop_rate": 0.0,
    "train.grad_accum_steps": 1,
}


class ResumeError(ValueError):
  """The requested config changes what the run's checkpoints mean; names the fields."""


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}, after a JSON round trip (tuples become lists)."""
  out: dict[str, Any] = {}
  for key, value in json.loads(json.dumps(cfg, default=str)).items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) and value:
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _covered(field: str, prefixes: Iterable[str]) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


_MISSING = "<absent>"


def config_changes(saved: Mapping[str, Any], requested: Mapping[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
  """Every field whose value differs: [(dotted name, saved value, requested value)], sorted;
  a field only one side has shows `<absent>` on the other (after `ADDED_FIELDS`)."""
  a, b = flatten(saved), flatten(requested)
  for field, value in ADDED_FIELDS.items():
    a.setdefault(field, value)
    b.setdefault(field, value)
  return [(f, a.get(f, _MISSING), b.get(f, _MISSING)) for f in sorted(set(a) | set(b))
          if a.get(f, _MISSING) != b.get(f, _MISSING)]


def check_resume(saved: Mapping[str, Any], requested: Mapping[str, Any], step: int,
                 allow: Iterable[str] = ()) -> list[str]:
  """Raises ResumeError if `requested` changes a field outside `SAFE_TO_CHANGE` and `allow`.

  Args:
    saved: the config dict stored in the checkpoint of step `step`.
    requested: the config dict of this start.
    allow: dotted names or prefixes the caller deliberately changes.
  Returns:
    One line per accepted change ("field: old -> new"), for the log.
  """
  allow = tuple(allow)
  changes = config_changes(saved, requested)
  refused = [c for c in changes if not _covered(c[0], SAFE_TO_CHANGE + allow)]
  if refused:
    lines = "\n  ".join(f"{f}: {old!r} in the checkpoint, {new!r} now" for f, old, new in refused)
    raise ResumeError(
        f"the config differs from the one the checkpoint at step {step} was trained with, "
        f"in fields that change what it means:\n  {lines}\nStart a new --workdir, or, if "
        f"the change is deliberate, allow it with --allow_config_change="
        f"{','.join(f for f, _, _ in refused)}. Safe to change on resume: "
        f"{', '.join(SAFE_TO_CHANGE)}.")
  return [f"{f}: {old!r} -> {new!r}" for f, old, new in changes]


def check_data_identity(saved: Mapping[str, str], current: Mapping[str, str], step: int,
                        data_dir: str, allow: Iterable[str] = ()) -> list[str]:
  """Raises ResumeError if the prepared data differs from what the checkpoint trained on.

  Args:
    saved: `data_identity` stored in the checkpoint of step `step` ({} for a checkpoint
      that predates it: nothing to compare).
    current: the identity of the data this command would use (`inputs.data_identity`:
      short hashes of the tokenizer, the VAE, the latent dataset).
    data_dir: where that data lives (for the message).
    allow: as in `check_resume`; 'data_identity' or 'data_identity.<part>' accepts a
      change (resuming only: evaluation and sampling pass nothing).
  Returns:
    One line per accepted change, for the log.
  """
  changed = [(k, saved[k], current[k]) for k in sorted(set(saved) & set(current))
             if saved[k] != current[k]]
  refused = [c for c in changed if not _covered(f"data_identity.{c[0]}", tuple(allow))]
  if refused:
    lines = "\n  ".join(f"{k}: {old} in the checkpoint, {new} in {data_dir}"
                        for k, old, new in refused)
    raise ResumeError(
        f"the prepared data differs from the data the checkpoint at step {step} was "
        f"trained on:\n  {lines}\nA different tokenizer gives the same text other ids and a "
        f"different VAE gives latents another meaning. Point data.data_dir at the data the "
        f"run was trained on (a rebuild keeps the previous version under "
        f"{data_dir}/superseded/), or start a new --workdir; a training run that is meant "
        f"to go on with new data takes --allow_config_change=data_identity.")
  return [f"data_identity.{k}: {old} -> {new}" for k, old, new in changed]
