"""The interleaved sequence: how one clip becomes token slots, and how clips pack into rows.

This module is the contract shared by the data pipeline, the model, the attention
kernel and the sampler (docs/design.md, section 2). Nothing else decides a layout.

Logical order (TV2TV layout), per example::

    prompt · [first frame: clean copy · EOF] · for chunk i: text_i · BOF · noisy_i · clean_i · EOF · … · EOS

T2V drops every text_i. Think2V writes the whole plan after the prompt and first
frame, each item closed by EOF (as EOF closes every chunk), then all chunks::

    prompt · [first frame · EOF] · text_0 · EOF · … · text_{N-1} · EOF · for chunk i: BOF · noisy_i · clean_i · EOF · … · EOS

The EOF after each plan item is the item's boundary: a sampler writing the plan
item by item stops an item when it samples EOF (trained here: the last token of
item i predicts EOF, that EOF predicts the first token of item i + 1, or BOF after
the last item). In every layout text comes before the chunk it plans.

BOF_i carries the plan id of the chunk it opens (i + 1, like text_i), so that a
noisy copy whose plan is dropped for classifier-free guidance sees neither its
plan nor the BOF that closes it (BOF has attended to the plan; `masks`).

The EOF after a given first frame (not in the paper; docs/design.md, section 2) closes it as EOF
closes every generated chunk. Without it no trained text slot would predict the
first token of text_0 while seeing the frame: the prompt's last token is followed
by the frame, so it has no text target, and a clean chunk has no LM head. With it,
EOF's target is text_0's first token (or BOF), and the sampler draws that token
from EOF's logits, as it does after every chunk.

Storage order. A packed row of L = T + (Kn + K)·n slots is stored *grouped by modality*:

    [ T text slots | Kn noisy copies × n tokens | K clean copies × n tokens ]

(K = seq.max_chunks; Kn = seq.num_noisy, K unless seq.noisy_chunks says fewer: a
given first frame is a clean copy with no noisy twin, so rows of such clips need
fewer noisy copies than clean ones.)

so that each tower of the Mixture-of-Transformers works on a static slice of the
residual stream (routing costs no gather or scatter) and the video output head
runs on noisy copies only. The logical interleaved order lives in the `order`
array; the mask (`tv2tv_jax.masks`) reads causality from `order`, never from the
slot index. Several examples share a row, each with its own `segment_ids` value
(1-based; 0 is padding); `positions` and `order` restart per example.

Row arrays (one example of `pack_rows`; a batch adds a leading B axis):

  text_tokens      i32[T]     token id per text slot (pad_id in padding)
  text_targets     i32[T]     next-token target per text slot
  text_target_mask bool[T]    whether a text slot has a target (the next logical
                              slot is text of the same example)
  segment_ids      i32[L]     packed-example id, 1-based, 0 = padding
  modality         i32[L]     PAD, TEXT, NOISY or CLEAN
  chunk_ids        i32[L]     chunk-copy id, unique in the row (noisy and clean
                              copies differ), 0 for text and padding
  positions        i32[L]     RoPE position in its example; a chunk's noisy and
                              clean copies share positions (**default**)
  order            i32[L]     index in its example's logical sequence
  plan_ids         i32[L]     the chunk a plan belongs to: for text, the chunk its
                              text_i plans and the chunk BOF_i opens (0 for the
                              prompt, EOF and EOS); for noisy tokens, their own
                              chunk; 0 elsewhere. The CFG text-drop flag hides
                              matching text (plan and BOF) from a noisy copy.
  latents          f32[K, h, w, c]  the clean latent of clean copy j (slot order)
  noisy_src        i32[Kn]    latent index (into `latents`) that noisy copy j denoises
  noisy_valid      bool[Kn]   noisy copy j holds a chunk
  clean_valid      bool[K]    clean copy j holds a chunk
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np

from tv2tv_jax.config import LAYOUTS, ModelConfig, SequenceConfig

# Modality codes, per slot.
PAD, TEXT, NOISY, CLEAN = 0, 1, 2, 3

SLOT_KEYS = ("segment_ids", "modality", "chunk_ids", "positions", "order", "plan_ids")


class ExampleError(ValueError):
  """An example cannot be laid out; the message names the example and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One clip before layout.

  Attributes:
    prompt: i32[P] meta-prompt tokens (no special tokens).
    chunk_texts: one i32[*] per generated chunk (may be empty), in time order.
    latents: f32[C, h, w, c] every latent frame of the clip. With `first_frame`,
      latents[0] is the given first frame (a clean copy only, never generated) and
      chunk_texts has C - 1 entries; otherwise C.
    first_frame: whether latents[0] is a given first frame.
    name: identifies the example in error messages.
  """
  prompt: np.ndarray
  chunk_texts: Sequence[np.ndarray]
  latents: np.ndarray
  first_frame: bool = True
  name: str = "example"


@dataclasses.dataclass(frozen=True)
class LaidOut:
  """One example laid out in a given layout, before packing (numpy, variable sizes).

  Text arrays are [Nt] in logical order; copy arrays are [Kn] (noisy) / [Kc] (clean).
  `*_order` / `*_pos` of a copy give its first token's order / position; its n tokens
  follow consecutively in order and position.
  """
  name: str
  text_tokens: np.ndarray
  text_targets: np.ndarray
  text_target_mask: np.ndarray
  text_order: np.ndarray
  text_pos: np.ndarray
  text_plan: np.ndarray  # chunk number (1-based, example-local) of text_i and BOF_i, or 0
  noisy_latent: np.ndarray  # latent index of each noisy copy
  noisy_order: np.ndarray
  noisy_pos: np.ndarray
  noisy_plan: np.ndarray  # chunk number of each noisy copy
  clean_latent: np.ndarray
  clean_order: np.ndarray
  clean_pos: np.ndarray
  latents: np.ndarray  # f32[C, h, w, c]
  length: int  # slots in logical order

  @property
  def num_text(self) -> int:
    return len(self.text_tokens)

  @property
  def num_noisy(self) -> int:
    return len(self.noisy_latent)

  @property
  def num_clean(self) -> int:
    return len(self.clean_latent)


class Cursor:
  """Logical order and RoPE position of the next slot: the one rule of both.

  Text takes one order and one position per token. A chunk takes n orders for its
  noisy copy (a generated chunk only; a given first frame has none) and the next n for
  its clean copy, both at the same n positions (the **default**: noisy and clean
  copies share positions). `layout_example` lays an example out with one cursor; the
  cached sampler keeps one per row (arrays of [B]) and asks it where each write goes,
  so the two cannot disagree. Every method takes scalars or [B] arrays; a row whose
  `count` is 0 (or whose `where` is False) writes nothing and does not move.
  """

  def __init__(self, rows: int | None = None):
    shape = () if rows is None else (rows,)
    self.order = np.zeros(shape, np.int64)
    self.pos = np.zeros(shape, np.int64)

  def text(self, count) -> tuple[np.ndarray, np.ndarray]:
    """Claims `count` text slots; returns the first one's (order, position)."""
    at = (self.order.copy(), self.pos.copy())
    self.order = self.order + count
    self.pos = self.pos + count
    return at

  def noisy(self) -> tuple[np.ndarray, np.ndarray]:
    """(order, position) of the next chunk's noisy copy, without claiming it: the
    sampler queries that copy at every flow step before the chunk is written."""
    return self.order.copy(), self.pos.copy()

  def chunk(self, n: int, with_noisy, where=True) -> tuple[np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """Claims a chunk of n tokens per copy (a noisy copy when `with_noisy`); returns
    (noisy copy's first order, clean copy's first order, their first position)."""
    noisy_order, pos = self.order.copy(), self.pos.copy()
    clean_order = noisy_order + np.where(with_noisy, n, 0)
    self.order = np.where(where, clean_order + n, self.order)
    self.pos = np.where(where, self.pos + n, self.pos)
    return noisy_order, clean_order, pos


def text_token_error(tokens, field: str, seq: SequenceConfig, vocab_size: int) -> str | None:
  """What is wrong with text token ids (`field` names them in the message), or None.

  Text must be a 1-D integer array of ids in [0, vocab_size) with no special token.
  Shared by example layout and the sampler's requests.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
    return f"{field} must be a 1-D integer array, got dtype {tokens.dtype} shape {tokens.shape}"
  bad = np.nonzero((tokens < 0) | (tokens >= vocab_size))[0]
  if bad.size:
    return f"{field}[{bad[0]}] = {tokens[bad[0]]} is outside the vocabulary [0, {vocab_size})"
  specials = {seq.pad_id: "pad", seq.bof_id: "BOF", seq.eof_id: "EOF", seq.eos_id: "EOS"}
  for i, tok in enumerate(tokens.tolist()):
    if tok in specials:
      return (f"{field}[{i}] is the special token {specials[tok]} (id {tok}); text may not "
              f"contain special tokens")
  return None


def _check_tokens(tokens, field: str, name: str, seq: SequenceConfig, vocab_size: int):
  problem = text_token_error(tokens, field, seq, vocab_size)
  if problem:
    raise ExampleError(f"{name}: {problem}")
  return np.asarray(tokens).astype(np.int32)


def validate_example(ex: Example, seq: SequenceConfig, model: ModelConfig) -> None:
  """Raises ExampleError naming the example and field for any malformed input."""
  name = ex.name
  lat = np.asarray(ex.latents)
  want = tuple(model.latent_shape)
  if lat.ndim != 4 or tuple(lat.shape[1:]) != want:
    raise ExampleError(f"{name}: latents have shape {lat.shape}, expected (C, {want[0]}, "
                       f"{want[1]}, {want[2]})")
  if lat.shape[0] < 1:
    raise ExampleError(f"{name}: latents hold no frame")
  finite = np.isfinite(lat).reshape(lat.shape[0], -1).all(axis=1)
  if not finite.all():
    raise ExampleError(f"{name}: latents[{int(np.argmin(finite))}] contains NaN or inf")
  generated = lat.shape[0] - int(ex.first_frame)
  if len(ex.chunk_texts) != generated:
    raise ExampleError(f"{name}: chunk_texts has {len(ex.chunk_texts)} entries but there are "
                       f"{generated} generated chunks (latents {lat.shape[0]}, "
                       f"first_frame={ex.first_frame})")
  _check_tokens(ex.prompt, "prompt", name, seq, model.vocab_size)
  for i, text in enumerate(ex.chunk_texts):
    _check_tokens(text, f"chunk_texts[{i}]", name, seq, model.vocab_size)


def layout_example(ex: Example, seq: SequenceConfig, model: ModelConfig,
                   layout: str | None = None) -> LaidOut:
  """Lays out one example in `layout` (default: seq.layout) after validating it.

  Raises:
    ExampleError: bad latents or tokens, or an example too long for one row.
  """
  layout = layout or seq.layout
  if layout not in LAYOUTS:
    raise ExampleError(f"{ex.name}: unknown layout {layout!r}; one of {LAYOUTS}")
  validate_example(ex, seq, model)
  n = model.tokens_per_chunk
  texts = [np.asarray(t, np.int32) for t in ex.chunk_texts]
  prompt = np.asarray(ex.prompt, np.int32)

  text = {"tok": [], "order": [], "pos": [], "plan": []}
  noisy = {"latent": [], "order": [], "pos": [], "plan": []}
  clean = {"latent": [], "order": [], "pos": []}
  cursor = Cursor()

  def add_text(tokens, plan):
    tokens = np.asarray(tokens, np.int32)
    order, pos = cursor.text(len(tokens))
    span = np.arange(len(tokens))
    text["tok"].extend(tokens.tolist())
    text["order"].extend((order + span).tolist())
    text["pos"].extend((pos + span).tolist())
    text["plan"].extend([plan] * len(tokens))

  def add_chunk(latent_idx, chunk_no, with_noisy):
    noisy_order, clean_order, pos = cursor.chunk(n, with_noisy)
    if with_noisy:
      noisy["latent"].append(latent_idx)
      noisy["order"].append(int(noisy_order))
      noisy["pos"].append(int(pos))
      noisy["plan"].append(chunk_no)
    clean["latent"].append(latent_idx)
    clean["order"].append(int(clean_order))
    clean["pos"].append(int(pos))

  add_text(prompt, 0)
  first = int(ex.first_frame)
  if ex.first_frame:
    add_chunk(0, 0, with_noisy=False)
    # EOF closes the given frame as it closes every chunk, so that a text slot that sees
    # the frame predicts the first token of text_0 (else nothing trained would).
    add_text([seq.eof_id], 0)
  chunks = list(range(first, ex.latents.shape[0]))  # latent index per generated chunk
  if layout == "think2v":
    # EOF closes every plan item: the boundary a sampler needs to write the plan item
    # by item (plan id 0, as after every chunk).
    for i, _ in enumerate(chunks):
      add_text(texts[i], i + 1)
      add_text([seq.eof_id], 0)
  for i, latent_idx in enumerate(chunks):
    if layout == "tv2tv":
      add_text(texts[i], i + 1)
    # BOF_i belongs to chunk i's plan: it has read text_i, so a CFG-dropped noisy copy
    # must not see it either (`masks.visible` hides equal plan ids).
    add_text([seq.bof_id], i + 1)
    add_chunk(latent_idx, i + 1, with_noisy=True)
    add_text([seq.eof_id], 0)
  add_text([seq.eos_id], 0)

  tok = np.asarray(text["tok"], np.int32)
  order = np.asarray(text["order"], np.int32)
  # Next-token targets exist only where the next logical slot is text (BOF is
  # followed by a chunk; EOS ends the example).
  has_next = np.zeros(len(tok), bool)
  has_next[:-1] = order[1:] == order[:-1] + 1
  targets = np.zeros(len(tok), np.int32)
  targets[:-1] = np.where(has_next[:-1], tok[1:], seq.pad_id)

  out = LaidOut(
      name=ex.name, text_tokens=tok, text_targets=targets, text_target_mask=has_next,
      text_order=order, text_pos=np.asarray(text["pos"], np.int32),
      text_plan=np.asarray(text["plan"], np.int32),
      noisy_latent=np.asarray(noisy["latent"], np.int32),
      noisy_order=np.asarray(noisy["order"], np.int32),
      noisy_pos=np.asarray(noisy["pos"], np.int32),
      noisy_plan=np.asarray(noisy["plan"], np.int32),
      clean_latent=np.asarray(clean["latent"], np.int32),
      clean_order=np.asarray(clean["order"], np.int32),
      clean_pos=np.asarray(clean["pos"], np.int32),
      latents=np.asarray(ex.latents, np.float32), length=int(cursor.order))
  check_fits(out, seq)
  return out


def check_fits(ex: LaidOut, seq: SequenceConfig) -> None:
  """Raises ExampleError when one example alone overflows a row."""
  if ex.num_text > seq.text_len:
    raise ExampleError(f"{ex.name}: needs {ex.num_text} text slots but seq.text_len is "
                       f"{seq.text_len}")
  if ex.num_clean > seq.max_chunks:
    raise ExampleError(f"{ex.name}: needs {ex.num_clean} clean chunk copies but "
                       f"seq.max_chunks is {seq.max_chunks}")
  if ex.num_noisy > seq.num_noisy:
    raise ExampleError(f"{ex.name}: needs {ex.num_noisy} noisy chunk copies but the row has "
                       f"{seq.num_noisy} (seq.noisy_chunks / seq.max_chunks)")


def empty_row(seq: SequenceConfig, model: ModelConfig) -> dict[str, np.ndarray]:
  """An all-padding row (numpy). Padding slots carry segment 0 and modality PAD."""
  T, K, Kn, n = seq.text_len, seq.max_chunks, seq.num_noisy, model.tokens_per_chunk
  L = T + (Kn + K) * n
  row = {key: np.zeros(L, np.int32) for key in SLOT_KEYS}
  row["text_tokens"] = np.full(T, seq.pad_id, np.int32)
  row["text_targets"] = np.full(T, seq.pad_id, np.int32)
  row["text_target_mask"] = np.zeros(T, bool)
  row["latents"] = np.zeros((K, *model.latent_shape), np.float32)
  row["noisy_src"] = np.zeros(Kn, np.int32)
  row["noisy_valid"] = np.zeros(Kn, bool)
  row["clean_valid"] = np.zeros(K, bool)
  return row


def pack_rows(groups: Sequence[Sequence[LaidOut]], seq: SequenceConfig,
              model: ModelConfig) -> dict[str, np.ndarray]:
  """Packs groups of laid-out examples, one group per row, into a batch.

  Args:
    groups: B groups; each group's examples must fit one row together
      (see `RowPacker`).
  Returns:
    dict of numpy arrays with a leading [B] axis (keys: module docstring).
  """
  rows = [pack_row(group, seq, model) for group in groups]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def pack_row(examples: Sequence[LaidOut], seq: SequenceConfig,
             model: ModelConfig) -> dict[str, np.ndarray]:
  """Packs examples into one row (numpy arrays of the module docstring, no batch axis)."""
  T, K, Kn, n = seq.text_len, seq.max_chunks, seq.num_noisy, model.tokens_per_chunk
  row = empty_row(seq, model)
  t0 = kn = kc = 0  # next free text slot, noisy copy, clean copy
  ar = np.arange(n, dtype=np.int32)
  for seg, ex in enumerate(examples, start=1):
    check_fits(ex, seq)
    if t0 + ex.num_text > T or kn + ex.num_noisy > Kn or kc + ex.num_clean > K:
      raise ExampleError(f"{ex.name}: does not fit in the row after {seg - 1} examples "
                         f"(text {t0}+{ex.num_text}/{T}, noisy {kn}+{ex.num_noisy}/{Kn}, "
                         f"clean {kc}+{ex.num_clean}/{K})")
    sl = slice(t0, t0 + ex.num_text)
    row["text_tokens"][sl] = ex.text_tokens
    row["text_targets"][sl] = ex.text_targets
    row["text_target_mask"][sl] = ex.text_target_mask
    row["segment_ids"][sl] = seg
    row["modality"][sl] = TEXT
    row["positions"][sl] = ex.text_pos
    row["order"][sl] = ex.text_order
    # Plan ids become row-unique: chunk number i of this example -> kn + i.
    row["plan_ids"][sl] = np.where(ex.text_plan > 0, ex.text_plan + kn, 0)

    # Clean copies first: noisy copies refer to their latent by clean-slot index.
    latent_slot = {}
    for j in range(ex.num_clean):
      slot = kc + j
      latent_slot[int(ex.clean_latent[j])] = slot
      row["latents"][slot] = ex.latents[ex.clean_latent[j]]
      row["clean_valid"][slot] = True
      s = slice(T + Kn * n + slot * n, T + Kn * n + (slot + 1) * n)
      row["segment_ids"][s] = seg
      row["modality"][s] = CLEAN
      row["chunk_ids"][s] = Kn + slot + 1
      row["positions"][s] = ex.clean_pos[j] + ar
      row["order"][s] = ex.clean_order[j] + ar
    for j in range(ex.num_noisy):
      slot = kn + j
      row["noisy_src"][slot] = latent_slot[int(ex.noisy_latent[j])]
      row["noisy_valid"][slot] = True
      s = slice(T + slot * n, T + (slot + 1) * n)
      row["segment_ids"][s] = seg
      row["modality"][s] = NOISY
      row["chunk_ids"][s] = slot + 1
      row["positions"][s] = ex.noisy_pos[j] + ar
      row["order"][s] = ex.noisy_order[j] + ar
      row["plan_ids"][s] = ex.noisy_plan[j] + kn
    t0, kn, kc = t0 + ex.num_text, kn + ex.num_noisy, kc + ex.num_clean
  return row


class RowPacker:
  """First-fit packing of a stream of laid-out examples into rows.

  Keeps up to `max_open` partly filled rows; an example goes into the first row
  with room in all three regions, else opens a row (emitting the fullest one when
  `max_open` rows are already open). Deterministic: the same stream gives the
  same rows.
  """

  def __init__(self, seq: SequenceConfig, model: ModelConfig, max_open: int = 4):
    self.seq, self.model, self.max_open = seq, model, max_open
    self._open: list[list[LaidOut]] = []

  def _used(self, group):
    return (sum(e.num_text for e in group), sum(e.num_noisy for e in group),
            sum(e.num_clean for e in group))

  def _fits(self, group, ex):
    t, kn, kc = self._used(group)
    s = self.seq
    return (t + ex.num_text <= s.text_len and kn + ex.num_noisy <= s.num_noisy
            and kc + ex.num_clean <= s.max_chunks)

  def add(self, ex: LaidOut) -> list[list[LaidOut]]:
    """Adds one example; returns the groups (rows) that became complete."""
    check_fits(ex, self.seq)
    for group in self._open:
      if self._fits(group, ex):
        group.append(ex)
        return []
    done = []
    if len(self._open) >= self.max_open:
      fullest = max(range(len(self._open)), key=lambda i: sum(self._used(self._open[i])))
      done.append(self._open.pop(fullest))
    self._open.append([ex])
    return done

  def flush(self) -> list[list[LaidOut]]:
    """Returns every open group and empties the packer."""
    done, self._open = self._open, []
    return done


def pack_stream(examples: Iterable[LaidOut], seq: SequenceConfig, model: ModelConfig,
                max_open: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Yields packed rows (numpy, no batch axis) from a stream of laid-out examples."""
  packer = RowPacker(seq, model, max_open)
  for ex in examples:
    for group in packer.add(ex):
      yield pack_row(group, seq, model)
  for group in packer.flush():
    yield pack_row(group, seq, model)


def packing_efficiency(segment_ids: np.ndarray) -> float:
  """Share of non-padding slots in a row or batch (segment_ids: i32[..., L])."""
  return float(np.mean(np.asarray(segment_ids) > 0))
