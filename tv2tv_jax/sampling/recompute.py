"""The recompute oracle: a sampler backend that reruns the training forward from scratch.

At every query it lays out what has been generated so far with
`sequence.layout_example`, packs it with `sequence.pack_row` into a row of fixed
size, and runs `TV2TV.__call__` (the training forward, under the mask of
`masks.visible`) on the whole row. Nothing is cached. It is the reference the
cached sampler is tested against (same tokens, same latents) and the baseline of
the latency benchmark.

Reading outputs from the row:
  logits    the text slot whose logical order is that of the last written text
            token (anything laid out after it, e.g. the EOS, a placeholder
            chunk or the EOF closing a partly written think2v plan item, all of
            which the layout adds, cannot reach it: the mask is causal);
  velocity  the noisy copy of the chunk being generated, holding the current x_t
            at time t; for CFG a second row with that copy's `cfg_drop` set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import masks, sequence
from tv2tv_jax.config import Experiment
from tv2tv_jax.sampling import sampler


# The training forward, jitted once per (hashable) model and row size.
_APPLY = jax.jit(lambda model, p, kw: model.apply({"params": p}, **kw), static_argnums=0)


class RecomputeBackend:
  """Backend (see `sampler`) that recomputes the whole sequence for every output.

  text_len / max_chunks size the row (defaults: the experiment's); they only need
  to hold the generation, and are fixed so that the forward compiles once.
  """

  def __init__(self, model, params, exp: Experiment, layout: str = "tv2tv",
               text_len: int | None = None, max_chunks: int | None = None):
    self.model, self.params, self.exp, self.layout = model, params, exp, layout
    self.seq = dataclasses.replace(exp.seq, text_len=text_len or exp.seq.text_len,
                                   max_chunks=max_chunks or exp.seq.max_chunks)
    self.n = exp.model.tokens_per_chunk
    self.prompt = None
    self.first_frame = None
    self.texts: list[list[int]] = []  # text of chunk i (opened by its text or its BOF)
    self.latents: list[np.ndarray] = []  # generated chunks so far
    self.items = 0  # think2v: plan items closed by their EOF
    self.after_clean = False  # the last write was a clean chunk (the next EOF closes it)
    self.cursor = sequence.Cursor()
    self.last_text_order = -1
    self._apply = lambda p, kw: _APPLY(model, p, kw)

  def _open(self, chunk_no: int):
    while len(self.texts) < chunk_no:
      self.texts.append([])

  def append_text(self, tokens, plan: int) -> None:
    """Records tokens i32[N] written with `plan` (text_i and BOF_i: i + 1; else 0).

    What a token is follows from the token and its context, as in the layout, which
    alone assigns plan ids in the recomputed row: BOF opens the next chunk; in
    think2v an EOF that does not follow a clean chunk closes the next plan item.
    """
    tokens = [int(t) for t in np.asarray(tokens)]
    seq = self.exp.seq
    if self.prompt is None:
      self.prompt = np.asarray(tokens, np.int32)
    elif tokens == [seq.bof_id]:
      self._open(len(self.latents) + 1)  # BOF opens the next chunk (t2v: empty text)
    elif tokens == [seq.eof_id] and self.layout == "think2v" and not self.after_clean:
      self.items += 1
      self._open(self.items)  # an empty item is still an item
    elif plan > 0:
      self._open(plan)
      self.texts[plan - 1].extend(tokens)
    self.after_clean = False
    self.cursor.text(len(tokens))
    self.last_text_order = int(self.cursor.order) - 1

  def append_chunk(self, latent, chunk) -> None:
    latent = np.asarray(latent, np.float32)
    self.after_clean = True
    self.cursor.chunk(self.n, with_noisy=chunk is not None)
    if chunk is None:
      self.first_frame = latent
    else:
      self.latents.append(latent)

  def _row(self, pending: np.ndarray | None):
    """Lays out prompt, first frame, finished chunks and (if open) the pending chunk."""
    lat = list(self.latents)
    if len(self.texts) == len(lat) and not lat and self.first_frame is None:
      # A prompt alone is not a valid example (it needs a frame): lay out an empty
      # placeholder chunk after it, which the causal mask hides from the prompt.
      self._open(1)
    if len(self.texts) > len(lat):
      # The chunk being generated, then (think2v: texts of later chunks come first)
      # placeholders for chunks whose text is written; all of them lie after every
      # query in logical order, except the pending chunk's own noisy copy.
      lat.append(np.zeros(self.exp.model.latent_shape, np.float32) if pending is None
                 else np.asarray(pending, np.float32))
      lat += [np.zeros(self.exp.model.latent_shape, np.float32)] * (len(self.texts) - len(lat))
    ff = self.first_frame is not None
    all_lat = ([self.first_frame] if ff else []) + lat
    shape = (0, *self.exp.model.latent_shape)
    ex = sequence.Example(prompt=self.prompt,
                          chunk_texts=[np.asarray(t, np.int32) for t in self.texts[:len(lat)]],
                          latents=np.stack(all_lat) if all_lat else np.zeros(shape, np.float32),
                          first_frame=ff, name="recompute")
    laid = sequence.layout_example(ex, self.seq, self.exp.model, self.layout)
    return sequence.pack_row([laid], self.seq, self.exp.model)

  def _inputs(self, row, noisy_copy: int | None, x, t, drops):
    """TV2TV.__call__ kwargs for len(drops) copies of the row (cfg_drop per copy)."""
    b = len(drops)
    batch = {k: np.broadcast_to(v, (b, *v.shape)) for k, v in row.items()}
    latents = row["latents"]
    noisy = latents[row["noisy_src"]].copy()
    noisy_t = np.ones(len(noisy), np.float32)
    if noisy_copy is not None:
      noisy[noisy_copy] = np.asarray(x, np.float32)
      noisy_t[noisy_copy] = t
    t_len, k = self.seq.text_len, self.seq.max_chunks
    drop = np.zeros((b, t_len + (self.seq.num_noisy + k) * self.n), bool)
    for r, d in enumerate(drops):
      if d:
        s = t_len + noisy_copy * self.n
        drop[r, s:s + self.n] = True
    meta = masks.SeqMeta.from_batch({key: jnp.asarray(batch[key]) for key in sequence.SLOT_KEYS},
                                    cfg_drop=drop)
    rep = lambda a: jnp.asarray(np.broadcast_to(a, (b, *a.shape)))
    return dict(text_tokens=rep(row["text_tokens"]), noisy_latents=rep(noisy),
                noisy_t=rep(noisy_t), clean_latents=rep(latents),
                clean_t=rep(np.ones(k, np.float32)), meta=meta)

  def logits(self) -> jax.Array:
    row = self._row(None)
    slots = np.nonzero((row["modality"][:self.seq.text_len] == sequence.TEXT)
                       & (row["order"][:self.seq.text_len] == self.last_text_order))[0]
    if len(slots) != 1:
      raise AssertionError(f"no unique text slot at order {self.last_text_order}")
    logits, _ = self._apply(self.params, self._inputs(row, None, None, None, (False,)))
    return logits[0, int(slots[0])]

  def velocities(self, x, t: float, chunk: int, reps: int) -> jax.Array:
    row = self._row(x)
    # Noisy copies are packed in chunk order, so generated chunk i is noisy copy i.
    if not row["noisy_valid"][chunk]:
      raise AssertionError(f"chunk {chunk} has no noisy copy in the recomputed row")
    _, vel = self._apply(self.params, self._inputs(row, chunk, x, t, (False, True)[:reps]))
    return vel[:, chunk]


def oracle(model, params, exp: Experiment, layout: str = "tv2tv", batch: int = 1, **kw):
  """A batched backend of `batch` independent RecomputeBackend rows (kw: their sizes)."""
  return sampler.RowwiseBackend([RecomputeBackend(model, params, exp, layout, **kw)
                         for _ in range(batch)])
