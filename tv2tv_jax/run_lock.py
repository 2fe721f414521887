"""One writer per work directory: an exclusive lock object `<workdir>/LOCK`.

Two training processes writing one work directory replace each other's checkpoints and
interleave their metrics, and neither notices. The trainer therefore takes this lock
(process 0, before anything of the run is written) and holds it until it returns.

The lock holds JSON: {owner (random id), host, pid, started, heartbeat (unix seconds)}.
Every operation is a compare-and-swap on that object, so two processes racing for it
cannot both win:

  local   create with O_CREAT | O_EXCL; replace / delete under an flock of `LOCK.guard`
          after checking the content is still the one read
  gs://   google-cloud-storage preconditions: create with if_generation_match=0, replace
          and delete with if_generation_match=<the generation read>; Cloud Storage
          applies them atomically (a plain file lock cannot work on a bucket)

A lock is stale, and is taken over (with a log line), when its holder is on this host
and its process is gone, or, for a holder on another host (whose processes cannot be
seen from here), when its heartbeat is older than `STALE_AFTER_S`. The holder refreshes
the heartbeat at most every `HEARTBEAT_S` (the trainer calls `heartbeat()` every step).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from typing import Any, Callable

from etils import epath

from tv2tv_jax import workdirs

LOCK_NAME = "LOCK"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 900.0


class WorkdirLockedError(RuntimeError):
  """Another live process holds the work directory; the message names it."""


class _LocalStore:
  """Compare-and-swap on a local file (atomic exclusive create; the rest under flock)."""

  def __init__(self, path: epath.Path):
    self.path = os.fspath(path)

  @contextlib.contextmanager
  def _guard(self):
    import fcntl  # POSIX only, as the trainer
    fd = os.open(self.path + ".guard", os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # releases the flock

  def read(self) -> tuple[bytes, bytes] | None:
    """(content, token) or None when absent; the token is the content itself."""
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return None
    return data, data

  def create(self, data: bytes) -> bytes | None:
    """Writes `data` if the object is absent; its token, or None if it exists."""
    with self._guard():
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return None
      with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data

  def replace(self, data: bytes, token: bytes) -> bytes | None:
    """Writes `data` if the object is still `token`'s; the new token, else None."""
    with self._guard():
      now = self.read()
      if now is None or now[1] != token:
        return None
      tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, self.path)
    return data

  def delete(self, token: bytes) -> bool:
    with self._guard():
      now = self.read()
      if now is None or now[1] != token:
        return False
      os.remove(self.path)
    return True


class _GcsStore:
  """Compare-and-swap on a Cloud Storage object with generation preconditions."""

  def __init__(self, path: epath.Path, client: Any = None):
    bucket, _, name = os.fspath(path)[len("gs://"):].partition("/")
    self._blob = (client or gcs_client()).bucket(bucket).blob(name)

  @staticmethod
  def _precondition_failed(e: Exception) -> bool:
    # google.api_core.exceptions' 412 and 404, by name: the check needs no import here.
    return type(e).__name__ in ("PreconditionFailed", "NotFound")

  def read(self) -> tuple[bytes, int] | None:
    try:
      self._blob.reload()
      return self._blob.download_as_bytes(if_generation_match=self._blob.generation), \
          self._blob.generation
    except Exception as e:  # noqa: BLE001 -- absent, or replaced between the two calls
      if self._precondition_failed(e):
        return None
      raise

  def _guarded(self, fn, **kwargs) -> bool:
    try:
      fn(**kwargs)
    except Exception as e:  # noqa: BLE001
      if self._precondition_failed(e):
        return False
      raise
    return True

  def create(self, data: bytes) -> int | None:
    ok = self._guarded(self._blob.upload_from_string, data=data, if_generation_match=0)
    return self._blob.generation if ok else None  # the upload sets the new generation

  def replace(self, data: bytes, token: int) -> int | None:
    ok = self._guarded(self._blob.upload_from_string, data=data, if_generation_match=token)
    return self._blob.generation if ok else None

  def delete(self, token: int) -> bool:
    return self._guarded(self._blob.delete, if_generation_match=token)


def gcs_client() -> Any:
  """A google.cloud.storage.Client (the `gcs` extra; `workdirs.check_reachable` has
  checked it is installed)."""
  from google.cloud import storage
  return storage.Client()


def _store(workdir: epath.Path, client: Any = None):
  path = workdir / LOCK_NAME
  return _LocalStore(path) if workdirs.is_local(path) else _GcsStore(path, client)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def stale_reason(holder: dict[str, Any], now: float, host: str) -> str | None:
  """Why `holder`'s lock is stale (its process is gone, or its heartbeat is too old), or
  None while it may still be writing."""
  if holder.get("host") == host:
    return None if _alive(int(holder.get("pid", -1))) else \
        f"process {holder.get('pid')} on this host ({host}) is gone"
  age = now - float(holder.get("heartbeat", 0.0))
  if age > STALE_AFTER_S:
    return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
  return None


class WorkdirLock:
  """The held lock of one work directory (`acquire` makes one).

  Args:
    workdir: local path or gs:// URI (str or path).
    log: where a take-over of a stale lock is reported.
    client: a google.cloud.storage.Client for gs:// (default: a new one).
  """

  def __init__(self, workdir: str | os.PathLike, log: Callable[[str], None] = print,
               client: Any = None):
    self.workdir = workdirs.as_path(workdir, "--workdir")
    self._store = _store(self.workdir, client)
    self._log = log
    self.owner = uuid.uuid4().hex
    self.host = socket.gethostname()
    self._token = None
    self._last_beat = 0.0

  def _record(self, now: float) -> bytes:
    return json.dumps({"owner": self.owner, "host": self.host, "pid": os.getpid(),
                       "started": self._started, "heartbeat": now}).encode()

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (a stale one is taken over). Raises WorkdirLockedError naming the
    live holder."""
    self._started = time.time()
    for _ in range(5):  # a race lost to another taker is retried with what it wrote
      self._token = self._store.create(self._record(self._started))
      if self._token is not None:
        self._last_beat = self._started
        return self
      current = self._store.read()
      if current is None:
        continue  # released meanwhile
      try:
        holder = json.loads(current[0])
      except (json.JSONDecodeError, UnicodeDecodeError):
        holder = {}  # torn by a crash mid-write (local); treated as long dead
      reason = stale_reason(holder, time.time(), self.host)
      if reason is None:
        raise WorkdirLockedError(
            f"--workdir {self.workdir} is in use by process {holder.get('pid')} on "
            f"{holder.get('host')} (since {time.ctime(float(holder.get('started', 0)))}, "
            f"heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago). Two "
            f"runs writing one work directory replace each other's checkpoints. Use "
            f"another --workdir, or stop that run; if it is certainly dead, delete "
            f"{self.workdir / LOCK_NAME}.")
      if self._store.delete(current[1]):
        self._log(f"took over the stale lock of {self.workdir}: {reason}")
    raise WorkdirLockedError(f"--workdir {self.workdir}: could not take its lock (other "
                             f"processes keep taking it)")

  def heartbeat(self, force: bool = False) -> None:
    """Refreshes the heartbeat (at most every HEARTBEAT_S unless `force`). Raises
    WorkdirLockedError if another process has taken the lock meanwhile."""
    now = time.time()
    if self._token is None or (not force and now - self._last_beat < HEARTBEAT_S):
      return
    token = self._store.replace(self._record(now), self._token)
    if token is None:
      self._token = None
      raise WorkdirLockedError(f"--workdir {self.workdir}: the lock was taken by another "
                               f"process while this run held it (its heartbeat stalled "
                               f"past {STALE_AFTER_S:.0f} s?); stopping before writing more")
    self._token, self._last_beat = token, now

  def release(self) -> None:
    """Deletes the lock if this process still holds it."""
    if self._token is not None:
      self._store.delete(self._token)
      self._token = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
