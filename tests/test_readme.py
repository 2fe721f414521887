"""The README's two set-up commands are the ones CI runs."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_ci_runs_the_readme_commands():
  readme = open(os.path.join(REPO, "README.md")).read()
  setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
  blocks = [b.strip() for b in _bash_blocks(setup)]
  assert len(blocks) == 2, "the README keeps exactly two set-up commands"
  install_and_run, test = blocks
  install = install_and_run.split("&&")[0].strip()
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  ci_lines = [l.strip() for l in ci.splitlines()]
  assert install in ci_lines, install
  assert test in ci_lines, test
  assert "python -m tv2tv_jax.main" in install_and_run
