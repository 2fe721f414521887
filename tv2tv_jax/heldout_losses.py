"""Deterministic evaluation: held-out batches at fixed flow times, fixed noise.

Reports `eval/text_ce` (independent of t: text never sees a noisy copy, and clean
copies are not flipped here), `eval/video_mse@t` for each time in
`train.eval_times`, and their mean `eval/video_mse`.

    python -m tv2tv_jax.evaluate --workdir=<dir> [--checkpoint=<step>|--params=<dir>]

restores a full checkpoint (default: the newest readable one) or a params-only
export onto whatever devices this process has, and prints the evaluation losses.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow, losses, sharding
from tv2tv_jax.config import Experiment
from tv2tv_jax.model import TV2TV

_EVAL_NOISE_SEED = 1234


def _eval_losses(params, batch, t, *, model: TV2TV, exp: Experiment, rules):
  with nn.logical_axis_rules(rules):
    sample = flow.fixed_flow(batch["latents"].shape, 0.0, _EVAL_NOISE_SEED,
                             batch["noisy_src"].shape[1])
    sample = sample.replace(noisy_t=jnp.full_like(sample.noisy_t, t))
    kwargs, v_target = losses.model_inputs(batch, sample, exp.model.tokens_per_chunk)
    logits, velocity = model.apply({"params": params}, **kwargs)
  # Per-token and per-copy values, reduced on the host in float64 in a fixed order:
  # a device-side sum would depend on how rows are split over devices, and the
  # evaluation must not change with the device count.
  return {"nll": losses.token_nll(logits, batch["text_targets"]),
          "nll_mask": batch["text_target_mask"],
          "mse": losses.copy_mse(velocity, v_target), "mse_mask": batch["noisy_valid"]}


def make_eval_fn(model: TV2TV, exp: Experiment, mesh, rules, param_shardings):
  """A jitted `(params, batch, t) -> {nll f32[B, T], mse f32[B, K], and their masks}`."""
  fn = functools.partial(_eval_losses, model=model, exp=exp, rules=rules)
  return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                   sharding.replicated(mesh)),
                 out_shardings=sharding.batch_sharding(mesh))


def evaluate(eval_fn, params, batches: Sequence[dict], times: Sequence[float],
             mesh) -> dict[str, float]:
  """Averages over `batches` (host numpy, this process's rows) at each time in `times`;
  every process returns the average over all processes' rows.

  Text CE is averaged over text targets, video MSE over valid noisy copies."""
  out, nll = {}, []
  with jax.set_mesh(mesh):
    device_batches = [sharding.put_batch(b, mesh) for b in batches]
    for i, t in enumerate(times):
      mse = []
      for b in device_batches:
        r = _host_values(eval_fn(params, b, jnp.float32(t)))
        mse.append(r["mse"][r["mse_mask"]])
        if i == 0:  # text never sees a noisy copy: the same at every t
          nll.append(r["nll"][r["nll_mask"]])
      out[f"eval/video_mse@{t:g}"] = float(np.mean(np.concatenate(mse).astype(np.float64)))
  nll = np.concatenate(nll).astype(np.float64)
  out["eval/text_ce"] = float(np.mean(nll)) if nll.size else 0.0
  out["eval/video_mse"] = float(np.mean([out[f"eval/video_mse@{t:g}"] for t in times]))
  return out


def _host_values(tree):
  """Global batch-sharded values -> numpy on every process (all rows, all hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def format_eval(metrics: dict[str, Any]) -> str:
  return "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(metrics.items()))
