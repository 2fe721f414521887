"""What the TFDS builders share: ArrayRecord output without TensorFlow, the bad-record
policy (report each by name, skip it, count it, never silently), and building from source
files either in this process or on Apache Beam workers (`SourceBuilder`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
import os
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds
from etils import epath

# Every reason a record can be skipped for, in both builders that read files.
BAD_RECORD_KINDS = ("unreadable", "truncated", "no_frames", "too_short", "missing_key",
                    "wrong_shape", "caption_time", "bad_entry")
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


@contextlib.contextmanager
def source_file(path: epath.PathLike):
  """What h5py and PyAV open: a local path as a string (their C code reads it directly),
  a remote one (gs://, what Dataflow workers read) as a binary file object, which both
  libraries also accept."""
  path = epath.Path(path)
  if "://" not in os.fspath(path):
    yield os.fspath(path)
  else:
    with path.open("rb") as f:
      yield f


# --------------------------------------------------------------------------- building

# (item, bad, split, stats) -> (key, example) pairs of one work item (a file, a video). It
# reports what it skips into `bad` and adds counts to `stats`; for Beam it must pickle, so it
# is a module-level function (or a functools.partial of one), never a bound method.
ItemFn = Callable[[Any, BadRecords, str, collections.Counter], Iterator[tuple[str, dict]]]

# In a Beam build, example j of work item i gets the integer key i << KEY_BITS | j: TFDS's
# BeamWriter sorts by key when shuffling is disabled, so this stores the examples in the
# same order as the one-process build (item order, then order within the item).
KEY_BITS = 32
_SUMMARY_TAG = "summary"


class SourceBuilder(ArrayRecordBuilder, skip_registration=True):
  """A builder that turns source files into examples, one work item at a time.

  Subclasses give `_split_items` (split -> list of picklable work items, in storage order)
  and `_item_fn` (an ItemFn). The build then runs either

  - in this process (the default): items in order, bad records into `self.bad_records`; or
  - on Apache Beam, when `download_and_prepare` gets a DownloadConfig with `beam_runner`
    or `beam_options` (the `beam` extra): items are spread over workers (`beam.Reshuffle`),
    each worker reports its items' bad records and stats in a summary, and the summaries
    are gathered into the same metadata as the one-process build.

  Both give the same examples in the same order and the same metadata (tested). A split whose
  every record is bad stops the build with a ValueError listing them, in both modes.
  `SPLIT_STATS` names per-split counters an ItemFn may add to (stored as metadata[name][split]).
  """

  SPLIT_STATS: tuple[str, ...] = ()
  _use_beam = False  # set by _download_and_prepare from the DownloadConfig

  def _split_items(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list]:
    raise NotImplementedError

  def _item_fn(self, dl_manager: tfds.download.DownloadManager) -> ItemFn:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    fn = self._item_fn(dl_manager)
    # A split without items is omitted (TFDS cannot write an empty split).
    return {split: self._generate_examples(split, items, fn)
            for split, items in self._split_items(dl_manager).items() if items}

  def _generate_examples(self, split: str, items: list, fn: ItemFn):
    """A generator of (key, example), or a Beam PTransform of (int key, example) pairs."""
    if self._use_beam:
      # Inside download_and_prepare, data_dir is TFDS's temporary folder of this build.
      path = epath.Path(self.data_dir) / f"{split}.item_summaries.json"
      return _beam_examples(items, fn, split, self.name, str(path))
    return self._generate_locally(split, items, fn)

  def _generate_locally(self, split: str, items: list, fn: ItemFn
                        ) -> Iterator[tuple[str, dict]]:
    stats, count = collections.Counter(), 0
    for item in items:
      for key, example in fn(item, self.bad_records, split, stats):
        count += 1
        yield key, example
    if not count:  # TFDS would only say "No examples were yielded"
      raise ValueError(all_bad_message(split, self.bad_records.to_metadata(split)))
    # Runs once the split is fully written, before TFDS saves metadata.json.
    self._store_split_metadata(split, stats)

  def _store_split_metadata(self, split: str, stats: collections.Counter) -> None:
    self.info.metadata["bad_records"][split] = self.bad_records.to_metadata(split)
    for name in self.SPLIT_STATS:
      self.info.metadata[name][split] = int(stats.get(name, 0))

  def _download_and_prepare(self, dl_manager, download_config):
    self._use_beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
    super()._download_and_prepare(dl_manager, download_config)
    if self._use_beam:  # the pipeline has finished: gather what its workers reported
      for path in sorted(epath.Path(self.data_dir).glob("*.item_summaries.json")):
        split = path.name.split(".")[0]
        stats = collections.Counter()
        for summary in json.loads(path.read_text()):
          for r in summary["bad"]:
            self.bad_records.reports.append(BadRecordReport(split, **r))
          stats.update(summary["stats"])
        self._store_split_metadata(split, stats)
        path.unlink()  # not part of the dataset


def all_bad_message(split: str, metadata: dict) -> str:
  return f"split {split!r}: every record was bad: {metadata['records']}"


def _run_item(indexed_item: tuple[int, Any], item_fn: ItemFn, split: str, dataset: str):
  """Beam worker: one item's examples under int keys, then its summary (tagged output)."""
  import apache_beam as beam  # the optional `beam` extra

  index, item = indexed_item
  bad, stats, count = BadRecords(dataset), collections.Counter(), 0
  for _, example in item_fn(item, bad, split, stats):
    if count >> KEY_BITS:
      raise ValueError(f"work item {index} of split {split!r} yields over 2**{KEY_BITS} examples")
    yield (index << KEY_BITS) | count, example
    count += 1
  yield beam.pvalue.TaggedOutput(_SUMMARY_TAG, {
      "index": index, "examples": count, "stats": dict(stats),
      "bad": [{"name": r.name, "kind": r.kind, "reason": r.reason} for r in bad.reports]})


def _write_summaries(summaries: list[dict], path: str, split: str, dataset: str) -> str:
  """Beam: stores every item's summary, in item order, for the driver; raises the
  every-record-was-bad error (before TFDS's writer sees an empty split)."""
  summaries = sorted(summaries, key=lambda s: s["index"])
  if not sum(s["examples"] for s in summaries):
    bad = BadRecords(dataset)
    for s in summaries:
      for r in s["bad"]:
        bad.reports.append(BadRecordReport(split, **r))
    raise ValueError(all_bad_message(split, bad.to_metadata(split)))
  epath.Path(path).write_text(json.dumps(summaries))
  return path


def _first(x, _):
  return x


def _beam_examples(items: list, fn: ItemFn, split: str, dataset: str, summary_path: str):
  """The Beam PTransform of one split: (int key, example) pairs (see `_run_item`)."""
  import apache_beam as beam  # the optional `beam` extra

  @beam.ptransform_fn
  def build(pipeline):
    out = (pipeline
           | "Items" >> beam.Create(list(enumerate(items)))
           | "Spread" >> beam.Reshuffle()  # else a runner may fuse all items onto one worker
           | "Examples" >> beam.FlatMap(_run_item, item_fn=fn, split=split, dataset=dataset)
           .with_outputs(_SUMMARY_TAG, main="examples"))
    written = (out[_SUMMARY_TAG]
               | "Summaries" >> beam.combiners.ToList()
               | "WriteSummaries" >> beam.Map(_write_summaries, path=summary_path, split=split,
                                              dataset=dataset))
    # The side input makes every example wait for the summaries, so an all-bad split fails
    # with the named error above rather than TFDS's "number of generated examples is 0".
    return out.examples | "AfterSummaries" >> beam.Map(_first, beam.pvalue.AsSingleton(written))

  return build()  # pylint: disable=no-value-for-parameter


# --------------------------------------------------------------------------- command line

def beam_download_config(manual_dir: str, pipeline_options: str | None
                         ) -> tfds.download.DownloadConfig:
  """DownloadConfig for `manual_dir`; with Beam if `pipeline_options` is given.

  pipeline_options: comma-separated Beam flags without "--", as for `tfds build`, e.g.
    "runner=DirectRunner,direct_num_workers=0,direct_running_mode=multi_processing" or
    "runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp" (docs/data.md).
  """
  if not pipeline_options:
    return tfds.download.DownloadConfig(manual_dir=manual_dir)
  import apache_beam as beam  # the optional `beam` extra
  flags = [f"--{f.strip()}" for f in pipeline_options.split(",") if f.strip()]
  return tfds.download.DownloadConfig(
      manual_dir=manual_dir, beam_options=beam.options.pipeline_options.PipelineOptions(flags))


def build_main(builder_cls: type[SourceBuilder], argv=None,
               manual_help: str = "folder holding the source files") -> SourceBuilder:
  """The command line of a SourceBuilder: --config, --manual_dir, --data_dir and
  --beam_pipeline_options (docs/data.md, "Building at scale")."""
  parser = argparse.ArgumentParser(description=f"Build the {builder_cls.name} TFDS dataset "
                                   "(ArrayRecord), in this process or with Apache Beam.")
  parser.add_argument("--config", default=builder_cls.DEFAULT_CONFIG_NAME,
                      help=f"one of {[c.name for c in builder_cls.BUILDER_CONFIGS]}")
  parser.add_argument("--manual_dir", required=True, help=manual_help)
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--beam_pipeline_options", default=None,
                      help="build with Apache Beam: comma-separated pipeline flags without "
                      "'--' (needs the beam extra), e.g. runner=DirectRunner")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  builder = builder_cls(config=args.config, data_dir=args.data_dir)
  builder.download_and_prepare(
      download_config=beam_download_config(args.manual_dir, args.beam_pipeline_options))
  print(builder.info.splits)
  print({s: v["count"] for s, v in builder.info.metadata["bad_records"].items()},
        "bad records (see metadata.json)")
  return builder
