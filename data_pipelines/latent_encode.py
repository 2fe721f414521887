"""Encoding at scale: any builder's clips -> a sharded latent dataset (`latent_dataset` format),
jitted over this process's devices, split over processes, resumable.

    meta = encode_tfds(load_builder("toy_world", "small", tfds_dir), encoder, out_dir)
    meta = encode_dataset({"train": examples}, encoder, out_dir, num_chunks=k,
                          description={"name": ..., "config": ..., "version": ...})

Plan. A split of n examples is cut into ceil(n / shard_size) shards of consecutive example
indices: shard s holds examples [s * shard_size, min(n, (s + 1) * shard_size)), written as
`<split>-SSSSS-of-NNNNN.array_record`. The plan depends on the source (its description and
split sizes), the encoder, shard_size and the per-device batch; its hash (`plan`) is stored
with every shard and in meta.json. It never depends on the process or device count.

Processes. All shards of all splits, in order (train's, then validation's, ...), are dealt
out round-robin: process p of P encodes those at positions p, p + P, ... Each process
encodes on its own devices (a 1-D mesh of `jax.local_devices()`, the batch sharded over it),
so the encode itself has no cross-process collectives. Processes meet only at the end: a
barrier (`sync_global_devices`), then process 0 reads every shard's summary, writes
latent_stats.json and meta.json, and a second barrier lets the others return the same meta.
Every process must see the same `out_dir` (a shared filesystem); a shard another process
wrote into a directory process 0 cannot see is reported missing by name.

Writing and resume. A shard is written to `<file>.tmp`; then its summary `<split>-SSSSS-of-
NNNNN.json` is written (through a .tmp file and a rename), and last the shard is renamed to
its final name. A shard file under its final name is therefore complete, with its summary
beside it. A rerun, with any process count, skips complete shards (their files are never
opened for writing again) and encodes the others from the start, overwriting what a killed
run left in .tmp files. A summary of another plan (another source, encoder, shard size or
batch) stops the encode with an error naming it, so a resume never mixes two encodes; so
does a meta.json of another plan or of the older single-file layout.

Identical results. Each device always encodes `batch` clips per call: the last call of a
shard is padded with zero clips whose latents are dropped, so the per-device program and its
shapes are the same on 1 device or 64, and each clip's latents do not depend on the other
clips of its batch (the VAE normalises per clip and per time step). Measured on XLA:CPU:
with the same `batch`, the latents are bitwise identical for 1 process x 1 device and 2
processes x 4 devices (tests/test_latent_encode.py); a different per-device batch changes
them in the last bits (tiny VAE, batch 1 against 2: up to 1.0e-6 absolute at latent
magnitudes up to 1.8), which is why `batch` is part of the plan. The shard files are then
byte-identical, and meta.json differs only in "seconds" and "encode_run".
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines import latent_dataset
from data_pipelines.latent_dataset import LatentEncoder

FORMAT = "latent_shards/1"
MESH_AXIS = "clips"
# The builders of this codebase: TFDS name -> (module, class). Imported when named, so that
# e.g. encoding the toy world does not import the CS:GO builder.
BUILDERS = {
    "toy_world": ("data_pipelines.toy_world_tfds", "ToyWorld"),
    "csgo_dust2": ("data_pipelines.csgo_tfds", "CsgoDust2"),
    "captioned_video": ("data_pipelines.captioned_video_tfds", "CaptionedVideo"),
}


def load_builder(name: str, config: Any, tfds_dir: str):
  """The TFDS builder `name` (a key of BUILDERS) with `config` (a config name or object),
  reading from `tfds_dir` (where it was built)."""
  if name not in BUILDERS:
    raise ValueError(f"unknown builder {name!r}; one of {sorted(BUILDERS)}")
  module, cls = BUILDERS[name]
  return getattr(importlib.import_module(module), cls)(config=config, data_dir=tfds_dir)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def describe_builder(builder) -> dict[str, Any]:
  """meta.json's "tfds": {"name", "config", "version", "config_fields"} of a TFDS builder."""
  cfg = builder.builder_config
  fields = {}
  if dataclasses.is_dataclass(cfg):
    skip = ("name", "version", "release_notes", "supported_versions", "description", "tags")
    fields = {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
              if f.name not in skip}
  return {"name": builder.name, "config": getattr(cfg, "name", None),
          "version": str(builder.version), "config_fields": fields}


def builder_num_chunks(builder) -> int:
  """k of a builder whose `frames` feature is uint8[1+4k, H, W, 3]."""
  t = builder.info.features["frames"].shape[0]
  if t is None or t % 4 != 1:
    raise ValueError(f"{builder.name}: frames feature has {t} frames, not 1 + 4k")
  return (t - 1) // 4


@dataclasses.dataclass(frozen=True)
class Shard:
  """Examples [start, stop) of a split, shard `index` of `num_shards`."""
  split: str
  index: int
  num_shards: int
  start: int
  stop: int

  @property
  def file(self) -> str:
    return latent_dataset.shard_name(self.split, self.index, self.num_shards)

  @property
  def summary(self) -> str:
    return self.file[:-len(".array_record")] + ".json"


def plan_shards(sizes: Mapping[str, int], shard_size: int) -> list[Shard]:
  """Every split's shards, splits in the given order. sizes: split -> number of examples."""
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  out = []
  for split, n in sizes.items():
    num = -(-n // shard_size)
    out += [Shard(split, s, num, s * shard_size, min(n, (s + 1) * shard_size))
            for s in range(num)]
  return out


def sharded_encode_fn(encoder: LatentEncoder, devices: Sequence[Any], batch: int
                      ) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
  """The encoder as one host call per batch, jitted with the batch sharded over `devices`.

  Args:
    devices: a 1-D mesh of these (this process's devices: no cross-process collectives).
    batch: clips per device per call.
  Returns:
    (encode, per_call): encode maps frames f32[B, 1+4k, H, W, 3], B <= per_call, to latents
    f32[B, 1+k, h, w, c]; it pads B to per_call = batch * len(devices) with zero clips and
    drops their latents, so every call runs the one compiled program. An encoder without
    `apply` (a host function) is returned as is, with per_call = batch.
  """
  if encoder.apply is None:
    return (lambda frames: np.asarray(encoder.encode(frames), np.float32)), batch
  mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
  clips, replicated = NamedSharding(mesh, P(MESH_AXIS)), NamedSharding(mesh, P())
  params = jax.device_put(encoder.params, replicated)
  fn = jax.jit(encoder.apply, in_shardings=(replicated, clips), out_shardings=clips)
  per_call = batch * len(devices)

  def encode(frames: np.ndarray) -> np.ndarray:
    b = frames.shape[0]
    if b > per_call:
      raise ValueError(f"{b} clips in one call, at most {per_call}")
    padded = np.zeros((per_call, *frames.shape[1:]), np.float32)
    padded[:b] = frames
    return np.asarray(fn(params, jax.device_put(padded, clips)), np.float32)[:b]

  return encode, per_call


def _write_json(path: str, obj: Any) -> None:
  """Atomically: a reader (or a resume after a kill) sees the old file or the whole new one."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _barrier(name: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _check_no_other_encode(out_dir: str, plan: str) -> None:
  """Refuses an out_dir holding shards of another plan (module docstring: resume)."""
  for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*-?????-of-?????.json"))):
    other = _read_json(path).get("plan")
    if other != plan:
      raise ValueError(f"{path}: a shard of another encode (plan {other}, this one {plan}: "
                       "another source, encoder, shard_size or batch); use a fresh out_dir")


def _encode_shard(shard: Shard, source: Any, encode_fn: Callable[[np.ndarray], np.ndarray],
                  per_call: int, out_dir: str, num_chunks: int, plan: str,
                  log: Callable[[str], None]) -> dict[str, Any]:
  """Writes one shard (.tmp, then its summary, then the rename); returns the summary."""
  path = os.path.join(out_dir, shard.file)
  examples = (source[i] for i in range(shard.start, shard.stop))
  result = latent_dataset.encode_split(examples, encode_fn, path + ".tmp", num_chunks,
                                       per_call, log, first_index=shard.start)
  summary = {"plan": plan, "split": shard.split, "shard": shard.index,
             "num_shards": shard.num_shards, "file": shard.file,
             "examples": [shard.start, shard.stop], **result}
  _write_json(os.path.join(out_dir, shard.summary), summary)
  os.replace(path + ".tmp", path)
  return summary


def _meta(shards: list[Shard], summaries: list[dict[str, Any]], sizes: Mapping[str, int],
          base: dict[str, Any]) -> dict[str, Any]:
  """meta.json (latent_dataset's module docstring) from every shard's summary."""
  shapes = {tuple(s["latent_shape"]) for s in summaries if s["latent_shape"] is not None}
  if len(shapes) > 1:
    raise ValueError(f"shards hold latents of different shapes {sorted(shapes)}")
  splits = {}
  for split, n in sizes.items():
    mine = [s for sh, s in zip(shards, summaries) if sh.split == split]
    splits[split] = {
        "num_records": sum(s["num_records"] for s in mine), "num_examples": n,
        "skipped": [r for s in mine for r in s["skipped"]],
        "seconds": sum(s["seconds"] for s in mine),
        "shards": [{"file": s["file"], "examples": s["examples"],
                    "num_records": s["num_records"], "num_skipped": len(s["skipped"])}
                   for s in mine]}
  return {"splits": splits, "latent_shape": list(shapes.pop()) if shapes else None, **base}


def encode_dataset(sources: Mapping[str, Any], encoder: LatentEncoder, out_dir: str, *,
                   num_chunks: int, description: Mapping[str, Any], shard_size: int = 256,
                   batch: int = 8, devices: Sequence[Any] | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
  """Encodes each split's examples into `out_dir` as shards (module docstring).

  Args:
    sources: split -> indexable examples (len, [i]) of dicts as `latent_dataset.clip_fields`
      reads them: name, frames u8[1+4k, H, W, 3], texts[k], optional seed and scalar
      identity features; e.g. a TFDS data source.
    encoder: frames f32[B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents
      f32[B, 1+k, h, w, c]; jitted over `devices` when it has `apply`.
    num_chunks: k.
    description: where the examples come from, for meta.json's "tfds" ({"name", "config",
      "version", ...}; `describe_builder` for a TFDS builder).
    shard_size: examples per shard.
    batch: clips per device per encode call.
    devices: this process's devices to shard the batch over (default jax.local_devices()).
    process_index / process_count: this process's share of the shards (default: JAX's).
      With process_count > 1 every process of the JAX job must call this.
  Returns:
    meta.json's content (every process returns the same).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  devices = jax.local_devices() if devices is None else devices
  if process_count > 1 and process_count != jax.process_count():
    raise ValueError(f"process_count {process_count} but the JAX job has "
                     f"{jax.process_count()} processes (the barriers need all of them)")
  t0 = time.time()
  sizes = {split: len(src) for split, src in sources.items()}
  shards = plan_shards(sizes, shard_size)
  platform = devices[0].platform if encoder.apply is not None else "host"
  base = {"num_chunks": num_chunks, "tfds": _jsonable(dict(description)),
          "encoder": encoder.name, "encoder_info": _jsonable(dict(encoder.info)),
          "layout": "shards", "format": FORMAT, "shard_size": shard_size,
          "batch_per_device": batch}
  plan = hashlib.sha256(json.dumps(
      {**base, "sizes": sizes, "stats": encoder.stats, "platform": platform},
      sort_keys=True).encode()).hexdigest()[:16]
  base["plan"] = plan

  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, "meta.json")
  if os.path.exists(meta_path):
    meta = _read_json(meta_path)
    if meta.get("plan") != plan:
      raise ValueError(f"{meta_path}: holds another latent dataset (plan {meta.get('plan')}, "
                       f"this one {plan}); use a fresh out_dir")
    log(f"latent encode: {out_dir} is complete (plan {plan})")
    return meta
  _check_no_other_encode(out_dir, plan)

  encode_fn, per_call = sharded_encode_fn(encoder, devices, batch)
  mine = shards[process_index::process_count]
  log(f"latent encode: process {process_index}/{process_count}: {len(mine)} of "
      f"{len(shards)} shards, {len(devices)} {platform} devices, {per_call} clips per call")
  for shard in mine:
    if all(os.path.exists(os.path.join(out_dir, f)) for f in (shard.file, shard.summary)):
      log(f"latent encode: {shard.file} complete, kept")
      continue
    s = _encode_shard(shard, sources[shard.split], encode_fn, per_call, out_dir, num_chunks,
                      plan, log)
    log(f"latent encode: {shard.file}: {s['num_records']} records, {len(s['skipped'])} "
        f"skipped, {s['seconds']:.1f}s ({(shard.stop - shard.start) / max(s['seconds'], 1e-6):.1f}"
        " clips/s)")

  _barrier("latent_encode:shards_written", process_count)
  if process_index == 0:
    missing = [s.file for s in shards
               if not all(os.path.exists(os.path.join(out_dir, f)) for f in (s.file, s.summary))]
    if missing:
      raise FileNotFoundError(f"{out_dir}: shards {missing[:5]} (of {len(missing)}) are "
                              "missing after every process finished: is out_dir shared by "
                              "every process?")
    summaries = [_read_json(os.path.join(out_dir, s.summary)) for s in shards]
    meta = _meta(shards, summaries, sizes, base)
    meta["encode_run"] = {"process_count": process_count, "devices_per_process": len(devices),
                          "platform": platform, "seconds": time.time() - t0}
    _write_json(os.path.join(out_dir, "latent_stats.json"), encoder.stats)
    _write_json(meta_path, meta)  # last: its presence marks a complete dataset
    for split, v in meta["splits"].items():
      log(f"latent encode: {split}: {v['num_records']} of {v['num_examples']} clips in "
          f"{len(v['shards'])} shards, {len(v['skipped'])} skipped")
  _barrier("latent_encode:meta_written", process_count)
  return _read_json(meta_path)


def encode_tfds(builder, encoder: LatentEncoder, out_dir: str, *,
                splits: Sequence[str] | None = None, **kwargs) -> dict[str, Any]:
  """`encode_dataset` over the splits of a prepared TFDS builder of this codebase.

  Args:
    builder: e.g. `load_builder("csgo_dust2", "r64", tfds_dir)`; its `frames` feature gives
      k, its name, config and version go into meta.json.
    splits: default every split the builder has (train and validation first).
    kwargs: the keyword arguments of `encode_dataset`.
  """
  have = list(builder.info.splits.keys())
  if splits is None:
    splits = [s for s in latent_dataset.SPLITS if s in have] + sorted(
        s for s in have if s not in latent_dataset.SPLITS)
  unknown = [s for s in splits if s not in have]
  if unknown:
    raise ValueError(f"{builder.name}/{builder.builder_config.name} has no split "
                     f"{unknown[0]!r}; it has {have}")
  sources = {s: builder.as_data_source(split=s) for s in splits}
  return encode_dataset(sources, encoder, out_dir, num_chunks=builder_num_chunks(builder),
                        description=describe_builder(builder), **kwargs)
