"""The Grain input pipeline: latent dataset -> packed [B, ...] batches the trainer eats.

    source (latent ArrayRecord, this host's shard: records[process_index::process_count])
      -> shuffle(seed), repeat (reshuffled every epoch)            MapDataset
      -> ToExample: tokenise texts, caption knobs, layout          MapDataset (LaidOut | Rejected)
      -> to_iter_dataset -> PackIterDataset (sequence.RowPacker)   rows (numpy, no batch axis)
      -> batch(B / process_count)                                  dict of [B_local, ...] arrays
      -> mp_prefetch(num_workers)                                  optional worker processes

Batches hold exactly the arrays of `tv2tv_jax.sequence` (module docstring there) with a
leading batch axis. Layout and packing are `sequence.layout_example` and
`sequence.RowPacker`; nothing here decides a layout.

Exact resume. Every stage's iterator has a JSON-serialisable `get_state()` (Grain's own
for shuffle/map/batch/mp_prefetch; `PackIterator` below for packing). Packing works in
windows of `window` source examples: a window is packed first-fit and then flushed, so a
row never depends on examples outside its window. The packer's state is therefore just
(parent state at the window start, rows already emitted from the window); restoring
re-reads and re-packs that one window. The price is up to `max_open` part-filled rows per
window (measured in docs/pipeline.md).

With `num_workers` > 0, worker w packs source elements w, w + N, ... (Grain slices the
dataset under `mp_prefetch`) and batches are taken round-robin from the workers, so the
stream depends on the worker count but is deterministic for a fixed count.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Mapping

import grain
import numpy as np

from data_pipelines import latent_dataset
from tv2tv_jax import sequence
from tv2tv_jax import config as config_lib
from tv2tv_jax.config import ConfigError, ModelConfig, SequenceConfig

_DATA = config_lib.DataConfig()  # the `data` section's defaults


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """The `data` section fields this pipeline reads (see experiments/toy_world.py).

  Attributes:
    latent_dir: latent dataset directory (`data_pipelines.latent_dataset`).
    tokenizer_path: tokenizer.json for the chunk texts and the prompt.
    prompt: the meta-prompt text of every example ("" for none).
    shuffle_seed: seed of the per-epoch shuffle of the source.
    num_workers: Grain worker processes (0: in this process).
    caption_every: keep the text of chunk i only when i % caption_every == 0 (1: all).
    wrong_caption_rate: probability that a kept text is replaced by a different text of
      another chunk of the same clip (a "hallucinated" caption); fixed per clip seed.
    plan_drop_rate: probability that a clip's chunk texts are all dropped (fixed per clip
      seed): the plan-free rows a `SamplerConfig.uncond = 'plan_free'` CFG branch is
      conditioned on (`tv2tv_jax.sampling.plan_free`).
    max_open: rows the first-fit packer keeps open.
    window: source examples per packing window (see the module docstring).
  """
  latent_dir: str
  tokenizer_path: str
  # The `data` section's knobs, with its defaults (`config.DataConfig`, their one source).
  prompt: str = _DATA.prompt
  shuffle_seed: int = _DATA.shuffle_seed
  num_workers: int = _DATA.num_workers
  caption_every: int = _DATA.caption_every
  wrong_caption_rate: float = _DATA.wrong_caption_rate
  plan_drop_rate: float = _DATA.plan_drop_rate
  max_open: int = _DATA.max_open
  window: int = _DATA.window

  def __post_init__(self):
    # Checked as the `data` section is (ConfigError naming data.<field>): a pipeline may
    # be built directly, not from an experiment config.
    config_lib.data_config({f: getattr(self, f) for f in PIPELINE_DATA_FIELDS})


# PipelineConfig's fields that come from the `data` section.
PIPELINE_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(PipelineConfig))[2:]


@dataclasses.dataclass(frozen=True)
class Rejected:
  """A bad example's name and reason. Not None: Grain's iterators silently drop None
  elements (its filter marker), which would hide rejects from the packer's count."""
  name: str
  reason: str


class ToExample(grain.transforms.Map):
  """Raw latent-dataset record (bytes) -> `sequence.LaidOut`, or `Rejected` for a bad one.

  Bad examples (ExampleError: wrong latent shape, unknown token, too long for a row) are
  logged by name; `PackIterator` skips and counts them.
  """

  def __init__(self, pcfg: PipelineConfig, seq: SequenceConfig, model: ModelConfig,
               layout: str):
    self.pcfg, self.seq, self.model, self.layout = pcfg, seq, model, layout
    self._tok = None  # loaded lazily in each worker process (see __getstate__)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = None  # the HF tokenizer is rebuilt from the path after pickling
    return state

  def _tokenizer(self):
    if self._tok is None:
      from data_pipelines import tokenizer as tokenizer_lib
      self._tok = tokenizer_lib.load_tokenizer(self.pcfg.tokenizer_path)
    return self._tok

  def texts(self, rec: Mapping[str, Any]) -> list[str]:
    """The chunk texts after the caption-density, corruption and plan-drop knobs."""
    texts = list(rec["texts"])
    p = self.pcfg
    rng = np.random.default_rng([int(rec["seed"]) % 2**63, 0x7E47])
    wrong = rng.random(len(texts)) < p.wrong_caption_rate
    pick = rng.random(len(texts))
    # Drawn after the draws above, so that adding this knob changed no existing stream.
    if rng.random() < p.plan_drop_rate:
      return [""] * len(texts)
    out = []
    for i, text in enumerate(texts):
      # A wrong caption is another *distinct* text of the same clip: plausible words,
      # wrong content (the toy world's sports mode hallucinates the same way).
      others = sorted(set(texts) - {text, ""})
      if i % p.caption_every:
        out.append("")
      elif wrong[i] and text and others:
        out.append(others[int(pick[i] * len(others))])
      else:
        out.append(text)
    return out

  def example(self, raw: bytes) -> sequence.Example:
    """The `sequence.Example` of one raw record (texts tokenised after the caption knobs)."""
    return self._example(latent_dataset.parse_record(raw))

  def _example(self, rec: Mapping[str, Any]) -> sequence.Example:
    tok = self._tokenizer()
    return sequence.Example(
        prompt=tok.encode(self.pcfg.prompt) if self.pcfg.prompt else np.zeros(0, np.int32),
        chunk_texts=[tok.encode(t) if t else np.zeros(0, np.int32) for t in self.texts(rec)],
        latents=rec["latents"], first_frame=True, name=rec["name"])

  def map(self, raw: bytes) -> sequence.LaidOut | Rejected:
    rec = latent_dataset.parse_record(raw)  # an unreadable record is a broken dataset: raise
    try:
      return sequence.layout_example(self._example(rec), self.seq, self.model, self.layout)
    except (sequence.ExampleError, ValueError) as e:  # UnknownCharacterError is a ValueError
      logging.warning("grain pipeline: skipping example %s: %s", rec["name"], e)
      return Rejected(rec["name"], str(e))


class PackIterator(grain.DatasetIterator):
  """Packs windows of laid-out examples into rows with `sequence.RowPacker`.

  Yields rows (dict of numpy arrays, no batch axis). State: {"window_start": parent state
  before the current window, "emitted": rows of the window already returned,
  "skipped": bad examples seen so far}.
  """

  def __init__(self, parent: grain.DatasetIterator, seq: SequenceConfig, model: ModelConfig,
               max_open: int, window: int):
    super().__init__(parent)
    self.seq, self.model, self.max_open, self.window = seq, model, max_open, window
    self._window_start = copy.deepcopy(self._parent.get_state())
    self._groups: list[list[sequence.LaidOut]] = []
    self._emitted = 0
    self.skipped = 0

  def _fill(self) -> None:
    """Reads and packs the next window; raises StopIteration at the end of the source."""
    self._window_start = copy.deepcopy(self._parent.get_state())
    packer = sequence.RowPacker(self.seq, self.model, self.max_open)
    groups, seen, good = [], 0, 0
    for _ in range(self.window):
      try:
        laid = next(self._parent)
      except StopIteration:
        break
      seen += 1
      if isinstance(laid, Rejected):
        self.skipped += 1
        continue
      good += 1
      groups.extend(packer.add(laid))
    groups.extend(packer.flush())
    if seen == 0:
      raise StopIteration
    if good == 0:
      # A whole window of bad examples means a misconfiguration, not bad luck; failing
      # beats spinning forever on a repeated source.
      raise ValueError(f"all {seen} examples of a packing window were rejected (see the "
                       f"warnings naming them); check latent shape, tokenizer and seq sizes")
    self._groups, self._emitted = groups, 0

  def __next__(self) -> dict[str, np.ndarray]:
    while self._emitted >= len(self._groups):
      self._fill()
    group = self._groups[self._emitted]
    self._emitted += 1
    return sequence.pack_row(group, self.seq, self.model)

  def get_state(self) -> dict[str, Any]:
    return {"window_start": copy.deepcopy(self._window_start), "emitted": self._emitted,
            "skipped": self.skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["window_start"]))
    self._groups, self._emitted = [], 0
    emitted = int(state["emitted"])
    if emitted:
      self._fill()
      self._emitted = emitted
    else:
      self._window_start = copy.deepcopy(state["window_start"])
    self.skipped = int(state["skipped"])


class PackIterDataset(grain.IterDataset):
  """IterDataset of packed rows over an IterDataset of `LaidOut | Rejected` (PackIterator)."""

  def __init__(self, parent: grain.IterDataset, seq: SequenceConfig, model: ModelConfig,
               max_open: int = 4, window: int = 64):
    super().__init__(parent)
    self.seq, self.model, self.max_open, self.window = seq, model, max_open, window

  def __iter__(self) -> PackIterator:
    return PackIterator(self._parent.__iter__(), self.seq, self.model, self.max_open,
                        self.window)

  def __str__(self) -> str:
    return f"PackIterDataset(max_open={self.max_open}, window={self.window})"


def check_latent_dir(pcfg: PipelineConfig, model: ModelConfig) -> dict[str, Any]:
  """meta.json of the latent dataset; ConfigError when its latents cannot feed `model`."""
  meta = latent_dataset.load_meta(pcfg.latent_dir)
  if tuple(meta["latent_shape"]) != tuple(model.latent_shape):
    raise ConfigError("model.latent_shape", f"is {tuple(model.latent_shape)} but the latent "
                      f"dataset holds {tuple(meta['latent_shape'])} latents")
  return meta


def make_dataset(pcfg: PipelineConfig, split: str, seq: SequenceConfig, model: ModelConfig,
                 batch_size: int, *, layout: str | None = None, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """The pipeline of the module docstring for one split, as a Grain IterDataset.

  Args:
    batch_size: the global batch B; this process yields B / process_count rows per batch.
    process_index / process_count: this host's shard of the source records.
    shuffle: shuffle the source (per epoch, `pcfg.shuffle_seed`); off for evaluation.
    num_epochs: None repeats forever.
  Returns:
    IterDataset of dicts of numpy arrays [B / process_count, ...] (`sequence` keys).
  """
  if batch_size % process_count:
    raise ConfigError("train.batch_size", f"{batch_size} rows do not split over "
                      f"{process_count} processes")
  check_latent_dir(pcfg, model)
  ds = grain.MapDataset.source(latent_dataset.data_source(pcfg.latent_dir, split))
  ds = ds[process_index::process_count]  # this host's records, disjoint from the others
  if shuffle:
    ds = ds.shuffle(seed=pcfg.shuffle_seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(ToExample(pcfg, seq, model, layout or seq.layout))
  ds = PackIterDataset(ds.to_iter_dataset(), seq, model, pcfg.max_open, pcfg.window)
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if pcfg.num_workers > 0:
    from absl import flags  # grain reads absl flags when it starts workers
    if not flags.FLAGS.is_parsed():  # outside absl.app.run (tests, notebooks, benchmarks)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=pcfg.num_workers))
  return ds


class GrainBatches:
  """The trainer's stream over `make_dataset`: an iterator of this process's rows with
  JSON-serialisable `get_state()` / `set_state()` (the Grain iterator's own state)."""

  def __init__(self, dataset: grain.IterDataset):
    self.dataset = dataset
    self._it = iter(dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
