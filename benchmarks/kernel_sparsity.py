"""Block sparsity of the Pallas kernel's block table vs the ideal, on toy and paper-scale layouts.

For each layout and block size: the kv-blocks the kernel visits (non-EMPTY in
`block_table.block_table`, computed from metadata summaries) over all blocks, and
the ideal at the same block size (blocks of the dense mask with at least one
visible pair, `block_table.classes_from_mask`). Goals (issue 5): visited within 5%
of ideal, and <= 55% of dense for TV2TV at paper-scale lengths.

Run (CPU, about a minute):

    python benchmarks/kernel_sparsity.py            # prints a table
    # writes benchmarks/results/kernel_sparsity.json

Paper-scale shape: 32x32 latents with patch 2 -> n = 256 tokens per chunk, 24
generated chunks + a first frame, a 32-token prompt and 0-8 text tokens per chunk
(CS:GO-like actions), text region 384 slots: L = 384 + 2 * 25 * 256 = 13184.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from tv2tv_jax import masks, sequence, synthetic
from tv2tv_jax.attention import block_table as bt
from tv2tv_jax.config import ModelConfig, SequenceConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def paper_rows(layout: str, seed: int, packed: bool):
  """A one-row batch of paper-scale examples (one 24-chunk clip, or two 12-chunk clips)."""
  seq = SequenceConfig(layout=layout, text_len=384, max_chunks=25)
  model = ModelConfig(vocab_size=1024, latent_shape=(32, 32, 1), patch_size=2)
  rng = np.random.default_rng(seed)
  clips = [12, 11] if packed else [24]
  group = [sequence.layout_example(
      synthetic.random_example(rng, seq, model, num_chunks=c, first_frame=True, prompt_len=32,
                               max_text_len=8, name=f"paper{i}"), seq, model, layout)
           for i, c in enumerate(clips)]
  return sequence.pack_rows([group], seq, model)


def toy_rows(layout: str, seed: int):
  """A toy-scale row of random examples (n = 16, 256 text slots, 16 + 16 copies: L = 768)."""
  seq = SequenceConfig(layout=layout, text_len=256, max_chunks=16)
  model = ModelConfig(latent_shape=(8, 8, 1), patch_size=2)
  return synthetic.random_batch(seed, seq, model, 4, layout=layout, max_examples_per_row=3)


def measure(batch, block: tuple[int, int], drop_p: float = 0.1, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  chunk_drop = rng.random(int(batch["chunk_ids"].max()) + 1) < drop_p
  drop = chunk_drop[batch["chunk_ids"]] & (batch["modality"] == sequence.NOISY)
  meta = masks.SeqMeta.from_batch(batch, cfg_drop=drop)
  bq, bk = block
  f = bt.pad_fields(bt.pad_fields(meta.fields(), bq), bk)
  t0 = time.perf_counter()
  table = jax.jit(bt.block_table, static_argnums=(2, 3))(f, f, bq, bk)
  classes = np.asarray(table.classes)
  t_table = time.perf_counter() - t0
  fn = masks.SlotFields(*(np.asarray(a) for a in f))
  ideal = np.concatenate([  # the dense mask row by row (numpy; [L, L] bools per row)
      bt.classes_from_mask(masks.visible(
          masks.SlotFields(*(a[r:r + 1, :, None] for a in fn)),
          masks.SlotFields(*(a[r:r + 1, None, :] for a in fn))), bq, bk)
      for r in range(classes.shape[0])])
  assert not ((classes == bt.EMPTY) & (ideal != bt.EMPTY)).any(), "unsound EMPTY"
  assert not ((classes == bt.FULL) & (ideal != bt.FULL)).any(), "unsound FULL"
  total = classes.size
  visited, ideal_n = int((classes != bt.EMPTY).sum()), int((ideal != bt.EMPTY).sum())
  return dict(L=int(batch["segment_ids"].shape[1]), rows=int(classes.shape[0]), block_q=bq,
              block_kv=bk, blocks=total, visited=visited, ideal=ideal_n,
              visited_frac=visited / total, ideal_frac=ideal_n / total,
              excess_over_ideal=visited / ideal_n - 1.0,
              full=int((classes == bt.FULL).sum()), full_ideal=int((ideal == bt.FULL).sum()),
              table_seconds=t_table)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.path.join(RESULTS, "kernel_sparsity.json"))
  args = ap.parse_args()
  cases = []
  for layout in ("tv2tv", "t2v", "think2v"):
    for block in ((128, 128), (32, 32)):
      cases.append((f"toy/{layout}", toy_rows(layout, 0), block))
    for packed in (False, True):
      batch = paper_rows(layout, 0, packed)
      for block in ((128, 128), (256, 256), (512, 256), (512, 512)):
        cases.append((f"paper{'-packed' if packed else ''}/{layout}", batch, block))
  rows = []
  head = (f"{'case':22s} {'L':>6s} {'bq x bk':>9s} {'blocks':>7s} {'visited':>8s} "
          f"{'ideal':>8s} {'vis/tot':>8s} {'ideal/tot':>9s} {'excess':>7s} {'full':>6s} "
          f"{'full*':>6s}")
  print(head)
  for name, batch, block in cases:
    r = dict(case=name, **measure(batch, block))
    rows.append(r)
    print(f"{name:22s} {r['L']:6d} {block[0]:4d}x{block[1]:<4d} {r['blocks']:7d} "
          f"{r['visited']:8d} {r['ideal']:8d} {r['visited_frac']:8.3f} {r['ideal_frac']:9.3f} "
          f"{100 * r['excess_over_ideal']:6.2f}% {r['full']:6d} {r['full_ideal']:6d}")
  print("full* = blocks whose every pair is visible (ideal FULL); full = claimed FULL by the table")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(dict(jax_version=jax.__version__, cfg_drop_prob=0.1, rows=rows), fh, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
