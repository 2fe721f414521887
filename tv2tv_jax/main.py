r"""Trains TV2TV from an experiment config (resuming from the work directory if it can).

    python -m tv2tv_jax.main --config=experiments/toy_world.py:quick --workdir=/tmp/run \
        [--config.train.num_steps=100 ...] [--distributed | --coordinator_address=...]
"""

from absl import app, flags
from ml_collections import config_flags

from tv2tv_jax import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.setup_process()
  records = trainer.train(_CONFIG.value, _WORKDIR.value)
  print("done:", trainer.final_summary(records))


if __name__ == "__main__":
  app.run(main)
