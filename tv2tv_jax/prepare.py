r"""Prepares a run's data: raw source -> a prepared data directory the trainer reads.

    python -m tv2tv_jax.prepare --config=experiments/toy_world.py:quick --data_dir=/tmp/data
    python -m tv2tv_jax.prepare --config=experiments/csgo_3b.py:<variant> \
        --config.data.manual_dir=<hdf5 folder> --config.data.vae_dir=<trained VAE> \
        --data_dir=<prepared folder>

Runs the missing stages of `data_pipelines.preparation` (TFDS build, VAE, latent encode,
tokenizer), each cached and resumable, into --data_dir (default: the config's
`data.data_dir`). Started on every host of a pod with --distributed (as `main` is), the
hosts share the latent encode, each writing its own shards; --data_dir must then be a
folder they all see. Then train with `python -m tv2tv_jax.main --config=... \
--config.data.data_dir=<that folder>`; `main` runs this step itself first, so the toy
world needs only the one command.
"""

from __future__ import annotations

import contextlib
import json
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from tv2tv_jax import config as config_lib, distributed, run_lock, workdirs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=False)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared data directory (default: the "
                                "config's data.data_dir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from data_pipelines import preparation  # local: heavy imports
  try:
    cfg = config_lib.run_config_from_config_dict(_CONFIG.value)  # the ConfigDict stops here
  except config_lib.ConfigError as e:
    raise SystemExit(f"error: {e}") from e
  data_dir = _DATA_DIR.value or cfg.data.data_dir
  if not data_dir:
    raise app.UsageError("--data_dir (or the config's data.data_dir) is required")
  try:
    workdirs.require_local(data_dir, "--data_dir", "preparation writes with local file I/O")
    preparation.check_config(cfg)  # before a multi-host start waits for its peers
    distributed.setup_process()
    # The stages (and the libraries they call, e.g. TFDS's progress lines) write to
    # stderr; stdout carries only the JSON summary, for scripts.
    with contextlib.redirect_stdout(sys.stderr):
      markers = preparation.prepare(data_dir, cfg, log=print,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  except (config_lib.ConfigError, run_lock.WorkdirLockedError, workdirs.WorkdirError) as e:
    raise SystemExit(f"error: {e}") from e
  if jax.process_index() == 0:
    print(json.dumps({s: {k: v for k, v in m.items() if k != "settings"}
                      for s, m in markers.items()}, indent=1))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
