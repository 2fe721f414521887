"""Block table vs the dense oracle: sound classes, consistent visit lists, exact when aligned."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tv2tv_jax import masks, sequence, synthetic
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.config import LAYOUTS, ModelConfig, SequenceConfig


def draw_meta(seed, layout, max_chunks, latent, max_text, extra_text, examples, drop_p):
  """A packed batch of 2 rows (numpy) and its SeqMeta, with per-chunk CFG drop flags."""
  seq = SequenceConfig(text_len=5 + max_chunks * (max_text + 2) + extra_text,
                       max_chunks=max_chunks)
  model = ModelConfig(latent_shape=(latent, latent, 4), patch_size=2)
  batch = synthetic.random_batch(seed, seq, model, 2, layout=layout,
                                 max_examples_per_row=examples, max_text_len=max_text)
  rng = np.random.default_rng(seed + 1)
  chunk_drop = rng.random(2 * max_chunks + 1) < drop_p  # one flag per chunk copy id
  drop = chunk_drop[batch["chunk_ids"]] & (batch["modality"] == sequence.NOISY)
  return batch, masks.SeqMeta.from_batch(batch, cfg_drop=drop)


layouts = st.fixed_dictionaries(dict(
    seed=st.integers(0, 10_000), layout=st.sampled_from(LAYOUTS),
    max_chunks=st.integers(1, 4), latent=st.sampled_from([4, 8]),
    max_text=st.integers(0, 4), extra_text=st.integers(0, 12), examples=st.integers(1, 3),
    drop_p=st.sampled_from([0.0, 0.4, 1.0])))
blocks = st.sampled_from([1, 4, 8, 16, 32])


ROW = 256  # every drawn row is padded to this length: one compile per block-size pair
_jit_table = jax.jit(bt.block_table, static_argnums=(2, 3))


def _table_and_oracle(meta, bq, bk, length=ROW):
  """The jitted table and the dense mask (numpy, from `masks.visible` itself)."""
  f = bt.pad_fields(meta.fields(), length)
  table = _jit_table(f, f, bq, bk)
  f = masks.SlotFields(*(np.asarray(a) for a in f))
  q = masks.SlotFields(*(a[:, :, None] for a in f))
  k = masks.SlotFields(*(a[:, None, :] for a in f))
  return table, np.asarray(masks.visible(q, k))


def _check_lists(index, cls_at, count, classes):
  index, cls_at, count, classes = map(np.asarray, (index, cls_at, count, classes))
  b, n, m = classes.shape
  for r in range(b):
    for i in range(n):
      want = np.nonzero(classes[r, i] != bt.EMPTY)[0]
      c = count[r, i]
      assert c == len(want)
      np.testing.assert_array_equal(index[r, i, :c], want)
      np.testing.assert_array_equal(cls_at[r, i, :c], classes[r, i, want])
      # Padding entries repeat the last listed block (no new DMA) and are EMPTY.
      np.testing.assert_array_equal(index[r, i, c:], want[-1] if c else 0)
      assert (cls_at[r, i, c:] == bt.EMPTY).all()


@settings(max_examples=30, deadline=None)
@given(layouts, blocks, blocks)
def test_classes_are_sound_against_dense_oracle(case, bq, bk):
  _, meta = draw_meta(**case)
  table, mask = _table_and_oracle(meta, bq, bk)
  got = np.asarray(table.classes)
  ideal = bt.classes_from_mask(mask, bq, bk)
  assert got.shape == ideal.shape
  # No visible pair in an EMPTY block, no hidden pair in a FULL block.
  assert not ((got == bt.EMPTY) & (ideal != bt.EMPTY)).any()
  assert not ((got == bt.FULL) & (ideal != bt.FULL)).any()
  if bq == bk == 1:  # single-slot blocks: the summaries are the slots, so exact
    # (FULL only misses the padding self-edge, which the table keeps PARTIAL)
    np.testing.assert_array_equal(got != bt.EMPTY, ideal != bt.EMPTY)


@settings(max_examples=15, deadline=None)
@given(layouts, blocks, blocks)
def test_visit_lists_match_classes(case, bq, bk):
  _, meta = draw_meta(**case)
  table, _ = _table_and_oracle(meta, bq, bk)
  _check_lists(table.kv_index, table.kv_class, table.kv_count, table.classes)
  _check_lists(table.q_index, table.q_class, table.q_count, jnp.swapaxes(table.classes, 1, 2))


def test_chunk_aligned_blocks_are_exact():
  # One TV2TV example per row, blocks of one chunk (n = 16) and a text region of whole
  # blocks: every block lies in one segment and one region, so the summaries are exact.
  seq = SequenceConfig(text_len=48, max_chunks=4)
  model = ModelConfig(latent_shape=(8, 8, 4), patch_size=2)
  batch = synthetic.random_batch(3, seq, model, 3, max_examples_per_row=1, max_text_len=3)
  drop = (batch["modality"] == sequence.NOISY) & (batch["chunk_ids"] % 2 == 1)
  meta = masks.SeqMeta.from_batch(batch, cfg_drop=drop)
  table, mask = _table_and_oracle(meta, 16, 16, length=16)
  ideal = bt.classes_from_mask(mask, 16, 16)
  got = np.asarray(table.classes)
  video = slice(3, None)  # blocks after the 3 text blocks
  np.testing.assert_array_equal(got[:, video, video], ideal[:, video, video])
  # Across regions only the non-empty test can lose precision; it does not here.
  np.testing.assert_array_equal(got != bt.EMPTY, ideal != bt.EMPTY)
  assert (got == bt.FULL).sum() > 0


def test_padding_row_and_cross_fields():
  # An all-padding row: every slot sees only itself, so only diagonal blocks are non-empty.
  seg = jnp.zeros((1, 32), jnp.int32)
  f = masks.SlotFields(seg, seg, seg, seg, seg, seg.astype(bool),
                       jnp.arange(32, dtype=jnp.int32)[None])
  cls = np.asarray(bt.block_table(f, f, 8, 8).classes[0])
  np.testing.assert_array_equal(cls != bt.EMPTY, np.eye(4, dtype=bool))
  assert (cls != bt.FULL).all()
  # Queries of a segment that no key has: all EMPTY, zero visits.
  q = f._replace(segment=jnp.full((1, 32), 2, jnp.int32), modality=seg + sequence.TEXT)
  k = f._replace(segment=jnp.ones((1, 32), jnp.int32), modality=seg + sequence.TEXT,
                 slot=f.slot + 100)
  table = bt.block_table(q, k, 8, 16)
  assert (np.asarray(table.classes) == bt.EMPTY).all()
  assert (np.asarray(table.kv_count) == 0).all()


def test_pad_fields_adds_isolated_padding():
  _, meta = draw_meta(0, "tv2tv", 2, 4, 2, 3, 2, 0.0)
  f = meta.fields()
  length = f.segment.shape[1]
  padded = bt.pad_fields(f, 32)
  assert padded.segment.shape[1] % 32 == 0 and padded.segment.shape[1] >= length
  assert (np.asarray(padded.segment[:, length:]) == 0).all()
  slots = np.asarray(padded.slot)
  assert all(len(set(row)) == len(row) for row in slots)
  q = masks.SlotFields(*(a[:, :, None] for a in padded))
  k = masks.SlotFields(*(a[:, None, :] for a in padded))
  mask = np.asarray(masks.visible(q, k))
  np.testing.assert_array_equal(mask[:, :length, :length], np.asarray(masks.dense_mask(meta)))
  assert not mask[:, :length, length:].any() and not mask[:, length:, :length].any()


@pytest.mark.parametrize("bq,bk", [(16, 8)])
def test_jit_matches_eager(bq, bk):
  _, meta = draw_meta(5, "think2v", 3, 4, 3, 4, 3, 0.4)
  f = bt.pad_fields(meta.fields(), 16)
  eager = bt.block_table(f, f, bq, bk)
  jitted = jax.jit(bt.block_table, static_argnums=(2, 3))(f, f, bq, bk)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
