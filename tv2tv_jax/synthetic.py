"""Generated data of the right structure: random latents and texts laid out by `sequence`.

Used by tests (as a fixture) and by the trainer's `data.source = 'synthetic'`.
Deterministic in its seed.
"""

from __future__ import annotations

import numpy as np

from tv2tv_jax import sequence
from tv2tv_jax.config import ModelConfig, SequenceConfig


def random_example(rng: np.random.Generator, seq: SequenceConfig, model: ModelConfig, *,
                   num_chunks: int, first_frame: bool = True, prompt_len: int = 4,
                   max_text_len: int = 3, name: str = "synthetic") -> sequence.Example:
  """A random clip: `num_chunks` generated chunks (+ a first frame), random text lengths.

  Text tokens are drawn from the non-special ids; latents are standard normal.
  """
  specials = {seq.pad_id, seq.bof_id, seq.eof_id, seq.eos_id}
  ordinary = np.array([t for t in range(model.vocab_size) if t not in specials], np.int32)
  def text(length):
    return rng.choice(ordinary, size=length).astype(np.int32)
  latents = rng.standard_normal((num_chunks + int(first_frame), *model.latent_shape))
  return sequence.Example(
      prompt=text(prompt_len),
      chunk_texts=[text(int(rng.integers(0, max_text_len + 1))) for _ in range(num_chunks)],
      latents=latents.astype(np.float32), first_frame=first_frame, name=name)


def random_batch(seed: int, seq: SequenceConfig, model: ModelConfig, batch_size: int, *,
                 layout: str | None = None, max_examples_per_row: int = 3,
                 max_text_len: int = 3) -> dict[str, np.ndarray]:
  """A packed batch of random examples: 1..max_examples_per_row examples per row.

  Chunk counts and text lengths are drawn so each row fits its capacities.
  Returns the numpy arrays of `sequence.pack_rows`, leading axis [batch_size].
  """
  rng = np.random.default_rng(seed)
  groups = []
  for b in range(batch_size):
    group, text_used, chunks_left, noisy_left = [], 0, seq.max_chunks, seq.num_noisy
    for e in range(int(rng.integers(1, max_examples_per_row + 1))):
      # Clean copies = chunks + first frame must fit the clean region.
      if chunks_left < 1 or (chunks_left < 2 and e > 0):
        break
      first_frame = bool(rng.integers(0, 2)) and chunks_left >= 2
      # ...and the chunks themselves the noisy region (which may be smaller).
      most = min(chunks_left - int(first_frame), noisy_left)
      if most < 1:
        break
      num_chunks = int(rng.integers(1, max(1, most // max(1, max_examples_per_row - e)) + 1))
      ex = random_example(rng, seq, model, num_chunks=num_chunks, first_frame=first_frame,
                          prompt_len=int(rng.integers(1, 5)), max_text_len=max_text_len,
                          name=f"synthetic[{seed}:{b}:{e}]")
      try:
        laid = sequence.layout_example(ex, seq, model, layout)
      except sequence.ExampleError:  # drawn too long for a row on its own
        break
      if text_used + laid.num_text > seq.text_len:
        break
      group.append(laid)
      text_used += laid.num_text
      chunks_left -= laid.num_clean
      noisy_left -= laid.num_noisy
    if not group:  # always at least one (short) example per row
      ex = random_example(rng, seq, model, num_chunks=1, first_frame=False, prompt_len=1,
                          max_text_len=0, name=f"synthetic[{seed}:{b}:min]")
      group.append(sequence.layout_example(ex, seq, model, layout))
    groups.append(group)
  return sequence.pack_rows(groups, seq, model)
