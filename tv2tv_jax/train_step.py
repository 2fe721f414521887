"""Train state, optimizer, and the jitted train step.

The step is a pure function `(state, batch, base_rng) -> (state, metrics)`; its
randomness is `fold_in(base_rng, state.step)`, so a run is reproducible from the
base seed and resumable from any step.

Gradient accumulation (`train.grad_accum_steps` = n > 1): the step splits its global
batch into n microbatches and runs forward and backward over them one at a time in a
`lax.scan`, summing gradients and metrics in float32, then makes one optimizer update.
Only one microbatch's activations are alive at a time; the update equals the
unaccumulated step's up to float rounding (`loss_and_grads`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tv2tv_jax import axes, flow, losses
from tv2tv_jax.config import Experiment, OptimConfig
from tv2tv_jax.model import TV2TV


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # i32[]
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to `end_lr_fraction` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


def _decay_mask(params):
  # No weight decay on vectors (norm scales, biases): standard for Llama-style models.
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW on the warmup-cosine schedule.

  Cached per config: the optimizer is static metadata of TrainState, and trees built
  by separate calls (abstract vs real state, shardings) must compare equal."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))


def dummy_batch(exp: Experiment, batch_size: int | None = None) -> dict[str, jax.Array]:
  """Zero arrays with the shapes and dtypes of a packed batch (for init and tracing)."""
  from tv2tv_jax import sequence  # local: keeps this module's import graph small
  row = sequence.empty_row(exp.seq, exp.model)
  b = batch_size or exp.train.batch_size
  return {k: jnp.broadcast_to(jnp.asarray(v), (b, *v.shape)) for k, v in row.items()}


def init_params(model: TV2TV, exp: Experiment, rng: jax.Array, batch_size: int = 1):
  """Initial (logically boxed) params from a dummy batch of `batch_size` rows."""
  batch = dummy_batch(exp, batch_size)
  sample = flow.fixed_flow(batch["latents"].shape, 1.0, num_noisy=batch["noisy_src"].shape[1])
  kwargs, _ = losses.model_inputs(batch, sample, exp.model.tokens_per_chunk)
  return model.init(rng, **kwargs)["params"]


def boxed_train_state(model: TV2TV, exp: Experiment, rng: jax.Array) -> TrainState:
  """A fresh TrainState whose params and optimizer state keep their logical-axis boxes
  (`nn.LogicallyPartitioned`): what sharded init reads partition specs from."""
  params = init_params(model, exp, rng)
  tx = make_optimizer(exp.optim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    tx=tx)


# Jitted (eager init dispatches every op separately); model and exp are static, so
# repeated inits of one configuration compile once.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_unboxed(model: TV2TV, exp: Experiment, rng: jax.Array) -> TrainState:
  return nn.unbox(boxed_train_state(model, exp, rng))


def create_train_state(model: TV2TV, exp: Experiment, rng: jax.Array) -> TrainState:
  """A fresh TrainState with plain arrays, on the default device."""
  return _init_unboxed(model, exp, rng)


def microbatches(x: jax.Array, n: int) -> jax.Array:
  """Splits a batch axis into n microbatches: x [B, ...] -> [n, B/n, ...].

  Microbatch m holds rows m, m + n, m + 2n, ... (a strided split, not contiguous
  blocks). The batch is sharded over the data axes in contiguous blocks of rows; when
  B/n is a multiple of the number of blocks (`sharding.check_divisibility`), every
  block holds B/(n·blocks) rows of every microbatch, so the split is a reshape and
  transpose local to each device (no collective) and each microbatch is sharded over
  the data axes like the batch. A contiguous split would put microbatch m on only
  1/n of the devices and need a reshuffle. The constraints state that layout under the
  logical-axis rules (`axes.BATCH`); without rules or a mesh they do nothing.
  """
  b = x.shape[0]
  x = x.reshape(b // n, n, *x.shape[1:])
  x = nn.with_logical_constraint(x, (axes.BATCH,) + (None,) * (x.ndim - 1))
  x = jnp.swapaxes(x, 0, 1)
  return nn.with_logical_constraint(x, (None, axes.BATCH) + (None,) * (x.ndim - 2))


def loss_and_grads(params: Any, model: TV2TV, batch: Mapping[str, jax.Array],
                   sample: flow.FlowSample, exp: Experiment):
  """((loss, metrics), grads) of the whole batch, over `exp.train.grad_accum_steps`
  microbatches.

  n = 1: one `value_and_grad` of `losses.compute_loss` over the batch.
  n > 1: the batch and its flow sample (drawn for the whole batch, so every row gets
  the randomness it gets without accumulation) are split by `microbatches`, and a
  `lax.scan` computes each microbatch's gradient one after the other. The loss is a
  ratio of sums over the whole batch (CE over its text targets, MSE over its valid
  noisy copies), and microbatches hold different numbers of targets, so a mean of
  microbatch means would weight their targets unequally. Each microbatch's loss is
  therefore normalised by the whole batch's target counts (`losses.target_counts`,
  integers, exact in float32): it is that microbatch's additive share of the whole
  loss, and the sum of the shares' gradients is the whole batch's gradient; only the
  order of the float32 additions differs. Gradients and metrics (loss, text_ce,
  video_mse: shares; text_targets, noisy_chunks: counts) are summed in float32; the
  gradients are cast back to the parameters' dtype, as an unaccumulated step returns.
  """
  grad_fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
  n = exp.train.grad_accum_steps
  if n == 1:
    return grad_fn(params, model, batch, sample, exp)
  normalizers = losses.target_counts(batch)
  xs = jax.tree.map(functools.partial(microbatches, n=n), (dict(batch), sample))

  def grads_and_metrics(mb):
    (_, metrics), grads = grad_fn(params, model, *mb, exp, normalizers)
    return jax.tree.map(lambda x: x.astype(jnp.float32), (grads, metrics))

  def body(acc, mb):
    return jax.tree.map(jnp.add, acc, grads_and_metrics(mb)), None

  first = jax.tree.map(lambda x: x[0], xs)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grads_and_metrics, first))
  (grads, metrics), _ = jax.lax.scan(body, zeros, xs)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return (metrics["loss"], metrics), grads


def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array, *,
               model: TV2TV, exp: Experiment, sample: flow.FlowSample | None = None):
  """One optimizer step (over `train.grad_accum_steps` microbatches: `loss_and_grads`).

  Args:
    state: the TrainState (donated by `make_train_step`).
    batch: a packed batch ([B, ...] arrays of `tv2tv_jax.sequence`).
    base_rng: the run's base key; this step uses fold_in(base_rng, state.step).
    sample: fixed flow noise instead of a fresh draw (evaluation-style debugging).
  Returns:
    (new state, metrics: loss, text_ce, video_mse, grad_norm, learning_rate, counts,
    skipped: 1 when the update was skipped: a non-finite loss, gradient, updated
    parameter or optimizer state).
  """
  rng = jax.random.fold_in(base_rng, state.step)
  if sample is None:
    sample = flow.sample_flow(rng, batch["latents"].shape, exp.flow,
                              batch["noisy_src"].shape[1])
  (loss, metrics), grads = loss_and_grads(state.params, model, batch, sample, exp)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite loss or gradient, or an update that overflows the parameters or the
  # optimizer state (a finite gradient times a huge learning rate), skips the update
  # (params and optimizer state stay as they were); the step still advances so data and
  # randomness stay aligned.
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
            & _all_finite(opt_state))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32),
                 learning_rate=learning_rate_schedule(exp.optim)(state.step))
  return state.replace(step=state.step + 1, params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state)), metrics


def _all_finite(tree) -> jax.Array:
  """bool[]: every floating-point leaf of `tree` is finite."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_train_step(model: TV2TV, exp: Experiment, **jit_kwargs) -> Callable:
  """`train_step` jitted with the state donated; extra kwargs go to jax.jit (shardings)."""
  return jax.jit(functools.partial(train_step, model=model, exp=exp), donate_argnums=(0,),
                 **jit_kwargs)
