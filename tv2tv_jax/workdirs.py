"""Work directories on local disk or in Cloud Storage (`gs://bucket/path`), via `etils.epath`.

`as_path` is where a `--workdir` (or checkpoint / export directory) string becomes a
path: a local path becomes an absolute `epath.Path` (what `os.path.abspath` gave before),
a `gs://` URI stays a URI. The trainer, checkpoints (Orbax takes epath paths), metric
logging, evaluation and generation all go through it, so one `--workdir=gs://b/run`
reaches the bucket everywhere:

  config.json, metrics.jsonl               epath: TensorFlow's gfile when TensorFlow is
                                          installed, else fsspec + gcsfs (the `gcs` extra)
  checkpoints/                            Orbax: directories through epath, array data
                                          through TensorStore's own GCS driver; Orbax also
                                          asks google-cloud-storage about the bucket
  tensorboard/                            tensorboardX's own gs:// writer (google-cloud-storage)

`check_reachable` fails early, naming the flag, when those packages are missing. Only
local paths and gs:// are accepted (other schemes fail in `as_path`). Local-only,
because they hand paths to libraries that open files themselves: the prepared data
directory (TFDS ArrayRecord build, VAE, tokenizer; see `inputs.data_dir`) and
`tv2tv_jax.generate` (which `main` refuses to run after training into a gs:// workdir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any

from etils import epath

CLOUD_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class WorkdirError(ValueError):
  """A path cannot be used where it was given; `field` names the flag or config field."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def scheme(path: str | os.PathLike) -> str | None:
  """'gs' for 'gs://b/x' (any URI scheme), None for a local path."""
  m = _SCHEME.match(os.fspath(path))
  return m.group(1) if m else None


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


def as_path(path: str | os.PathLike, field: str = "--workdir") -> epath.Path:
  """A local path (made absolute) or a gs:// URI as an `epath.Path`.

  Raises WorkdirError naming `field` for an empty path or another URI scheme.
  """
  text = os.fspath(path)
  if not text:
    raise WorkdirError(field, "is empty")
  kind = scheme(text)
  if kind is None:
    return epath.Path(os.path.abspath(text))
  if kind not in CLOUD_SCHEMES:
    raise WorkdirError(field, f"{text}: only local paths and gs:// URIs are supported, "
                       f"not {kind}://")
  return epath.Path(text)


def require_local(path: str | os.PathLike, field: str, what: str) -> str:
  """`path` as a local absolute string; WorkdirError naming `field` if it is a URI.

  `what` says what needs the local filesystem (for the message).
  """
  text = os.fspath(path)
  if not is_local(text):
    raise WorkdirError(field, f"{text} is not a local path; {what} needs a local (or "
                       f"mounted, e.g. gcsfuse) directory")
  return os.path.abspath(text)


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a missing parent package (e.g. google.cloud)
    return False


def missing_cloud_packages(path: str | os.PathLike) -> list[str]:
  """The pip packages that reading and writing `path` needs but are not installed
  (empty for local paths)."""
  if is_local(path):
    return []
  missing = []
  # epath reads gs:// with TensorFlow when present, else with fsspec's gcsfs.
  if not (_installed("tensorflow") or _installed("gcsfs")):
    missing.append("gcsfs")
  # Orbax (bucket metadata when listing steps) and tensorboardX's gs:// writer.
  if not _installed("google.cloud.storage"):
    missing.append("google-cloud-storage")
  return missing


def check_reachable(path: str | os.PathLike, field: str = "--workdir") -> None:
  """Raises WorkdirError naming `field` if a gs:// `path` lacks the packages to reach it."""
  missing = missing_cloud_packages(path)
  if missing:
    raise WorkdirError(field, f"{os.fspath(path)} needs {', '.join(missing)} (install the "
                       f"`gcs` extra: pip install -e '.[gcs]')")



def read_json(path: str | os.PathLike, field: str) -> Any:
  """The JSON document at `path` (local or gs://). Raises WorkdirError naming `field` and
  the file when it is missing or is not valid UTF-8 JSON (truncated, torn)."""
  p = as_path(path, field)
  try:
    return json.loads(p.read_text())
  except FileNotFoundError as e:
    raise WorkdirError(field, f"{os.fspath(p)} does not exist") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(field, f"{os.fspath(p)} is not valid JSON (truncated or torn? {e})") from e
