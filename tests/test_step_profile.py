"""benchmarks/step_profile.py's HLO reading: the FLOPs it gives each compiled op with dots."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import step_profile  # noqa: E402


def test_dot_flops_by_op_counts_every_dot_once_per_op():
  x, w1, w2 = jnp.ones((64, 32)), jnp.ones((32, 48)), jnp.ones((48, 16))
  q = jnp.ones((4, 24, 8))

  def f(x, w1, w2, q):
    h = jax.nn.relu(x @ w1) @ w2  # 2*64*32*48 + 2*64*48*16
    s = jnp.einsum("bqd,bkd->bqk", q, q)  # batched: 2*4*24*24*8
    return jnp.sum(h) + jnp.sum(jax.nn.softmax(s))

  hlo = jax.jit(f).lower(x, w1, w2, q).compile().as_text()
  flops = step_profile.dot_flops_by_op(hlo)
  want = 2 * 64 * 32 * 48 + 2 * 64 * 48 * 16 + 2 * 4 * 24 * 24 * 8
  assert sum(flops.values()) == pytest.approx(want)
  assert all(v > 0 for v in flops.values())
