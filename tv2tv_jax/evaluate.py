r"""Evaluates a checkpoint on whatever devices this process has.

    python -m tv2tv_jax.evaluate --workdir=<train dir> [--checkpoint=<step>]
    python -m tv2tv_jax.evaluate --workdir=<train dir> --params=<params-only export dir>

The experiment config is read from the restored checkpoint itself (or
`<workdir>/config.json` for a params-only export), never from a later start's
`config.json`; `--config.mesh.*` style overrides are not needed (`run_state.load_params`): the mesh
is rebuilt from the devices present. Prints the evaluation losses as JSON. --workdir,
--params and --export_params may be local paths or gs:// URIs (`tv2tv_jax.workdirs`).
"""

from __future__ import annotations

import json

from absl import app, flags
import jax

from tv2tv_jax import checkpoints, distributed, run_state

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("checkpoint", None, "Step to restore (default: newest).")
  flags.DEFINE_string("params", None, "A params-only export to evaluate instead.")
  flags.DEFINE_string("export_params", None, "Also write a params-only export here.")
  flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.setup_process()
  loaded = run_state.load_params(FLAGS.workdir, FLAGS.checkpoint, FLAGS.params)
  result = run_state.evaluate_checkpoint(FLAGS.workdir, loaded=loaded)
  if FLAGS.export_params:
    checkpoints.export_params(loaded[1], FLAGS.export_params)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
  define_flags()
  app.run(main)
