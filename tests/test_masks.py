"""The mask follows docs/design.md's rule (section 2) for every pair, over hypothesis-drawn layouts.

The expectation here is written per query kind, from the logical sequence, and
does not call `masks.visible`.
"""

import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from tv2tv_jax import masks, synthetic
from tv2tv_jax.attention import reference
from tv2tv_jax.config import ModelConfig, SequenceConfig
from tv2tv_jax.sequence import CLEAN, NOISY, TEXT


def _expected(row, drop):
  """bool[L, L] from the per-kind reading of the rule."""
  seg, mod, chunk, order, plan = (row[k] for k in ("segment_ids", "modality", "chunk_ids",
                                                   "order", "plan_ids"))
  L = len(seg)
  out = np.zeros((L, L), bool)
  for q in range(L):
    if seg[q] == 0:
      out[q, q] = True  # padding sees itself only
      continue
    for k in range(L):
      if seg[k] != seg[q]:
        continue
      before = order[k] <= order[q] and mod[k] != NOISY
      own_copy = chunk[q] != 0 and chunk[k] == chunk[q]
      if mod[q] == TEXT:
        out[q, k] = before
      elif mod[q] == CLEAN:
        out[q, k] = before or own_copy
      else:  # noisy: earlier text (unless its plan is dropped), earlier clean chunks, itself
        plan_hidden = drop[q] and mod[k] == TEXT and plan[k] == plan[q]
        out[q, k] = own_copy or (before and not plan_hidden)
  return out


@st.composite
def _layouts(draw):
  model = ModelConfig(vocab_size=64, latent_shape=(2 * draw(st.integers(1, 2)), 2, 2),
                      patch_size=2, unet_channels=8, unet_groups=4)
  seq = SequenceConfig(layout=draw(st.sampled_from(["tv2tv", "t2v", "think2v"])),
                       text_len=draw(st.integers(12, 28)), max_chunks=draw(st.integers(2, 5)))
  batch = synthetic.random_batch(draw(st.integers(0, 10_000)), seq, model, 1,
                                 max_examples_per_row=draw(st.integers(1, 3)),
                                 max_text_len=draw(st.integers(0, 3)))
  row = {k: v[0] for k, v in batch.items()}
  drop = np.zeros(len(row["segment_ids"]), bool)
  drop_chunks = draw(st.lists(st.integers(1, seq.max_chunks), max_size=3))
  for c in drop_chunks:
    drop |= (row["modality"] == NOISY) & (row["plan_ids"] == c)
  return row, drop


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(_layouts())
def test_mask_matches_rule_for_every_pair(layout):
  row, drop = layout
  meta = masks.SeqMeta.from_batch({k: v[None] for k, v in row.items()}, cfg_drop=drop[None])
  got = np.asarray(masks.dense_mask(meta))[0]
  np.testing.assert_array_equal(got, _expected(row, drop))

  seg, mod, chunk, order = row["segment_ids"], row["modality"], row["chunk_ids"], row["order"]
  real = seg > 0
  # Nothing crosses examples.
  assert not (got & (seg[:, None] != seg[None, :]) & real[:, None]).any()
  # No noisy key is visible to any token outside its own copy.
  outside = chunk[:, None] != chunk[None, :]
  assert not (got & outside & (mod[None, :] == NOISY)).any()
  # A clean copy never sees its noisy twin (same order span shifted by n, same example).
  n = int((chunk == chunk[mod == CLEAN][0]).sum()) if (mod == CLEAN).any() else 0
  for q in np.nonzero(mod == CLEAN)[0]:
    twin = (mod == NOISY) & (seg == seg[q]) & (order + n == order[q])
    assert not got[q, twin].any()
  # A dropped noisy copy never sees the BOF that opens it (BOF has read the dropped plan).
  for q in np.nonzero(drop & (mod == NOISY))[0]:
    first = order[(chunk == chunk[q])].min()
    bof = (mod == TEXT) & (seg == seg[q]) & (order == first - 1)
    assert bof.sum() == 1 and not got[q, bof].any()
  # Text is causal: a text query sees no later slot.
  later = order[None, :] > order[:, None]
  assert not (got & later & (mod[:, None] == TEXT)).any()
  # Padding slots: only themselves; nothing real sees them.
  assert (got[~real] == np.eye(len(seg), dtype=bool)[~real]).all()
  assert not got[real][:, ~real].any()


def test_cfg_drop_hides_the_plan_and_its_bof_only():
  """A dropped noisy copy of chunk i sees neither text_i nor the BOF that closes it (BOF
  has read text_i); nothing else changes, for it or for any other query."""
  model = ModelConfig(vocab_size=64, latent_shape=(2, 2, 2), patch_size=2, unet_channels=8,
                      unet_groups=4)
  seq = SequenceConfig(text_len=24, max_chunks=3)
  from tv2tv_jax import sequence
  rng = np.random.default_rng(0)
  ex = synthetic.random_example(rng, seq, model, num_chunks=2, first_frame=False)
  ex = dataclasses.replace(ex, prompt=np.array([10, 11]),
                           chunk_texts=[np.array([20, 21]), np.array([30])])
  row = sequence.pack_row([sequence.layout_example(ex, seq, model)], seq, model)
  # 10 11 · 20 21 · BOF · noisy_1 · clean_1 · EOF · 30 · BOF · noisy_2 · clean_2 · EOF · EOS
  second = (row["modality"] == NOISY) & (row["plan_ids"] == 2)
  meta = lambda drop: masks.SeqMeta.from_batch({k: v[None] for k, v in row.items()},
                                               cfg_drop=drop[None])
  with_plan = np.asarray(masks.dense_mask(meta(np.zeros_like(second))))[0]
  without = np.asarray(masks.dense_mask(meta(second)))[0]
  # What was written since chunk 1 ended (after its EOF), up to chunk 2's noisy copy.
  tokens = np.concatenate([row["text_tokens"], np.zeros(len(second) - seq.text_len, int)])
  text = (row["modality"] == TEXT) & (row["segment_ids"] == 1)
  eof_1 = row["order"][text & (tokens == seq.eof_id)].min()
  start = row["order"][second].min()
  plan2 = text & (row["order"] > eof_1) & (row["order"] < start)
  assert tokens[plan2].tolist() == [30, seq.bof_id]
  for q in np.nonzero(second)[0]:
    assert with_plan[q, plan2].all() and not without[q, plan2].any()
    # The prompt, chunk 1's plan and BOF, its clean copy and EOF stay visible.
    np.testing.assert_array_equal(with_plan[q] & ~plan2, without[q])
  # Other queries are unaffected.
  np.testing.assert_array_equal(with_plan[~second], without[~second])


def test_padding_rows_produce_no_nan():
  model = ModelConfig(vocab_size=64, latent_shape=(2, 2, 2), patch_size=2, unet_channels=8,
                      unet_groups=4)
  seq = SequenceConfig(text_len=16, max_chunks=3)
  batch = synthetic.random_batch(3, seq, model, 2, max_examples_per_row=1)
  assert (batch["segment_ids"] == 0).any()
  meta = masks.SeqMeta.from_batch(batch)
  L = batch["segment_ids"].shape[1]
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, L, h, 8)), jnp.float32) for h in (4, 2, 2))
  out = np.asarray(reference.reference_attention(q, k, v, meta))
  assert np.isfinite(out).all()
  # A hand-built row with no visible key gives zeros, not NaN.
  empty = jnp.zeros((2, L, L), bool)
  assert (np.asarray(reference.masked_attention(q, k, v, empty)) == 0).all()
