"""Where metrics go: a JSON-lines file, TensorBoard event files, and the console.

Only process 0 writes (the others hold identical, replicated metrics). On a
terminal the console line is a live progress display (rewritten in place);
otherwise (CI, log files) one line per logged step.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax


class MetricLogger:
  """Appends to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tensorboard`."""

  def __init__(self, workdir: str, total_steps: int, log: Callable[[str], None] = print,
               tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self._log = log
    self._tty = log is print and sys.stdout.isatty()
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    # Appended, not truncated: a resumed run continues the same file.
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records scalar `metrics` at `step` (file + TensorBoard)."""
    if not self.active:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def console(self, line: str, final: bool = False) -> None:
    """A progress line: in place on a terminal, else one printed line."""
    if not self.active:
      return
    if self._tty and not final:
      sys.stdout.write("\r\033[K" + line)
      sys.stdout.flush()
    else:
      if self._tty:
        sys.stdout.write("\r\033[K")
      self._log(line)

  def message(self, line: str) -> None:
    """A one-off message (always its own line)."""
    if self.active:
      if self._tty:
        sys.stdout.write("\r\033[K")
      self._log(line)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def format_eta(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
