r"""Sharding overhead (1 vs 8 fake CPU devices) and checkpoint save / restore times.

    python benchmarks/scaling_and_checkpoints.py [--variant=quick] [--steps=5]

Part 1, for the same config and batch: median step time and MFU on a 1-device mesh
against an 8-device (data 2 x fsdp 2 x tensor 2) mesh of fake CPU devices. All of
them share this host's cores, so the ratio measures the cost of the partitioned
program and its collectives, not a speed-up.

Part 2, the Orbax checkpoint of the 8-device train state:
  - blocking: the time `save` holds the training loop (device-to-host copy);
  - total: until the background write has finished (`wait`);
  - restore: reading it back onto a 1-device and a 4-device mesh.
Writes benchmarks/results/scaling_and_checkpoints.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from experiments import toy_world  # noqa: E402
from tv2tv_jax import checkpoints, flops, sharding, synthetic, trainer  # noqa: E402
from tv2tv_jax import config as config_lib  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "quick", "Config variant.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "scaling_and_checkpoints.json"), "JSON output.")


def _median(xs):
  return sorted(xs)[len(xs) // 2]


def _run(cfg, mesh_cfg, devices, steps):
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(dict(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor))
  run = trainer.Run(cfg, devices)
  exp = run.exp
  state, _ = sharding.init_sharded_state(run.model, exp, run.mesh, run.rules, run.init_rng)
  step = sharding.make_sharded_train_step(run.model, exp, run.mesh, run.rules, run.shardings)
  batch = synthetic.random_batch(0, exp.seq, exp.model, exp.train.batch_size)
  times = []
  with jax.set_mesh(run.mesh):
    b = sharding.put_batch(batch, run.mesh)
    state, m = step(state, b, run.step_rng)
    jax.block_until_ready(m)
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, b, run.step_rng)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return run, state, _median(times)


def main(argv):
  del argv
  cfg = toy_world.get_config(_VARIANT.value)
  cfg.train.batch_size = 8
  exp = config_lib.experiment_from_config_dict(cfg)
  step_flops = flops.train_step_flops(exp, exp.train.batch_size)
  peak = flops.device_peak_flops() * jax.local_device_count()  # the whole host
  results = {"variant": _VARIANT.value, "train_flops": step_flops, "host_peak_flops": peak}

  _, _, t1 = _run(cfg, sharding.MeshConfig(data=1), jax.devices()[:1], _STEPS.value)
  run8, state8, t8 = _run(cfg, sharding.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices(),
                          _STEPS.value)
  results.update(step_s_1dev=t1, step_s_8dev=t8, overhead_8_vs_1=t8 / t1,
                 mfu_1dev=step_flops / t1 / peak, mfu_8dev=step_flops / t8 / peak)
  print(f"{'mesh':28s} {'step s':>8s} {'MFU (host)':>10s}")
  print(f"{'1 device':28s} {t1:8.3f} {step_flops / t1 / peak:10.1%}")
  print(f"{'8 devices (2x2x2)':28s} {t8:8.3f} {step_flops / t8 / peak:10.1%}")
  print(f"sharding overhead: {t8 / t1:.2f}x step time")

  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoints.Checkpointer(os.path.join(tmp, "ckpt"), async_save=True)
    # The first save includes Orbax's one-time setup; the second is the steady state.
    for label, step in (("first", 1), ("steady", 2)):
      t = time.perf_counter()
      ckpt.save(step, state8, {"index": step, "seed": 0}, {"note": "benchmark"})
      blocking = time.perf_counter() - t
      ckpt.wait()
      total = time.perf_counter() - t
      results.update({f"save_{label}_blocking_s": blocking, f"save_{label}_total_s": total})
      print(f"{label} save: blocks the loop {blocking:.3f} s, total {total:.3f} s (async)")
    size = sum(os.path.getsize(os.path.join(d, f))
               for d, _, fs in os.walk(os.path.join(tmp, "ckpt", "2")) for f in fs)
    results["checkpoint_bytes"] = size
    print(f"checkpoint size {size / 2**20:.1f} MiB")
    for n in (1, 4):
      cfg_n = cfg.copy_and_resolve_references()
      cfg_n.mesh.update(dict(data=-1, fsdp=1, tensor=1))
      run_n = trainer.Run(cfg_n, jax.devices()[:n])
      t = time.perf_counter()
      restored = ckpt.restore(run_n.restore_target(), log=lambda _: None)
      jax.block_until_ready(restored[1])
      dt = time.perf_counter() - t
      results[f"restore_s_{n}dev"] = dt
      print(f"restore onto {n} device(s): {dt:.3f} s")
    ckpt.close()
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
