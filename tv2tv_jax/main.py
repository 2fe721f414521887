r"""Prepares the data, trains TV2TV from an experiment config (resuming from the work
directory if it can), and samples after training if the config asks.

    python -m tv2tv_jax.main --config=experiments/toy_world.py:quick --workdir=/tmp/run \
        [--config.train.num_steps=100 ...] [--distributed | --coordinator_address=...] \
        [--allow_config_change=optim.learning_rate]

Resuming refuses a config that changes what the checkpoints mean (`resume_check`), naming
the fields; --allow_config_change names the ones changed on purpose.

--workdir may be a gs:// URI (docs/launch.md, "A work directory every worker sees").
Sources read from a prepared data directory (`data.data_dir`) are prepared first, on
process 0 (`data_pipelines.preparation`, the stages of `python -m tv2tv_jax.prepare`,
cached): the README's toy-world command runs the whole chain.
"""

import re

from absl import app, flags
import jax
from ml_collections import config_flags

from tv2tv_jax import (config as config_lib, distributed, inputs, resume_check, run_lock,
                       trainer, workdirs)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for logs and checkpoints: a "
                                "local path or gs://bucket/path.")
_ALLOW = flags.DEFINE_list("allow_config_change", [], "Config fields (dotted, or a section "
                           "prefix) that a resume may change on purpose, beyond the ones "
                           "that are always safe (tv2tv_jax/resume_check.py).")
flags.mark_flags_as_required(["config", "workdir"])


def _override_error(argv: list[str]) -> config_lib.ConfigError | None:
  """The ConfigError naming the first `--config.<key>=...` override whose key the config
  file lacks; None when every override names an existing key."""
  config_arg = None
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=|$)", arg)
    if match:
      config_arg = arg.split("=", 1)[1] if match.group(1) else (argv[i + 1:] or [None])[0]
  if config_arg is None:
    return None
  cfg = flags.FLAGS[_CONFIG.name].parser.parse(config_arg)  # the file, no overrides
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match:
      try:
        config_lib.check_key_path(cfg, match.group(1))
      except config_lib.ConfigError as e:
        return e
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.<key>` override reported in one line.

  ml_collections refuses such an override (the config is locked) with a KeyError deep in
  flag parsing, which absl would show as a long traceback.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    err = _override_error(argv)
    if err is None:
      raise  # not an unknown override: the library's own error, unchanged
    raise SystemExit(f"error: {err}") from e


def check_config(cfg) -> config_lib.RunConfig:
  """The typed config (`config.run_config_from_config_dict`), checked before any process
  setup, data stage or compile.

  Besides every section's fields, the data preparation is checked now
  (`preparation.check_config`): a VAE recipe that cannot train would otherwise surface
  only after the dataset is built.
  """
  run_cfg = config_lib.run_config_from_config_dict(cfg)
  if run_cfg.data.source in config_lib.PREPARED_SOURCES:
    from data_pipelines import preparation  # local: only prepared sources need it
    preparation.check_config(run_cfg)
  return run_cfg


def prepare_data(cfg: config_lib.RunConfig, workdir: str) -> None:
  """Runs the data preparation (cached stages, `data_pipelines.preparation`) into the
  run's data directory, every process taking its part (process 0 the building stages,
  all of them the latent encode): the trainer only reads prepared data."""
  if cfg.data.source not in config_lib.PREPARED_SOURCES:
    return
  from data_pipelines import preparation  # local: heavy imports
  preparation.prepare(inputs.data_dir(cfg, workdir), cfg, process_index=jax.process_index(),
                      process_count=jax.process_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value  # the ConfigDict stops here: the trainer records it as given
  try:
    run_cfg = check_config(cfg)  # first: fails before a multi-host start waits for its peers
    distributed.setup_process()
    prepare_data(run_cfg, _WORKDIR.value)
    records = trainer.train(cfg, _WORKDIR.value, allow_config_change=tuple(_ALLOW.value))
  except (config_lib.ConfigError, resume_check.ResumeError, run_lock.WorkdirLockedError,
          workdirs.WorkdirError) as e:
    # The message names the field, the differing settings or the work directory's
    # holder (mesh errors come from train: they need the device count); a traceback
    # would only bury it.
    raise SystemExit(f"error: {e}") from e
  sample = run_cfg.sample
  print("done:", trainer.final_summary(records))
  if sample.after_training and jax.process_index() == 0:
    from tv2tv_jax import video_samples  # local: the sampler is only needed here
    interventions = video_samples.parse_interventions(sample.interventions)
    paths = video_samples.generate_to_dir(_WORKDIR.value, [sample.prompt], interventions,
                                          sample.num_chunks, sample.cfg_scale,
                                          sample.ode_steps, sample.seed)
    print("sample (chunk texts, forced ones marked, in the .json):", *paths, sep="\n  ")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
