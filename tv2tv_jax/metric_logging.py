"""Where metrics go: a JSON-lines file, TensorBoard event files, and the console.

Only process 0 writes (the others hold identical, replicated metrics). On a
terminal the console line is a live progress display (rewritten in place);
otherwise (CI, log files) one line per logged step.

The work directory may be a gs:// URI (`tv2tv_jax.workdirs`): metrics.jsonl then goes
through epath and TensorBoard through tensorboardX's own gs:// writer.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from etils import epath
import jax

from tv2tv_jax import workdirs


class _JsonLines:
  """Appends JSON lines to a file that outlives the run (and its resumes).

  A local file is appended to and flushed per line. A Cloud Storage object cannot be
  appended to, and a buffered upload shows nothing until it is closed, so there the whole
  text is rewritten per line: a crash loses no logged line, at the cost of rewriting a
  file that grows by one line per logged step.
  """

  def __init__(self, path: epath.Path, keep_through: int | None = None):
    self.path = path
    self._file, self._text = None, None
    self.superseded = 0
    if keep_through is not None and path.exists():
      self.superseded = _supersede_after(path, keep_through)
    if workdirs.is_local(path):
      # Appended, not truncated: a resumed run continues the same file.
      self._file = open(os.fspath(path), "a")
    else:
      self._text = path.read_text() if path.exists() else ""

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
    else:
      self._text += line + "\n"
      self.path.write_text(self._text)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def _supersede_after(path: epath.Path, step: int) -> int:
  """Moves the records of steps after `step` from `path` to `<stem>.superseded.jsonl`
  (appended there, never lost); returns how many moved.

  A run resumed from an older checkpoint logs those steps again: without this the file
  would hold two values per step and a plot of it would zigzag.
  """
  kept, later = [], []
  for line in path.read_text().splitlines():
    try:
      later_step = int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
      later_step = True
    (later if later_step else kept).append(line)
  if later:
    aside = path.parent / f"{path.stem}.superseded.jsonl"
    old = aside.read_text() if aside.exists() else ""
    aside.write_text(old + "".join(x + "\n" for x in later))
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)
  return len(later)


class MetricLogger:
  """Appends to `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tensorboard`.

  `workdir`: a local path or gs:// URI (str or path), created if missing. `start_step`:
  the step this process starts from (the restored checkpoint's, 0 for a new run); records
  of later steps, from before a resume that went back, move to metrics.superseded.jsonl.
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int,
               log: Callable[[str], None] = print, tensorboard: bool = True,
               start_step: int | None = None):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self._log = log
    self._tty = log is print and sys.stdout.isatty()
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    wd = workdirs.as_path(workdir)
    workdirs.check_reachable(wd)
    wd.mkdir(parents=True, exist_ok=True)
    self._jsonl = _JsonLines(wd / "metrics.jsonl", keep_through=start_step)
    if self._jsonl.superseded:
      log(f"metrics.jsonl: {self._jsonl.superseded} records of steps after {start_step} "
          f"(logged before this resume) moved to metrics.superseded.jsonl")
    if tensorboard:
      from tensorboardX import SummaryWriter  # no TensorFlow needed
      # A string: tensorboardX picks its gs:// writer (or the local one) from the prefix.
      self._tb = SummaryWriter(os.fspath(wd / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Records scalar `metrics` at `step` (file + TensorBoard)."""
    if not self.active:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record))
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
