"""Train state, optimizer, and the jitted train step.

The step is a pure function `(state, batch, base_rng) -> (state, metrics)`; its
randomness is `fold_in(base_rng, state.step)`, so a run is reproducible from the
base seed and resumable from any step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tv2tv_jax import flow, losses
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


def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_rng: jax.Array, *,
               model: TV2TV, exp: Experiment, sample: flow.FlowSample | None = None):
  """One optimizer step.

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
  grad_fn = jax.value_and_grad(losses.compute_loss, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, model, batch, sample, exp)
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
