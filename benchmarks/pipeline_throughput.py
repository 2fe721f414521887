r"""Input pipeline throughput vs the train step, and packing efficiency per layout.

    python -m benchmarks.pipeline_throughput [--steps=2] [--batches=40]

Writes benchmarks/results/pipeline_throughput.json (the table in docs/pipeline.md).

Data: toy-world clips built with the TFDS builder and written as a latent dataset
(`data_pipelines.latent_dataset`) whose latents come from a fixed pooling stand-in
encoder of the `small` config's latent shape [8, 8, 16]: the pipeline's work (read,
parse, tokenise, layout, pack, batch, ship between processes) depends on shapes and
texts, not latent values, and this keeps a VAE's training out of a pipeline benchmark.

Measured:
  * batches/s and tokens/s (row slots; and non-padding slots) of the `small` config's
    batches (B=8, the default row: L = 64 + (15 + 16) x 16 = 560) with 0 and 2 Grain
    workers, after a warm-up;
  * the `small` train step's time on this machine (median of a few steps after compile),
    and the headroom = pipeline batches/s x step time (goal >= 5);
  * packing efficiency (non-pad share) per layout (tv2tv, t2v, think2v) at the default
    row, for clips of 15 and 7 chunks, over `max_open` in {1, 2, 4, 8}; and, for
    comparison, in a row with 256 text slots and 16 noisy copies (a caption-sized row).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

import numpy as np

SMALL_CHANNELS = 16


def pool_encode16(frames: np.ndarray) -> np.ndarray:
  """Stand-in encoder: f32[B, 1+4k, 64, 64, 3] -> f32[B, 1+k, 8, 8, 16] (8x8 pooling, tiled)."""
  key = np.asarray(frames, np.float32)[:, ::4]
  b, t = key.shape[:2]
  pooled = key.reshape(b, t, 8, 8, 8, 8, 3).mean(axis=(3, 5))
  reps = -(-SMALL_CHANNELS // 3)
  return np.tile(pooled, (1, 1, 1, 1, reps))[..., :SMALL_CHANNELS].astype(np.float32)


def build_data(root: str, num_chunks: int, num_train: int, vocab_size: int):
  """TFDS toy world -> stand-in latent dataset -> tokenizer; returns a PipelineConfig."""
  from data_pipelines import grain_pipeline, latent_dataset, toy_world_tfds
  from data_pipelines import tokenizer as tokenizer_lib
  cfg = toy_world_tfds.ToyWorldBuilderConfig(
      name=f"bench_k{num_chunks}", description="benchmark", num_train=num_train,
      num_validation=4, num_chunks=num_chunks, caption_mode="dense")
  tfds_dir, latent_dir = os.path.join(root, "tfds"), os.path.join(root, f"latents_k{num_chunks}")
  toy_world_tfds.ToyWorld(config=cfg, data_dir=tfds_dir).download_and_prepare()
  enc = latent_dataset.LatentEncoder(pool_encode16, {"mean": [0.0] * SMALL_CHANNELS,
                                                     "std": [1.0] * SMALL_CHANNELS}, "pool16")
  latent_dataset.build_latent_dataset(tfds_dir, cfg, enc, latent_dir, log=lambda s: None)
  tok_path = os.path.join(root, "tokenizer.json")
  if not os.path.exists(tok_path):
    tokenizer_lib.train_bpe(tokenizer_lib.toy_world_corpus() + ["toy world"], vocab_size,
                            byte_level=False).save(tok_path)
  return grain_pipeline.PipelineConfig(latent_dir=latent_dir, tokenizer_path=tok_path,
                                       prompt="toy world")


def small_experiment(layout: str = "tv2tv", text_len: int | None = None,
                     noisy_chunks: int | None = None):
  """The `small` config (its default row unless text_len / noisy_chunks override it)."""
  from experiments import toy_world
  from tv2tv_jax import config as config_lib
  c = toy_world.get_config(f"small,{layout}")
  if text_len is not None:
    c.seq.text_len = text_len
  if noisy_chunks is not None:
    c.seq.noisy_chunks = noisy_chunks
  return config_lib.experiment_from_config_dict(c)


def time_pipeline(pcfg, exp, batches: int, warmup: int = 3) -> dict:
  """batches/s and slots/s of `make_dataset` after `warmup` batches (workers started)."""
  from data_pipelines import grain_pipeline
  it = grain_pipeline.GrainBatches(grain_pipeline.make_dataset(
      pcfg, "train", exp.seq, exp.model, exp.train.batch_size))
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  start_s = time.perf_counter() - t0
  nonpad = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    nonpad += int((next(it)["segment_ids"] > 0).sum())
  dt = time.perf_counter() - t0
  it.close()
  slots = batches * exp.train.batch_size * exp.row_len
  return dict(workers=pcfg.num_workers, batches=batches, seconds=dt, startup_s=start_s,
              batches_per_s=batches / dt, tokens_per_s=slots / dt,
              nonpad_tokens_per_s=nonpad / dt, efficiency=nonpad / slots)


def time_train_step(exp, steps: int) -> dict:
  """Median seconds of the `small` train step (single device, as the MFU benchmark)."""
  from tv2tv_jax import benchmarking
  return benchmarking.time_train_step(exp, steps)


def packing_efficiency(pcfg, exp, rows: int = 64) -> float:
  """Non-pad share of the pipeline's first `rows` rows (one epoch pass, windowed packing)."""
  from data_pipelines import grain_pipeline
  ds = grain_pipeline.make_dataset(pcfg, "train", exp.seq, exp.model, 1, shuffle=True)
  it = iter(ds)
  seg = np.concatenate([next(it)["segment_ids"] for _ in range(rows)])
  return float((seg > 0).mean())


def max_text_slots(pcfg, exp) -> int:
  """The most text slots one example of the train split needs in `exp`'s layout."""
  from data_pipelines import grain_pipeline, latent_dataset
  from tv2tv_jax import sequence
  to_ex = grain_pipeline.ToExample(pcfg, exp.seq, exp.model, exp.seq.layout)
  src = latent_dataset.data_source(pcfg.latent_dir, "train")
  return max(sequence.layout_example(to_ex.example(src[i]), exp.seq, exp.model).num_text
             for i in range(len(src)))


def main():
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=2, help="timed train steps (small)")
  parser.add_argument("--batches", type=int, default=40, help="timed pipeline batches")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "pipeline_throughput.json"))
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  result = {"cpu_count": os.cpu_count()}
  with tempfile.TemporaryDirectory() as root:
    exp = small_experiment()
    data = {k: build_data(root, k, 128, exp.model.vocab_size) for k in (15, 7)}
    pcfg = data[7]  # 2 clips per row at the default row length
    result["pipeline"] = [time_pipeline(dataclasses.replace(pcfg, num_workers=w), exp,
                                        args.batches) for w in (0, 2)]
    eff = {}
    for layout in ("tv2tv", "t2v", "think2v"):
      lexp = small_experiment(layout)
      for k, p in data.items():
        for max_open in (1, 2, 4, 8):
          eff[f"{layout}/k{k}/default_row/max_open{max_open}"] = packing_efficiency(
              dataclasses.replace(p, max_open=max_open), lexp)
    # For comparison: the same clips in a row with a 256-slot text region and as many noisy
    # as clean copies (a row budgeted for long captions, not for toy-world texts).
    for layout in ("tv2tv", "t2v", "think2v"):
      wide = small_experiment(layout, text_len=256, noisy_chunks=0)
      for k, p in data.items():
        eff[f"{layout}/k{k}/text_len256_noisy16/max_open4"] = packing_efficiency(p, wide)
    result["max_text_slots"] = {k: max_text_slots(p, exp) for k, p in data.items()}
    result["packing_efficiency"] = eff
    result["train_step"] = time_train_step(exp, args.steps)
  step_s = result["train_step"]["step_s"]
  for row in result["pipeline"]:
    row["headroom_vs_train_step"] = row["batches_per_s"] * step_s
  result["config"] = dict(variant="small", batch=exp.train.batch_size, row_len=exp.row_len,
                          clips="toy world, 128 train clips of 7 chunks (15 for efficiency)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
