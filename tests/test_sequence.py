"""The interleaved sequence: layouts, shared positions, targets, packing, bad inputs."""

import dataclasses

import numpy as np
import pytest

from tv2tv_jax import sequence, synthetic
from tv2tv_jax.sequence import NOISY, PAD, TEXT


def _example(exp, num_chunks=3, first_frame=True, seed=0, **kw):
  rng = np.random.default_rng(seed)
  return synthetic.random_example(rng, exp.seq, exp.model, num_chunks=num_chunks,
                                  first_frame=first_frame, max_text_len=2, **kw)


def _logical(row, seq, model):
  """The logical interleaved sequence of segment 1 as a list of (kind, value) by order."""
  T, n = seq.text_len, model.tokens_per_chunk
  items = {}
  seg = row["segment_ids"]
  for slot in np.nonzero(seg == 1)[0]:
    mod, order = row["modality"][slot], row["order"][slot]
    if mod == TEXT:
      items[order] = ("text", int(row["text_tokens"][slot]))
    elif (order - row["order"][slot - (slot - T) % n]) == 0:  # first token of a copy
      items[order] = ("noisy" if mod == NOISY else "clean", int(row["chunk_ids"][slot]))
  return [items[k] for k in sorted(items)]


@pytest.mark.parametrize("layout", ["tv2tv", "t2v", "think2v"])
def test_layouts(tiny_exp, layout):
  seq, model = tiny_exp.seq, tiny_exp.model
  ex = dataclasses.replace(
      _example(tiny_exp, num_chunks=2, first_frame=True),
      prompt=np.array([10, 11]), chunk_texts=[np.array([20]), np.array([30, 31])])
  row = sequence.pack_row([sequence.layout_example(ex, seq, model, layout)], seq, model)
  kinds = [(k if k in ("noisy", "clean") else v) for k, v in _logical(row, seq, model)]
  B, E, S = seq.bof_id, seq.eof_id, seq.eos_id
  expected = {
      "tv2tv": [10, 11, "clean", E, 20, B, "noisy", "clean", E, 30, 31, B, "noisy", "clean", E,
                S],
      "t2v": [10, 11, "clean", E, B, "noisy", "clean", E, B, "noisy", "clean", E, S],
      # Every plan item is closed by EOF: the boundary a sampler needs.
      "think2v": [10, 11, "clean", E, 20, E, 30, 31, E, B, "noisy", "clean", E, B, "noisy",
                  "clean", E, S],
  }[layout]
  assert kinds == expected
  # Plan ids: text_i and the BOF opening chunk i carry i + 1 (a CFG-dropped noisy copy of
  # chunk i sees neither); the prompt, EOF and EOS carry 0.
  T = seq.text_len
  text = row["segment_ids"][:T] == 1
  tok, plan = row["text_tokens"][:T][text], row["plan_ids"][:T][text]
  want = {10: 0, 11: 0, 20: 1, 30: 2, 31: 2, E: 0, S: 0}
  assert all(p == want[t] for t, p in zip(tok.tolist(), plan.tolist()) if t != B)
  assert plan[tok == B].tolist() == [1, 2]


def test_first_frame_eof_predicts_the_first_chunk_text(tiny_exp):
  """The EOF after a given first frame is the trained predictor of text_0's first token
  (and the prompt's last token, followed by the frame, has no target)."""
  seq, model = tiny_exp.seq, tiny_exp.model
  ex = dataclasses.replace(_example(tiny_exp, num_chunks=1, first_frame=True),
                           prompt=np.array([10]), chunk_texts=[np.array([20, 21])])
  lo = sequence.layout_example(ex, seq, model)
  # prompt 10, [frame], EOF, text 20 21, BOF, [chunk], EOF, EOS
  np.testing.assert_array_equal(lo.text_tokens, [10, seq.eof_id, 20, 21, seq.bof_id,
                                                 seq.eof_id, seq.eos_id])
  np.testing.assert_array_equal(lo.text_target_mask, [0, 1, 1, 1, 0, 1, 0])
  assert lo.text_targets[1] == 20


def test_noisy_and_clean_copies_share_positions(tiny_exp):
  seq, model = tiny_exp.seq, tiny_exp.model
  row = sequence.pack_row([sequence.layout_example(_example(tiny_exp), seq, model)], seq, model)
  T, K, n = seq.text_len, seq.max_chunks, model.tokens_per_chunk
  for j in np.nonzero(row["noisy_valid"])[0]:
    noisy_pos = row["positions"][T + j * n: T + (j + 1) * n]
    src = row["noisy_src"][j]  # the clean copy holding the same latent
    clean_pos = row["positions"][T + K * n + src * n: T + K * n + (src + 1) * n]
    np.testing.assert_array_equal(noisy_pos, clean_pos)
    np.testing.assert_array_equal(noisy_pos, noisy_pos[0] + np.arange(n))
    # ...and the clean copy follows its noisy twin in logical order.
    assert row["order"][T + K * n + src * n] == row["order"][T + j * n] + n


def test_text_targets(tiny_exp):
  seq, model = tiny_exp.seq, tiny_exp.model
  ex = dataclasses.replace(_example(tiny_exp, num_chunks=1, first_frame=False),
                           prompt=np.array([10]), chunk_texts=[np.array([20, 21])])
  lo = sequence.layout_example(ex, seq, model)
  # prompt 10, text 20 21, BOF, [chunk], EOF, EOS
  np.testing.assert_array_equal(lo.text_tokens, [10, 20, 21, seq.bof_id, seq.eof_id, seq.eos_id])
  np.testing.assert_array_equal(lo.text_target_mask, [1, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(lo.text_targets[lo.text_target_mask],
                                [20, 21, seq.bof_id, seq.eos_id])


def test_packing_restarts_positions_and_separates_segments(tiny_exp):
  seq, model = tiny_exp.seq, tiny_exp.model
  exs = [sequence.layout_example(_example(tiny_exp, num_chunks=1, seed=s, prompt_len=2),
                                 seq, model) for s in range(2)]
  row = sequence.pack_row(exs, seq, model)
  for seg in (1, 2):
    sel = row["segment_ids"] == seg
    assert row["positions"][sel].min() == 0 and row["order"][sel].min() == 0
    assert row["order"][sel].max() == exs[seg - 1].length - 1
  assert set(np.unique(row["segment_ids"])) == {0, 1, 2}
  assert (row["modality"][row["segment_ids"] == 0] == PAD).all()
  eff = sequence.packing_efficiency(row["segment_ids"])
  assert eff == pytest.approx(sum(e.length for e in exs) / row["segment_ids"].size)


def test_row_packer_is_deterministic_and_fills_rows(tiny_exp):
  seq, model = tiny_exp.seq, tiny_exp.model
  def rows():
    exs = [sequence.layout_example(_example(tiny_exp, num_chunks=1, seed=s, first_frame=False),
                                   seq, model) for s in range(12)]
    return list(sequence.pack_stream(exs, seq, model))
  a, b = rows(), rows()
  assert len(a) == len(b) and len(a) < 12  # several examples share a row
  for ra, rb in zip(a, b):
    for key in ra:
      np.testing.assert_array_equal(ra[key], rb[key])
  total = sum(int(r["noisy_valid"].sum()) for r in a)
  assert total == 12  # nothing lost


@pytest.mark.parametrize("mutate,message", [
    (lambda ex: dataclasses.replace(ex, latents=ex.latents[:, :2]), r"latents have shape"),
    (lambda ex: dataclasses.replace(ex, latents=np.where(
        np.arange(ex.latents.shape[0])[:, None, None, None] == 2, np.nan, ex.latents)),
     r"latents\[2\] contains NaN"),
    (lambda ex: dataclasses.replace(ex, chunk_texts=[np.array([5, 9999])] + list(
        ex.chunk_texts[1:])), r"chunk_texts\[0\]\[1\] = 9999 is outside the vocabulary"),
    (lambda ex: dataclasses.replace(ex, prompt=np.array([-1])), r"prompt\[0\] = -1"),
    (lambda ex: dataclasses.replace(ex, chunk_texts=list(ex.chunk_texts[:-1])),
     r"chunk_texts has 2 entries but there are 3 generated chunks"),
])
def test_bad_examples_are_named(tiny_exp, mutate, message):
  ex = mutate(_example(tiny_exp, num_chunks=3))
  ex = dataclasses.replace(ex, name="clip-42")
  with pytest.raises(sequence.ExampleError, match=message) as err:
    sequence.layout_example(ex, tiny_exp.seq, tiny_exp.model)
  assert str(err.value).startswith("clip-42:")


def test_special_token_in_text_is_rejected(tiny_exp):
  ex = dataclasses.replace(_example(tiny_exp), chunk_texts=[np.array([7, tiny_exp.seq.bof_id]),
                                                            np.array([]), np.array([])])
  with pytest.raises(sequence.ExampleError, match=r"chunk_texts\[0\]\[1\] is the special token BOF"):
    sequence.layout_example(ex, tiny_exp.seq, tiny_exp.model)


def test_over_long_examples_are_named(tiny_exp):
  seq, model = tiny_exp.seq, tiny_exp.model
  long_text = dataclasses.replace(_example(tiny_exp, num_chunks=1, first_frame=False),
                                  prompt=np.full(seq.text_len, 7), name="long-text")
  with pytest.raises(sequence.ExampleError, match=r"long-text: needs \d+ text slots but "
                     rf"seq.text_len is {seq.text_len}"):
    sequence.layout_example(long_text, seq, model)
  many = _example(tiny_exp, num_chunks=seq.max_chunks + 1, first_frame=False)
  with pytest.raises(sequence.ExampleError, match="seq.max_chunks"):
    sequence.layout_example(many, seq, model)


def test_cursor_rows_move_independently_and_match_the_layout(tiny_exp):
  """The cached sampler's per-row cursor: a row that writes nothing does not move; a
  generated chunk's noisy copy takes n orders at the positions its clean copy shares."""
  n = tiny_exp.model.tokens_per_chunk
  c = sequence.Cursor(rows=2)
  order, pos = c.text(np.array([3, 0]))
  np.testing.assert_array_equal(order, [0, 0])
  np.testing.assert_array_equal(c.order, [3, 0])
  np.testing.assert_array_equal(c.noisy()[0], [3, 0])  # peeking claims nothing
  np.testing.assert_array_equal(c.order, [3, 0])
  noisy, clean, pos = c.chunk(n, with_noisy=True, where=np.array([True, False]))
  np.testing.assert_array_equal(noisy, [3, 0])
  np.testing.assert_array_equal(clean, [3 + n, n])
  np.testing.assert_array_equal(pos, [3, 0])
  np.testing.assert_array_equal(c.order, [3 + 2 * n, 0])
  np.testing.assert_array_equal(c.pos, [3 + n, 0])
  # A given first frame has no noisy twin: its clean copy starts at the cursor.
  _, clean, _ = c.chunk(n, with_noisy=False)
  np.testing.assert_array_equal(clean, [3 + 2 * n, 0])
  np.testing.assert_array_equal(c.order, [3 + 3 * n, n])
  # One example, laid out: the layout's total length is the cursor's final order.
  laid = sequence.layout_example(_example(tiny_exp, num_chunks=2), tiny_exp.seq, tiny_exp.model)
  assert laid.length == laid.num_text + n * (laid.num_noisy + laid.num_clean)
