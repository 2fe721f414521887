"""Process setup shared by the command-line entry points: multi-host init, CPU devices.

Multi-host runs call `jax.distributed.initialize` before anything touches a device.
On Cloud TPU pod slices no arguments are needed (`--distributed`, auto-detected);
elsewhere pass the coordinator explicitly, by flag or environment:

  --coordinator_address=host:port  --num_processes=N  --process_id=i
  (or TV2TV_COORDINATOR_ADDRESS, TV2TV_NUM_PROCESSES, TV2TV_PROCESS_ID)

`--cpu_devices=N` splits the host CPU into N devices (testing sharding on CPU).
"""

from __future__ import annotations

import os

from absl import flags, logging
import jax

_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Initialise multi-host JAX (auto-detected on Cloud TPU).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Number of CPU devices to expose.")


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def setup_process() -> None:
  """Applies the flags above; call first in a `main`.

  Also quiets library INFO logs (Orbax logs every file it writes) unless
  `--verbosity` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  address = _COORDINATOR.value or os.environ.get("TV2TV_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value or _env_int("TV2TV_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("TV2TV_PROCESS_ID")
  if address:
    if num is None or pid is None:
      raise flags.IllegalFlagValueError(
          "--coordinator_address needs --num_processes and --process_id (or the "
          "TV2TV_NUM_PROCESSES / TV2TV_PROCESS_ID environment variables)")
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
