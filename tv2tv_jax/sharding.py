"""Device mesh, logical-axis rules, sharded init and the sharded train step.

The mesh has four named axes (sizes from the config's `mesh` section, -1 = fill
with the remaining devices):

  data      pure data parallelism (params replicated)
  fsdp      data parallelism with parameters and optimizer state sharded
  tensor    tensor (head / FFN / vocab) parallelism
  sequence  sequence parallelism (room for it: the default rules map nothing here)

Which logical axis (`tv2tv_jax.axes`) lands on which mesh axis is the experiment
config's `sharding_rules` list (shared ones: `experiments/sharding_rules.py`). The same code runs on one CPU device, 8 fake CPU
devices and a TPU topology: only the mesh differs.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tv2tv_jax import train_step
from tv2tv_jax import config as config_lib
# The mesh section (its axes, MeshConfig, its parser) is defined with every other config
# section; re-exported here, where the mesh is made.
from tv2tv_jax.config import (MESH_AXES, ConfigError, Experiment, MeshConfig, Rules,  # noqa: F401
                              mesh_config)
from tv2tv_jax.model import TV2TV

BATCH_AXES = ("data", "fsdp")  # the global batch is split over both


def resolve_mesh_shape(mc: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Mesh axis sizes with one -1 filled in; raises ConfigError naming the field.

  The field named is an axis set above 1 (those ask for devices), never the -1 axis
  that only takes what they leave; the message gives every axis and the device count.
  """
  sizes = {a: getattr(mc, a) for a in MESH_AXES}
  for a, s in sizes.items():
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s == 0 or s < -1:
      raise ConfigError(f"mesh.{a}", f"must be a positive integer or -1 (the devices the "
                        f"other axes leave), got {s!r}")
  fill = [a for a in MESH_AXES if sizes[a] == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh.{fill[1]}", f"only one mesh axis may be -1; "
                      f"{' and '.join(f'mesh.{a}' for a in fill)} are")
  shape = ", ".join(f"{a}={s}" + (" (the rest)" if s == -1 else "") for a, s in sizes.items())
  big = {a: s for a, s in sizes.items() if s > 1}
  known = math.prod(big.values())
  devices = f"{num_devices} available device{'s' if num_devices != 1 else ''}"
  if fill:
    if num_devices % known:
      # Blame the first axis that cannot fit on its own, else the one whose factor
      # tips the product over.
      field = next((a for a, s in big.items() if num_devices % s), list(big)[-1])
      product = " x ".join(f"{a}={s}" for a, s in big.items())
      product += f" = {known}" if len(big) > 1 else ""
      raise ConfigError(f"mesh.{field}", f"{product} does not divide the {devices}, so "
                        f"mesh.{fill[0]}=-1 has no whole size (mesh: {shape})")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    if known > num_devices:
      field = next((a for a, s in big.items() if num_devices % s), list(big)[-1])
      problem = f"needs {known} devices, more than the {devices}"
    else:
      # Too few devices asked for: none of the axes is wrong on its own; the fix is
      # an axis that takes the rest.
      field = "data"
      problem = (f"uses {known} of the {devices}; set one axis to -1 to take the rest "
                 f"(mesh.data=-1 is the default)")
    raise ConfigError(f"mesh.{field}", f"the mesh {problem} (mesh: {shape})")
  return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(mc: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with Auto axes (the Linen/GSPMD flow)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mc, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rules_from_config(cfg: Any) -> Rules:
  """The logical-axis rules of a run's config (`config.RunConfig.sharding_rules`: the
  `sharding_rules` list, checked; without one every axis is replicated). A raw config
  (ConfigDict or dict) is parsed whole (`config.as_run_config`)."""
  return config_lib.as_run_config(cfg).sharding_rules


def check_divisibility(exp: Experiment, mesh: Mesh) -> None:
  """Shapes the mesh must divide, checked before compiling, naming the field."""
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if exp.train.batch_size % batch_shards:
    raise ConfigError("train.batch_size", f"{exp.train.batch_size} rows do not split over "
                      f"data x fsdp = {batch_shards} devices")
  # Each microbatch is sharded like the batch (`train_step.microbatches`): its rows too
  # must split over the data axes, or the split would move rows between devices.
  n = exp.train.grad_accum_steps
  if (exp.train.batch_size // n) % batch_shards:
    raise ConfigError("train.grad_accum_steps", f"{n} microbatches of "
                      f"{exp.train.batch_size // n} rows (train.batch_size="
                      f"{exp.train.batch_size}) do not split over data x fsdp = "
                      f"{batch_shards} devices")
  t = mesh.shape["tensor"]
  for field in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
    if getattr(exp.model, field) % t:
      raise ConfigError(f"model.{field}", f"{getattr(exp.model, field)} does not split over "
                        f"mesh.tensor = {t}")
  if exp.model.d_model % mesh.shape["fsdp"]:
    raise ConfigError("model.d_model", f"{exp.model.d_model} does not split over "
                      f"mesh.fsdp = {mesh.shape['fsdp']}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(model: TV2TV, exp: Experiment, mesh: Mesh, rules: Rules):
  """A TrainState-shaped tree of NamedShardings (no allocation: eval_shape)."""
  abstract = jax.eval_shape(functools.partial(train_step.boxed_train_state, model, exp),
                            jax.random.key(0))
  specs = nn.get_partition_spec(abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded_state(model: TV2TV, exp: Experiment, mesh: Mesh, rules: Rules,
                       rng: jax.Array):
  """(TrainState laid out by `rules` on `mesh`, its shardings)."""
  shardings = state_shardings(model, exp, mesh, rules)
  init = jax.jit(lambda r: nn.unbox(train_step.boxed_train_state(model, exp, r)),
                 out_shardings=shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return init(rng), shardings


def make_sharded_train_step(model: TV2TV, exp: Experiment, mesh: Mesh, rules: Rules,
                            shardings):
  """The train step jitted with explicit in/out shardings and the state donated.

  Call it inside `jax.set_mesh(mesh)` (activation constraints read the mesh then).
  """
  def step(state, batch, base_rng):
    with nn.logical_axis_rules(rules):
      return train_step.train_step(state, batch, base_rng, model=model, exp=exp)
  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), replicated(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host batch on the mesh. Single process: the global batch; several
  processes: each passes its own rows (`make_array_from_process_local_data`)."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), sharding)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
