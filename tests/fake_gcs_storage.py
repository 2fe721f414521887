"""An in-memory stand-in for google.cloud.storage's Client / Bucket / Blob, with the
generation preconditions `run_lock` relies on, backed by the fsspec MemoryFileSystem of
the `fake_gcs` fixture (so objects written here are seen through epath too).

It follows the documented semantics (if_generation_match=0: only if absent; =g: only if
the live generation is g; 412 PreconditionFailed / 404 NotFound otherwise); it is not the
real service.
"""

from __future__ import annotations

import itertools


class PreconditionFailed(Exception):
  pass


class NotFound(Exception):
  pass


class Client:

  def __init__(self, fs):
    self.fs, self.generations, self._next = fs, {}, itertools.count(1)

  def bucket(self, name):
    return _Bucket(self, name)


class _Bucket:

  def __init__(self, client, name):
    self.client, self.name = client, name

  def blob(self, name):
    return _Blob(self.client, f"gs://{self.name}/{name}")


class _Blob:

  def __init__(self, client, uri):
    self.client, self.uri, self.generation = client, uri, None

  def _live(self):
    return self.client.generations.get(self.uri) if self.client.fs.exists(self.uri) else None

  def _check(self, if_generation_match):
    live = self._live()
    if if_generation_match is not None and (live or 0) != if_generation_match:
      raise (NotFound if live is None and if_generation_match else PreconditionFailed)(self.uri)

  def reload(self):
    live = self._live()
    if live is None:
      raise NotFound(self.uri)
    self.generation = live

  def download_as_bytes(self, if_generation_match=None):
    self._check(if_generation_match)
    if self._live() is None:
      raise NotFound(self.uri)
    return self.client.fs.cat(self.uri)

  def upload_from_string(self, data, if_generation_match=None):
    self._check(if_generation_match)
    self.client.fs.pipe(self.uri, bytes(data))
    self.generation = self.client.generations[self.uri] = next(self.client._next)

  def delete(self, if_generation_match=None):
    self._check(if_generation_match)
    if self._live() is None:
      raise NotFound(self.uri)
    self.client.fs.rm(self.uri)
