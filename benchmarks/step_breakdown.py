r"""Where a train step's time goes on this CPU: the step timed with one part taken out at a time.

    python benchmarks/step_breakdown.py [--shapes=peer,small] [--steps=5] [--rounds=3]

Ablation timing: each variant is the same jitted computation with one part replaced by a
cheap stand-in of the same shapes, compiled on its own; the part's cost is the time it
removes. Parts:

  optimizer   the train step minus `value_and_grad` of the loss (AdamW update, gradient
              norm, finiteness checks)
  attention   `attention.attend` replaced by its queries (plus a zero-weighted mean of keys
              and values, so their projections stay live)
  rope        `layers.apply_rope` replaced by the identity
  norms       `layers.RMSNorm` replaced by a cast to the activation dtype (no parameters)
  towers      the whole `MoTStack` replaced by the identity: its matmuls, SwiGLU, residuals,
              norms, RoPE and attention together (so towers minus the three above is the
              tower matmuls and what fuses with them)
  rest        what the step costs without the stack and the optimizer: U-Net down / up,
              embedding, LM head, the losses and the flow sample

Parts overlap in what XLA fuses across them, so they need not add up to the step exactly;
the table shows the sum. Variants are timed in rounds (each round times every variant,
`--steps` steps each, median), so drift falls on all alike. Shapes: `peer` is
`peer_comparison.py`'s matched shapes, the other names are `experiments/toy_world.py`
variants. Writes benchmarks/results/step_breakdown.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tv2tv_jax import attention, flow, layers, losses, model as model_lib  # noqa: E402
from tv2tv_jax import benchmarking, synthetic, train_step  # noqa: E402


def _experiment(shapes: str):
  if shapes == "peer":
    import peer_comparison
    return peer_comparison.ours_experiment()
  from experiments import toy_world
  from tv2tv_jax import config as config_lib
  return config_lib.experiment_from_config_dict(toy_world.get_config(shapes))


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def _no_attention(q, k, v, meta, impl="xla", plan=None):
  keep = (jnp.mean(k) + jnp.mean(v)).astype(q.dtype)
  return q + 0 * keep


def _no_norm(self, x):
  return x.astype(jnp.dtype(self.cfg.dtype))


def _no_stack(self, x_txt, x_vid, meta, cached_kv=None, cached_meta=None, regions=None):
  return x_txt, x_vid


# name -> the patches that take the part out (applied while tracing and compiling).
ABLATIONS = {
    "step": (),
    "grad": (),
    "no_attention": ((attention, "attend", _no_attention),),
    "no_rope": ((layers, "apply_rope", lambda x, *a, **k: x),),
    "no_norms": ((layers.RMSNorm, "__call__", _no_norm),),
    "no_towers": ((model_lib.MoTStack, "__call__", _no_stack),),
}


def _compiled(exp, variant: str):
  """(fn, args) of the variant, compiled with its patches in place."""
  model = model_lib.TV2TV(exp.model)
  batch = synthetic.random_batch(0, exp.seq, exp.model, exp.train.batch_size)
  with contextlib.ExitStack() as stack:
    for obj, name, value in ABLATIONS[variant]:
      stack.enter_context(_patched(obj, name, value))
    state = train_step.create_train_state(model, exp, jax.random.key(0))
    rng = jax.random.key(1)
    if variant == "step":
      fn = jax.jit(lambda s, b, r: train_step.train_step(s, b, r, model=model, exp=exp))
      args = (state, batch, rng)
    else:
      sample = flow.sample_flow(rng, batch["latents"].shape, exp.flow,
                                batch["noisy_src"].shape[1])
      grad = jax.value_and_grad(losses.compute_loss, has_aux=True)
      fn = jax.jit(lambda p, b, s: grad(p, model, b, s, exp))
      args = (state.params, batch, sample)
    compiled = fn.lower(*args).compile()
  return compiled, args


def breakdown(shapes: str, steps: int, rounds: int) -> dict:
  exp = _experiment(shapes)
  built = {v: _compiled(exp, v) for v in ABLATIONS}
  got = {v: [] for v in ABLATIONS}
  for _ in range(rounds):
    for v, (compiled, args) in built.items():
      got[v].append(benchmarking.median_seconds(lambda: compiled(*args), steps))
  t = {v: statistics.median(x) for v, x in got.items()}
  parts = {"optimizer": t["step"] - t["grad"],
           "attention": t["grad"] - t["no_attention"],
           "rope": t["grad"] - t["no_rope"],
           "norms": t["grad"] - t["no_norms"],
           "tower matmuls and the rest of the stack": (t["grad"] - t["no_towers"])
           - (t["grad"] - t["no_attention"]) - (t["grad"] - t["no_rope"])
           - (t["grad"] - t["no_norms"]),
           "rest (U-Net, embedding, LM head, losses)": t["no_towers"]}
  return dict(shapes=shapes, step_s=t["step"], variants_s=t, rounds_s=got, parts_s=parts,
              parts_sum_s=sum(parts.values()))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", default="peer,small")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "step_breakdown.json"))
  args = ap.parse_args(argv)
  results = []
  for shapes in args.shapes.split(","):
    r = breakdown(shapes.strip(), args.steps, args.rounds)
    results.append(r)
    print(f"\n{shapes}: step {r['step_s'] * 1e3:.1f} ms "
          f"(variants: {', '.join(f'{k} {v * 1e3:.1f}' for k, v in r['variants_s'].items())})")
    for name, s in r["parts_s"].items():
      print(f"  {name:<42} {s * 1e3:9.1f} ms  {s / r['step_s']:6.1%}")
    print(f"  {'sum of parts':<42} {r['parts_sum_s'] * 1e3:9.1f} ms  "
          f"{r['parts_sum_s'] / r['step_s']:6.1%}")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(steps=args.steps, rounds=args.rounds, results=results), f, indent=1)
  print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
  main()
