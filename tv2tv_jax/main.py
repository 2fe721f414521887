r"""Trains TV2TV from an experiment config (resuming from the work directory if it can).

    python -m tv2tv_jax.main --config=experiments/toy_world.py:quick --workdir=/tmp/run \
        [--config.train.num_steps=100 ...] [--distributed | --coordinator_address=...] \
        [--allow_config_change=optim.learning_rate]

Resuming refuses a config that changes what the checkpoints mean (`resume_check`), naming
the fields; --allow_config_change names the ones changed on purpose.

--workdir may be a gs:// URI (docs/launch.md, "A work directory every worker sees").
"""

from absl import app, flags
import jax
from ml_collections import config_flags

from tv2tv_jax import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints: a "
                                "local path or gs://bucket/path.")
_ALLOW = flags.DEFINE_list("allow_config_change", [], "Config fields (dotted, or a section "
                           "prefix) that a resume may change on purpose, beyond the ones "
                           "that are always safe (tv2tv_jax/resume_check.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.setup_process()
  cfg = _CONFIG.value
  sample = cfg.get("sample") or {}
  records = trainer.train(cfg, _WORKDIR.value, allow_config_change=tuple(_ALLOW.value))
  print("done:", trainer.final_summary(records))
  if sample.get("after_training") and jax.process_index() == 0:
    from tv2tv_jax import generate  # local: the sampler is only needed here
    interventions = dict(generate.parse_intervention(s) for s in sample.interventions)
    paths = generate.generate_to_dir(_WORKDIR.value, [sample.prompt], interventions,
                                     sample.num_chunks, sample.cfg_scale, sample.ode_steps,
                                     sample.seed)
    print("sample (chunk texts, forced ones marked, in the .json):", *paths, sep="\n  ")


if __name__ == "__main__":
  app.run(main)
