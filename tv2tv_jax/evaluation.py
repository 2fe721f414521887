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
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow, losses, sharding
from tv2tv_jax.config import Experiment
from tv2tv_jax.model import TV2TV

_EVAL_NOISE_SEED = 1234


def _eval_losses(params, batch, t, *, model: TV2TV, exp: Experiment, rules):
  with nn.logical_axis_rules(rules):
    sample = flow.fixed_flow(batch["latents"].shape, 0.0, _EVAL_NOISE_SEED)
    sample = sample.replace(noisy_t=jnp.full_like(sample.noisy_t, t))
    _, m = losses.compute_loss(params, model, batch, sample, exp)
  # Sums and counts, so batches average by target, not by batch.
  return {"ce_sum": m["text_ce"] * m["text_targets"], "ce_n": m["text_targets"],
          "mse_sum": m["video_mse"] * m["noisy_chunks"], "mse_n": m["noisy_chunks"]}


def make_eval_fn(model: TV2TV, exp: Experiment, mesh, rules, param_shardings):
  """A jitted `(params, batch, t) -> sums` on `mesh`."""
  fn = functools.partial(_eval_losses, model=model, exp=exp, rules=rules)
  return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                                   sharding.replicated(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_fn, params, batches: Sequence[dict], times: Sequence[float],
             mesh) -> dict[str, float]:
  """Averages over `batches` (host numpy, this process's rows) at each time in `times`."""
  out = {}
  ce_sum = ce_n = 0.0
  mses = []
  with jax.set_mesh(mesh):
    device_batches = [sharding.put_batch(b, mesh) for b in batches]
    for t in times:
      mse_sum = mse_n = 0.0
      for b in device_batches:
        r = jax.device_get(eval_fn(params, b, jnp.float32(t)))
        mse_sum += float(r["mse_sum"])
        mse_n += float(r["mse_n"])
        if t == times[0]:
          ce_sum += float(r["ce_sum"])
          ce_n += float(r["ce_n"])
      out[f"eval/video_mse@{t:g}"] = mse_sum / max(mse_n, 1.0)
      mses.append(out[f"eval/video_mse@{t:g}"])
  out["eval/text_ce"] = ce_sum / max(ce_n, 1.0)
  out["eval/video_mse"] = float(np.mean(mses))
  return out


def format_eval(metrics: dict[str, Any]) -> str:
  return "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in sorted(metrics.items()))
