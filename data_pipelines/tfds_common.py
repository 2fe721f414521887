"""What the TFDS builders share: ArrayRecord output without TensorFlow, and the
bad-record policy (report each by name, skip it, count it, never silently).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging

import tensorflow_datasets as tfds
from etils import epath

# Every reason a record can be skipped for, in both builders that read files.
BAD_RECORD_KINDS = ("unreadable", "no_frames", "too_short", "missing_key", "wrong_shape",
                    "caption_time", "bad_entry")
MAX_STORED_REPORTS = 1000  # per split in metadata; the count is always complete


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the project's builders: ArrayRecord files (random access for Grain, readable
  with `tfds.data_source` and no TensorFlow), and a `code_path` TFDS can resolve."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS derives this from the package via `importlib_resources`, which it does not
    # declare as a dependency (ModuleNotFoundError here); the module file is the answer.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, file_format: str | None = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    self.bad_records = BadRecords(self.name)


@dataclasses.dataclass(frozen=True)
class BadRecordReport:
  """One skipped record: `name` (file, or file/frames range, or video), `kind` in
  BAD_RECORD_KINDS, `reason` (what exactly was wrong)."""
  split: str
  name: str
  kind: str
  reason: str


class BadRecords:
  """Collects BadRecordReports during generation; each is logged when added.

  Shared by the CS:GO and captioned-video builders. `to_metadata()` is what the builders
  store under metadata["bad_records"][split].
  """

  def __init__(self, dataset: str):
    self.dataset = dataset
    self.reports: list[BadRecordReport] = []

  def add(self, split: str, name: str, kind: str, reason: str) -> None:
    if kind not in BAD_RECORD_KINDS:
      raise ValueError(f"unknown bad-record kind {kind!r}; one of {BAD_RECORD_KINDS}")
    self.reports.append(BadRecordReport(split, name, kind, reason))
    logging.warning("%s: skipping bad record %s [%s]: %s", self.dataset, name, kind, reason)

  def for_split(self, split: str) -> list[BadRecordReport]:
    return [r for r in self.reports if r.split == split]

  def to_metadata(self, split: str) -> dict:
    reports = self.for_split(split)
    return {
        "count": len(reports),
        "by_kind": dict(collections.Counter(r.kind for r in reports)),
        "records": [{"name": r.name, "kind": r.kind, "reason": r.reason}
                    for r in reports[:MAX_STORED_REPORTS]],
    }
