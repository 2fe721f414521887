"""Flow matching: the time convention, time sampling, and the per-batch training noise.

Time convention (the only place it is written down):
  t ∈ [0, 1], and **t = 1 is clean data**, t = 0 pure noise.
  x_t = t·x + (1 − t)·ε,  ε ~ N(0, I);  velocity target v = dx_t/dt = x − ε.
  Sampling integrates dx/dt = v(x_t, t) from t = 0 (noise) to t = 1 (data).

Time sampling: per noisy chunk, t = sigmoid(μ + σ·z), z ~ N(0, 1) (logit-normal),
then an optional shift s towards noise applied to the noise level u = 1 − t:
u' = s·u / (1 + (s − 1)·u) (s = 1: unchanged; s > 1: noisier).

Regularisers (docs/design.md, section 3): with `cfg_drop_prob` per chunk the noisy copy
may not see its plan (a mask flag, see `masks`); with `clean_flip_prob` per
chunk the clean copy becomes x_t with t ~ U(clean_flip_min_t, 1), and its time
input says so (clean copies otherwise carry t = 1).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from tv2tv_jax.config import FlowConfig


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Shifts times towards noise (shift > 1) or data (< 1); f32[...] -> f32[...]."""
  u = 1.0 - t
  u = shift * u / (1.0 + (shift - 1.0) * u)
  return 1.0 - u


def sample_time(rng: jax.Array, shape, cfg: FlowConfig) -> jax.Array:
  """Logit-normal flow times (then shifted); returns f32[shape] in (0, 1)."""
  z = jax.random.normal(rng, shape, jnp.float32)
  return shift_time(jax.nn.sigmoid(cfg.time_mean + cfg.time_std * z), cfg.time_shift)


def interpolate(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = t·x + (1 − t)·ε. x, eps: [B, K, ...]; t: [B, K] broadcast over the rest."""
  t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
  return t * x + (1.0 - t) * eps


def velocity_target(x: jax.Array, eps: jax.Array) -> jax.Array:
  """v = x − ε (the derivative of `interpolate` in t)."""
  return x - eps


def time_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """The sampler's time grid: f32[steps + 1] from 0 (noise) to 1 (clean), shifted."""
  return shift_time(jnp.linspace(0.0, 1.0, steps + 1, dtype=jnp.float32), shift)


def guided_velocity(v: jax.Array, scale) -> jax.Array:
  """Classifier-free guidance: v f32[r, ...] (v[0] conditional; v[1], when r = 2, with the
  chunk's plan text dropped) -> f32[...] = v_u + scale·(v_c − v_u) (r = 1: v_c)."""
  if v.shape[0] == 1:
    return v[0]
  return v[1] + scale * (v[0] - v[1])


def ode_step(velocity, x: jax.Array, t0, t1, solver: str) -> jax.Array:
  """One step of dx/dt = velocity(x, t) from t0 to t1 (towards t = 1, clean).

  velocity: (x f32[...], t) -> f32[...]; solver 'euler' (one evaluation) or 'heun'
  (two: Euler predictor, trapezoidal corrector). Used inside the sampler's jitted
  chunk loop and, eagerly, by the recompute oracle, so both integrate identically.
  """
  v0 = velocity(x, t0)
  if solver == "euler":
    return x + (t1 - t0) * v0
  if solver == "heun":
    v1 = velocity(x + (t1 - t0) * v0, t1)
    return x + (t1 - t0) * 0.5 * (v0 + v1)
  raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")


@flax.struct.dataclass
class FlowSample:
  """The random quantities of one training batch, all per chunk copy.

  noisy_t: f32[B, Kn]; noise: f32[B, Kn, h, w, c] (ε of each noisy copy);
  cfg_drop: bool[B, Kn] (noisy copy j may not see its plan);
  clean_t: f32[B, K] (1, or the flip time); clean_noise: f32[B, K, h, w, c].
  Kn noisy copies per row (`SequenceConfig.num_noisy`), K clean copies.
  """
  noisy_t: jax.Array
  noise: jax.Array
  cfg_drop: jax.Array
  clean_t: jax.Array
  clean_noise: jax.Array


def _noisy_shape(latent_shape, num_noisy: int | None):
  b, k = latent_shape[:2]
  return (b, k if num_noisy is None else num_noisy, *latent_shape[2:])


def sample_flow(rng: jax.Array, latent_shape, cfg: FlowConfig,
                num_noisy: int | None = None) -> FlowSample:
  """Draws a FlowSample for clean latents of shape [B, K, h, w, c] and `num_noisy`
  noisy copies per row (default K)."""
  b, k = latent_shape[:2]
  noisy_shape = _noisy_shape(latent_shape, num_noisy)
  kn = noisy_shape[1]
  r_t, r_eps, r_drop, r_flip, r_ft, r_feps = jax.random.split(rng, 6)
  flip = jax.random.bernoulli(r_flip, cfg.clean_flip_prob, (b, k))
  flip_t = jax.random.uniform(r_ft, (b, k), jnp.float32, cfg.clean_flip_min_t, 1.0)
  return FlowSample(
      noisy_t=sample_time(r_t, (b, kn), cfg),
      noise=jax.random.normal(r_eps, noisy_shape, jnp.float32),
      cfg_drop=jax.random.bernoulli(r_drop, cfg.cfg_drop_prob, (b, kn)),
      clean_t=jnp.where(flip, flip_t, 1.0),
      clean_noise=jax.random.normal(r_feps, latent_shape, jnp.float32))


def fixed_flow(latent_shape, t: float, seed: int = 0,
               num_noisy: int | None = None) -> FlowSample:
  """A deterministic FlowSample for evaluation: every noisy copy at time `t`, no drop,
  no flip, noise from `seed` (shapes as `sample_flow`)."""
  b, k = latent_shape[:2]
  noisy_shape = _noisy_shape(latent_shape, num_noisy)
  kn = noisy_shape[1]
  noise = jax.random.normal(jax.random.key(seed), noisy_shape, jnp.float32)
  return FlowSample(noisy_t=jnp.full((b, kn), t, jnp.float32), noise=noise,
                    cfg_drop=jnp.zeros((b, kn), bool), clean_t=jnp.ones((b, k), jnp.float32),
                    clean_noise=jnp.zeros(latent_shape, jnp.float32))
