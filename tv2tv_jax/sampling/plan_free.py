"""A CFG branch unconditional on the whole plan: a second, plan-free KV cache.

Why a second cache. The mask-dropped branch (`masks.visible`, docs/model.md "Classifier-free
guidance") hides chunk i's own plan and BOF from its noisy copy. In TV2TV nothing else that
copy sees has read them, so the branch is exactly unconditional on them. In Think2V the whole
plan comes before the first chunk: the EOFs that close its items, the later items and every
clean chunk have read item i, so the dropped branch still leaks it, and no mask can help,
because those keys and values are computed from it. A branch that is really unconditional needs
keys and values computed without the plan: a *shadow* cache of the same rows in which no plan
text was ever written.

What the shadow holds, per row: the prompt; the first frame and its EOF; in Think2V the EOFs that
close the plan items (each item empty); then, per chunk, BOF, the clean chunk (the one the guided
ODE produced, the same latent as in the main cache) and EOF. That is exactly the row
`sequence.layout_example` lays out for an example whose chunk texts are all empty, which training
shows the model at rate `data.plan_drop_rate` (`data_pipelines.grain_pipeline`): the plan-free
branch is "conditional on an empty plan", in distribution when that rate is > 0.

Guidance: v = v_u + s·(v_c − v_u) (`flow.guided_velocity`) with v_c the main cache's
conditional velocity and v_u the shadow's velocity of the same x_t at the same t; neither
query sets the drop flag (the shadow has no plan to drop). Because nothing in the shadow
depends on the plan, not even its length (RoPE positions there never counted it), v_u is
bit-identical for any plan (`tests/test_plan_free.py`).

Cost: the shadow repeats every non-plan write and every ODE step evaluates both caches, the
same number of velocity evaluations as mask-dropped CFG, against two caches instead of one
tiled cache. It is selected with `SamplerConfig.uncond = 'plan_free'`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import flow
from tv2tv_jax.sampling.decoding import SamplerConfig


class PlanFreeBackend:
  """The sampler backend (`sampler` module docstring) over a main and a shadow backend.

  main, shadow: two `cached_backend.CachedBackend`s of the same rows and capacity (the shadow
  needs no more room than the main cache). bof_id: the BOF token (`SequenceConfig.bof_id`).
  The loop's plan text (plan id > 0 and not BOF) goes to the main cache only; every other
  write goes to both. Logits come from the main cache.
  """

  def __init__(self, main, shadow, bof_id: int):
    if main.batch != shadow.batch:
      raise ValueError(f"main and shadow backends need the same rows, got {main.batch} "
                       f"and {shadow.batch}")
    self.main, self.shadow, self.bof_id = main, shadow, int(bof_id)
    self.batch = main.batch

  def _is_plan_text(self, tokens, plan: int) -> bool:
    # BOF_i carries plan id i + 1 (so that the mask drop hides it) but holds no plan text:
    # the shadow needs it, as the plan-free training row has it.
    return plan > 0 and not (len(tokens) == 1 and int(tokens[0]) == self.bof_id)

  def append_text(self, tokens, plans) -> None:
    """tokens: [i32[N_b] | None] * B; plans: [int] * B (the loop's plan ids)."""
    self.main.append_text(tokens, plans)
    self.shadow.append_text([None if t is None or self._is_plan_text(np.asarray(t), p)
                             else t for t, p in zip(tokens, plans)], plans)

  def logits(self, rows=None) -> jax.Array:
    """f32[B, V]: the main cache's next-token logits (the shadow writes no text to sample)."""
    return self.main.logits(rows)

  def velocities(self, x: jax.Array, t: float, chunk: int, reps: int) -> jax.Array:
    """x f32[B, h, w, c] -> f32[B, reps, h, w, c]: [:, 0] conditional (main cache), [:, 1]
    plan-free (shadow cache), when reps = 2."""
    v_c = self.main.velocities(x, t, chunk, 1)
    if reps == 1:
      return v_c
    return jnp.concatenate([v_c, self.shadow.velocities(x, t, chunk, 1)], axis=1)

  def denoise(self, x: jax.Array, chunk: int, rows, sc: SamplerConfig, grid) -> jax.Array:
    """Integrates chunk `chunk` of every row: `sc.steps` steps of `flow.ode_step` on the
    guided velocity above (rows not asked are integrated too and ignored by the loop)."""
    reps = 1 if sc.cfg_scale == 1.0 else 2

    def guided(y, t):
      v = self.velocities(y, t, chunk, reps)
      return flow.guided_velocity(jnp.moveaxis(v, 1, 0), sc.cfg_scale)

    x = jnp.asarray(x, jnp.float32)
    for t0, t1 in zip(np.asarray(grid)[:-1], np.asarray(grid)[1:]):
      x = flow.ode_step(guided, x, float(t0), float(t1), sc.solver)
    return x

  def append_chunk(self, latents, chunk) -> None:
    """latents: [f32[h, w, c] | None] * B, written to both caches."""
    self.main.append_chunk(latents, chunk)
    self.shadow.append_chunk(latents, chunk)
