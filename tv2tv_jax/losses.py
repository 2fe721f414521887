"""The joint objective: next-token cross-entropy on text + flow-matching MSE on noisy chunks.

    loss = λ_txt · CE + λ_vid · MSE

each a mean over its own targets (text slots with a target; every latent element
of every valid noisy copy). Both parts are reported separately.

A microbatch of a larger batch (gradient accumulation, `train_step`) is normalised by
the larger batch's target counts (`target_counts`, `compute_loss(normalizers=...)`):
its loss is then its additive share of the larger batch's loss, so the shares' sum and
its gradient are the larger batch's.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tv2tv_jax import flow, masks
from tv2tv_jax.config import Experiment


def model_inputs(batch: Mapping[str, jax.Array], sample: flow.FlowSample, n: int):
  """Assembles the model's call arguments from a packed batch and its flow noise.

  batch: the arrays of `tv2tv_jax.sequence` with a leading [B]; n: tokens per chunk.
  Returns (kwargs for `TV2TV.__call__`, velocity target f32[B, K, h, w, c]).
  """
  latents = batch["latents"].astype(jnp.float32)  # [B, K, h, w, c], clean-copy order
  src = batch["noisy_src"]
  x = jnp.take_along_axis(latents, src.reshape(src.shape + (1, 1, 1)), axis=1)
  noisy = flow.interpolate(x, sample.noise, sample.noisy_t)
  clean = flow.interpolate(latents, sample.clean_noise, sample.clean_t)
  t_len = batch["text_tokens"].shape[1]
  kc = latents.shape[1]
  # CFG text drop is a per-token flag on the noisy region of the row.
  drop_tokens = jnp.repeat(sample.cfg_drop & batch["noisy_valid"], n, axis=1)
  b = drop_tokens.shape[0]
  cfg_drop = jnp.concatenate([jnp.zeros((b, t_len), bool), drop_tokens,
                              jnp.zeros((b, kc * n), bool)], axis=1)
  meta = masks.SeqMeta.from_batch(batch, cfg_drop=cfg_drop)
  kwargs = dict(text_tokens=batch["text_tokens"], noisy_latents=noisy, noisy_t=sample.noisy_t,
                clean_latents=clean, clean_t=sample.clean_t, meta=meta)
  return kwargs, flow.velocity_target(x, sample.noise)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-slot negative log-likelihood: logits f32[B, T, V], targets i32[B, T] -> f32[B, T]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def copy_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Per-copy mean squared error: f32[B, K, h, w, c] twice -> f32[B, K]."""
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target).reshape(*pred.shape[:2], -1),
                  axis=-1)


def text_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       normalizer: jax.Array | None = None):
  """Mean CE over weighted slots. logits f32[B, T, V], targets i32[B, T], weights [B, T].

  normalizer: f32[], divides the summed NLL instead of this batch's number of targets.
  Returns (mean CE, number of targets in this batch)."""
  nll = token_nll(logits, targets)
  w = weights.astype(jnp.float32)
  count = jnp.sum(w)
  denom = count if normalizer is None else normalizer
  return jnp.sum(nll * w) / jnp.maximum(denom, 1.0), count


def velocity_mse(pred: jax.Array, target: jax.Array, valid: jax.Array,
                 normalizer: jax.Array | None = None):
  """Mean squared error over valid copies. pred/target f32[B, K, ...], valid bool[B, K].

  normalizer: f32[], divides the summed per-copy MSE instead of this batch's number of
  valid copies.
  Returns (mean over all elements of valid copies, number of valid copies in this batch)."""
  per_copy = copy_mse(pred, target)
  w = valid.astype(jnp.float32)
  count = jnp.sum(w)
  denom = count if normalizer is None else normalizer
  return jnp.sum(per_copy * w) / jnp.maximum(denom, 1.0), count


def target_counts(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(text targets, valid noisy copies) of a packed batch: f32[] each, the denominators
  of its CE and MSE (integers below 2^24, so exact in float32 in any summation order)."""
  return (jnp.sum(batch["text_target_mask"].astype(jnp.float32)),
          jnp.sum(batch["noisy_valid"].astype(jnp.float32)))


def compute_loss(params: Any, model: nn.Module, batch: Mapping[str, jax.Array],
                 sample: flow.FlowSample, exp: Experiment,
                 normalizers: tuple[jax.Array, jax.Array] | None = None):
  """Returns (scalar loss, metrics dict) for one packed batch.

  normalizers: `target_counts` of a larger batch this one is a microbatch of: CE and
  MSE divide their sums by those instead of this batch's own counts, so loss, text_ce
  and video_mse are additive shares of the larger batch's (the counts reported stay this
  batch's own, additive too). None: this batch's own means.
  """
  kwargs, v_target = model_inputs(batch, sample, exp.model.tokens_per_chunk)
  logits, velocity = model.apply({"params": params}, **kwargs)
  n_txt_total, n_vid_total = normalizers if normalizers is not None else (None, None)
  ce, n_txt = text_cross_entropy(logits, batch["text_targets"], batch["text_target_mask"],
                                 n_txt_total)
  mse, n_vid = velocity_mse(velocity, v_target, batch["noisy_valid"], n_vid_total)
  loss = exp.loss.lambda_txt * ce + exp.loss.lambda_vid * mse
  return loss, {"loss": loss, "text_ce": ce, "video_mse": mse,
                "text_targets": n_txt, "noisy_chunks": n_vid}
