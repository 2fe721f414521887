r"""Latent-dataset encode throughput (clips/s, frames/s) on 1 device against the batch sharded
over several, end to end: TFDS read, the jitted sharded VAE encode, shard writing.

    python -m benchmarks.latent_encode_throughput [--variant=study] [--chunks=12] \
        [--clips=48] [--batch=2] [--devices=1,4] [--out=benchmarks/results/latent_encode.json]

Toy-world clips of 1 + 4 * chunks frames (the study's clips have 12 chunks) are built with
the TFDS builder, then encoded with `latent_encode.encode_tfds` by the VAE of
`experiments/vae_toy_world.py:<variant>` (random params: the cost does not depend on their
values) into a fresh directory, once per device count. Each device count runs twice: the
first run includes compiling the encode, the second (into another directory) is the steady
state. A third row times the sharded encode alone on frames already in memory (no TFDS read,
no uint8 conversion, no writing). The devices are fake CPU devices (`jax_num_cpu_devices`) sharing this host's cores,
so the comparison measures the cost of the sharded program, not a speed-up. The JSON
records os.getloadavg() before and after, since other jobs move the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="study")
  parser.add_argument("--chunks", type=int, default=12)
  parser.add_argument("--clips", type=int, default=48)
  parser.add_argument("--batch", type=int, default=2, help="clips per device per call")
  parser.add_argument("--devices", default="1,4")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                    "latent_encode.json"))
  args = parser.parse_args()
  counts = [int(d) for d in args.devices.split(",")]

  import jax
  jax.config.update("jax_num_cpu_devices", max(counts))  # before any device is touched
  import numpy as np
  from data_pipelines import latent_dataset, latent_encode, toy_world_tfds
  from experiments import vae_toy_world
  from tv2tv_jax.vae import model as vae_model, video_tokenizer

  root = tempfile.mkdtemp(prefix="latent_encode_bench_")
  cfg = toy_world_tfds.ToyWorldBuilderConfig(
      name="bench", description="encode benchmark", num_train=args.clips, num_validation=1,
      num_chunks=args.chunks)
  t0 = time.perf_counter()
  builder = toy_world_tfds.ToyWorld(config=cfg, data_dir=os.path.join(root, "tfds"))
  builder.download_and_prepare()
  build_s = time.perf_counter() - t0
  vae_cfg = vae_model.vae_config_from_dict(vae_toy_world.get_config(args.variant).vae.to_dict())
  c = vae_cfg.latent_channels
  video_tokenizer.save(os.path.join(root, "vae"), vae_cfg,
                       vae_model.init_params(vae_cfg, jax.random.key(0)),
                       vae_model.LatentStats(np.zeros(c, np.float32), np.ones(c, np.float32)))
  encoder = latent_dataset.vae_encoder(os.path.join(root, "vae"))
  frames = 1 + 4 * args.chunks

  src = builder.as_data_source(split="train")
  clips = np.stack([src[i]["frames"] for i in range(args.clips)]).astype(np.float32) / 127.5 - 1

  def report(n, run, sec):
    rows.append({"devices": n, "run": run, "seconds": sec, "clips_per_s": args.clips / sec,
                 "frames_per_s": args.clips * frames / sec})
    print(f"{n} device(s), {run:>12}: {sec:6.1f} s, {args.clips / sec:6.2f} clips/s, "
          f"{args.clips * frames / sec:7.1f} frames/s", flush=True)

  load_before = os.getloadavg()
  rows = []
  for n in counts:
    for run in ("with_compile", "steady"):
      out = os.path.join(root, f"latents_d{n}_{run}")
      t0 = time.perf_counter()
      meta = latent_encode.encode_tfds(
          builder, encoder, out, splits=["train"], shard_size=args.clips, batch=args.batch,
          devices=jax.devices()[:n], process_index=0, process_count=1, log=lambda s: None)
      sec = time.perf_counter() - t0
      assert meta["splits"]["train"]["num_records"] == args.clips
      report(n, run, sec)
    encode, per_call = latent_encode.sharded_encode_fn(encoder, jax.devices()[:n], args.batch)
    encode(clips[:per_call])  # compiled already by the runs above; this warms the cache
    t0 = time.perf_counter()
    for i in range(0, args.clips, per_call):
      encode(clips[i:i + per_call])
    report(n, "encode_only", time.perf_counter() - t0)
  result = {
      "variant": args.variant, "vae_config": meta["encoder_info"]["vae_config"],
      "clips": args.clips, "frames_per_clip": frames, "latent_shape": meta["latent_shape"],
      "batch_per_device": args.batch, "tfds_build_s": build_s,
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows": rows}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", args.out, "load average before/after:", load_before, result["loadavg_after"])
  shutil.rmtree(root)


if __name__ == "__main__":
  main()
