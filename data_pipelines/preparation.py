r"""Data preparation: raw source -> a prepared data directory (`data_pipelines.prepared`).

    python -m tv2tv_jax.prepare --config=experiments/toy_world.py:quick --data_dir=/tmp/data

runs the missing stages of the configured source (`data.source`) into the data directory,
each cached and resumable:

  tfds       the TFDS dataset: the toy world's builder (`data.toy_world`), or the CS:GO /
             captioned-video builder (`data.builder_config`) over the raw files in
             `data.manual_dir`
  vae        the video tokenizer (`data.vae_kind`): our own VAE, trained here on
             toy-world clips (`data.vae`, an `experiments/vae_toy_world.py` config) or
             copied from a trained VAE directory (`data.vae_dir`) for the other sources;
             or a pretrained one ('cosmos', 'wan') converted from the diffusers weights in
             `data.vae_dir`, with latent statistics of the training clips or published
             ones (`data.vae_stats`). `tv2tv_jax.vae.tokenizer_store` holds both layouts.
  latents    every split encoded with that VAE (`data_pipelines.latent_dataset`)
  tokenizer  tokenizer.json: copied from `data.tokenizer_path` (e.g. Llama-3's), else a
             character-level BPE trained on the dataset's texts

Each stage's marker (`stage_<name>.json`) is written last and records the stage's
settings, which nest those of the stages upstream of it; so a finished stage is skipped,
and a stage whose settings changed (or whose upstream stage was redone) is built again,
its previous output moved to `superseded/<time>/` (checkpoints trained on it may still
need it; nothing is deleted). Only an unfinished build is removed.

`python -m tv2tv_jax.main` calls `prepare` before training, so the README's command runs the
whole chain; the trainer itself only reads a prepared directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import ml_collections

from data_pipelines import prepared
from data_pipelines.prepared import LATENTS, TOKENIZER, VAE
from tv2tv_jax import config as config_lib
from tv2tv_jax.config import PREPARED_SOURCES, RunConfig

STAGES = ("tfds", "vae", "latents", "tokenizer")

# The public functions take the run's `config.RunConfig` (sections data, model and init);
# a raw config (ConfigDict or dict) is parsed, and so checked, first.


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def _tree_hash(path: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(path) for n in names]
  return prepared.hash_files(files, path, True)


def tokenizer_source(cfg: RunConfig | Any) -> str:
  """The tokenizer.json preparation copies: `data.tokenizer_path`, else the one beside the
  Llama weights (`<init.llama_dir>/tokenizer.json`); "" when neither is set (the
  tokenizer is then trained on the dataset's texts)."""
  cfg = config_lib.as_run_config(cfg)
  if cfg.data.tokenizer_path:
    return cfg.data.tokenizer_path
  llama_dir = cfg.init.llama_dir
  return f"{llama_dir.rstrip('/')}/tokenizer.json" if llama_dir else ""


def stage_settings(cfg: RunConfig | Any) -> dict[str, dict[str, Any]]:
  """What each stage's output depends on (its own settings and its upstream stages')."""
  cfg = config_lib.as_run_config(cfg)
  data, model = cfg.data, cfg.exp.model
  source = data.source
  if source == "toy_world":
    tfds = {"toy_world": data.toy_world.to_dict()}
    placement = _sports_placement(data)
    if placement is not None:
      # Sports captions moved from after to before the chunks they describe, and a config
      # may leave the placement to the default (or name a registered config): a stage
      # built under the old default recorded no placement and must not pass for a new
      # one. Dense settings stay as they were, so their cached stages stay valid.
      tfds["caption_placement"] = placement
  else:
    tfds = {source: {"builder_config": data.builder_config.to_dict(),
                     "manual_dir": os.path.abspath(data.manual_dir)}}
  vae_dir = data.vae_dir
  copied = {"vae_dir": os.path.abspath(vae_dir),
            "content": _tree_hash(vae_dir) if os.path.isdir(vae_dir) else ""}
  if data.vae_kind != "own":
    # The converted weights, and the clips the statistics come from (when they do).
    vae = {"kind": data.vae_kind, **copied, "stats": data.vae_stats,
           "tile_latents": data.vae_tile_latents}
    if data.vae_stats == "data":
      vae.update(stats_clips=data.vae_stats_clips, tfds=tfds)
  elif source == "toy_world":
    # The VAE trains on generate_clip seeds of its own config, not on the TFDS splits, so
    # a resized dataset keeps the trained VAE. Its resolved config (latent channels
    # applied) is the setting: a recipe that changed must not reuse the old VAE.
    vae = {"config": vae_config(cfg).to_dict()}
  else:
    vae = copied
  latents = {"tfds": tfds, "vae": vae}
  tokenizer = {"latents": latents, "vocab_size": int(model.vocab_size),
               "prompt": data.prompt}
  path = tokenizer_source(cfg)
  if path:
    tokenizer = {"tokenizer_path": os.path.abspath(path),
                 "content": prepared.hash_files([path], os.path.dirname(path) or ".", True)
                 if os.path.exists(path) else ""}
  return _jsonable({"tfds": tfds, "vae": vae, "latents": latents, "tokenizer": tokenizer})


# data.source -> the builder's name in latent_encode.BUILDERS.
_BUILDER_OF_SOURCE = {"toy_world": "toy_world", "csgo": "csgo_dust2",
                      "captioned_video": "captioned_video"}


def _builder(cfg: RunConfig, tfds_dir: str):
  """The configured source's TFDS builder, writing into tfds_dir: the toy world's config
  from `data.toy_world`, the others' from `data.builder_config`."""
  import importlib
  from data_pipelines import latent_encode
  data = cfg.data
  source = data.source
  if source not in _BUILDER_OF_SOURCE:
    raise prepared.NotPreparedError("data.source", f"{source!r} has no preparation; one of "
                                    f"{PREPARED_SOURCES}")
  name = _BUILDER_OF_SOURCE[source]
  module, cls_name = latent_encode.BUILDERS[name]
  builder_cls = getattr(importlib.import_module(module), cls_name)
  fields = data.toy_world if source == "toy_world" else data.builder_config
  config = _builder_config(type(builder_cls.BUILDER_CONFIGS[0]), fields.to_dict())
  return latent_encode.load_builder(name, config, tfds_dir)


def _builder_config(cls, value: dict[str, Any]):
  """A builder config from a mapping: {name} alone selects a registered config (none: the
  builder's default); more of `cls`'s fields build a custom one, so an experiment can ask
  for the frame size and clip length it trains on."""
  fields = dict(value)
  name = fields.pop("name", None)
  if not fields:
    return name
  return cls(name=name or "custom", description="from the experiment config", **fields)


def _sports_placement(data: config_lib.DataConfig) -> str | None:
  """The caption placement of a sports-mode toy world (None for dense data)."""
  from data_pipelines import toy_world_tfds
  config = toy_world_tfds.resolve_config(data.toy_world)
  if config is None or config.caption_mode != "sports":
    return None
  return config.caption_placement


def vae_config(cfg: RunConfig | Any) -> ml_collections.ConfigDict:
  """The toy world's VAE experiment config (`data.vae`), with the flow model's latent
  channels: the spatial size follows from the VAE's downsampling of the frames and is
  checked against model.latent_shape downstream. A ConfigDict: the VAE trainer's own
  config (`tv2tv_jax.vae.train`, a command of its own) and what its config.json records."""
  cfg = config_lib.as_run_config(cfg)
  vcfg = ml_collections.ConfigDict(cfg.data.vae.to_dict())
  if "vae" in vcfg:
    vcfg.vae.latent_channels = int(cfg.exp.model.latent_shape[-1])
  return vcfg


def check_config(cfg: RunConfig | Any) -> None:
  """Raises config.ConfigError naming the field when the configured preparation cannot
  run: before any stage runs, since a VAE config that cannot train would otherwise fail
  after the dataset is built, and a missing input after minutes of work."""
  cfg = config_lib.as_run_config(cfg)
  data = cfg.data
  source = data.source
  if source not in PREPARED_SOURCES:
    raise config_lib.ConfigError("data.source", f"{source!r} needs no preparation; "
                                 f"preparation knows {PREPARED_SOURCES}")
  own_toy_vae = source == "toy_world" and data.vae_kind == "own"
  if own_toy_vae:
    config_lib.check_vae_section(vae_config(cfg), "data.vae")
  for field in ("manual_dir",) * (source != "toy_world") + ("vae_dir",) * (not own_toy_vae):
    if not getattr(data, field) or not os.path.isdir(getattr(data, field)):
      what = ("" if field == "manual_dir" or data.vae_kind == "own" else
              f" of {data.vae_kind} weights in the diffusers layout")
      raise config_lib.ConfigError(f"data.{field}", f"must be an existing folder{what} for "
                                   f"data.source={source!r}, got {getattr(data, field)!r}")
  if data.vae_kind != "own":
    _check_pretrained(cfg)
  if source == "toy_world":
    return
  path = tokenizer_source(cfg)
  if path and not os.path.isfile(path):
    raise config_lib.ConfigError("data.tokenizer_path", f"{path} is not a file (set "
                                 f"data.tokenizer_path, or init.llama_dir holding one)")


def _check_pretrained(cfg: RunConfig) -> None:
  """The pretrained tokenizer's config.json against the run: it must be the kind's
  diffusers class, give the model's latent channels, and publish statistics when asked
  to use them. Reads config.json only (the weights are converted by the vae stage)."""
  from tv2tv_jax.vae import convert, pretrained, tokenizer_store
  data = cfg.data
  if data.vae_kind not in pretrained.KINDS:
    raise config_lib.ConfigError("data.vae_kind", f"{data.vae_kind!r} is not built in this "
                                 f"version; pretrained tokenizers: {pretrained.KINDS}")
  class_name = pretrained.class_name(data.vae_kind)
  try:
    raw = convert.read_config(data.vae_dir, class_name)
  except convert.PretrainedVAEError as e:
    raise config_lib.ConfigError("data.vae_dir", str(e)) from e
  tok_cfg = pretrained.config_type(data.vae_kind).from_diffusers(raw)
  if tok_cfg.temporal_compression_ratio != 4:
    raise config_lib.ConfigError("data.vae_dir", f"holds a {data.vae_kind} tokenizer with "
                                 f"{tok_cfg.temporal_compression_ratio}x temporal compression; "
                                 "a TV2TV chunk is 4 frames, one latent frame (use a 4x one, "
                                 "e.g. Cosmos CV4x8x8)")
  channels = int(cfg.exp.model.latent_shape[-1])
  if tok_cfg.latent_channels != channels:
    raise config_lib.ConfigError("model.latent_shape", f"has {channels} channels, but the "
                                 f"{data.vae_kind} tokenizer in {data.vae_dir} makes "
                                 f"{tok_cfg.latent_channels}")
  if data.vae_stats == "published":
    try:
      tokenizer_store.published_stats(data.vae_dir, class_name, channels)
    except ValueError as e:
      raise config_lib.ConfigError("data.vae_stats", f"'published': {e}") from e


def _done(data_dir: str, stage: str, settings: dict[str, Any]) -> dict[str, Any] | None:
  path = os.path.join(data_dir, f"stage_{stage}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    marker = json.load(f)
  return marker if marker.get("settings") == settings else None


def _mark(data_dir: str, stage: str, settings: dict[str, Any], **info) -> dict[str, Any]:
  marker = {"settings": settings, **_jsonable(info)}
  tmp = os.path.join(data_dir, f".stage_{stage}.json.tmp")
  with open(tmp, "w") as f:
    json.dump(marker, f, indent=2)
  os.replace(tmp, os.path.join(data_dir, f"stage_{stage}.json"))  # atomic: no half markers
  return marker


# Each stage's output inside the data directory.
_OUTPUTS = {"tfds": "tfds", "vae": VAE, "latents": LATENTS, "tokenizer": TOKENIZER}


def _supersede(data_dir: str, stage: str, stamp: str, log: Callable[[str], None]) -> None:
  """Moves a finished stage's output and marker to superseded/<stamp>/ before a rebuild:
  checkpoints trained on them may still need them (never deleted here)."""
  dst = os.path.join(data_dir, "superseded", stamp)
  os.makedirs(dst, exist_ok=True)
  for name in (_OUTPUTS[stage], f"stage_{stage}.json"):
    src = os.path.join(data_dir, name)
    if os.path.exists(src):
      os.replace(src, os.path.join(dst, name))
  log(f"data stage {stage}: its settings changed; the previous build moved to {dst}")


def adopt_stage(data_dir: str, source_dir: str, stage: str, cfg: RunConfig | Any,
                log: Callable[[str], None] = print) -> bool:
  """Copies a finished stage (output and marker) from another data directory, so that
  `prepare` finds it cached instead of building it again.

  Only when `source_dir` finished `stage` with exactly the settings `cfg` gives it (which
  nest every upstream stage's settings) and `data_dir` holds neither that stage's output
  nor its marker (a half-built or differently-built stage there is left alone). E.g. two
  toy worlds whose captions differ share the VAE, which trains on frames only.
  Returns whether it copied.
  """
  settings = stage_settings(cfg)[stage]
  src_out, dst_out = (os.path.join(d, _OUTPUTS[stage]) for d in (source_dir, data_dir))
  marker = os.path.join(data_dir, f"stage_{stage}.json")
  if (os.path.abspath(source_dir) == os.path.abspath(data_dir)
      or _done(source_dir, stage, settings) is None
      or os.path.exists(dst_out) or os.path.exists(marker)):
    return False
  os.makedirs(data_dir, exist_ok=True)
  tmp = dst_out + ".adopting"
  shutil.rmtree(tmp, ignore_errors=True)
  if os.path.isdir(src_out):
    shutil.copytree(src_out, tmp)
  else:
    shutil.copyfile(src_out, tmp)
  os.replace(tmp, dst_out)
  # The marker last, as a build writes it: a copy cut short is never taken for finished.
  shutil.copyfile(os.path.join(source_dir, f"stage_{stage}.json"), marker + ".tmp")
  os.replace(marker + ".tmp", marker)
  log(f"data stage {stage}: copied from {source_dir} (same settings)")
  return True

def _train_tokenizer(data_dir: str, cfg: RunConfig, path: str) -> int:
  from data_pipelines import latent_dataset, tokenizer as tokenizer_lib
  data, model = cfg.data, cfg.exp.model
  src = latent_dataset.data_source(os.path.join(data_dir, LATENTS), "train")
  texts = [t for i in range(len(src)) for t in latent_dataset.parse_record(src[i])["texts"] if t]
  corpus = texts + [data.prompt]
  if data.source == "toy_world":
    corpus = tokenizer_lib.toy_world_corpus() + corpus  # every action, seen or not
  tok = tokenizer_lib.train_bpe([t for t in corpus if t], int(model.vocab_size),
                                byte_level=False)
  tok.save(path)
  return tok.vocab_size


def _clear_unfinished(data_dir: str, stage: str, settings: dict[str, Any]) -> None:
  """Removes what an unfinished build of `stage` left, unless it can be resumed.

  TFDS would reuse a half-built dataset of the same name and version with the old sizes,
  and a copied VAE would nest into the old copy: both go. An unfinished encode resumes
  (finished shards are kept) only if it was started with these very settings, which it
  records in latents/.prepare_settings.json before it writes anything.
  """
  out = os.path.join(data_dir, _OUTPUTS[stage])
  if not os.path.isdir(out):
    return
  if stage == "latents":
    path = os.path.join(out, ".prepare_settings.json")
    if os.path.exists(path):
      with open(path) as f:
        if json.load(f) == settings:
          return
  shutil.rmtree(out)


def _build(stage: str, data_dir: str, cfg: RunConfig, log: Callable[[str], None],
           process_index: int = 0, process_count: int = 1) -> dict[str, Any]:
  """Builds one stage into data_dir; returns what its marker records besides settings.
  Only the latents stage is shared by every process (each encodes its own shards)."""
  from data_pipelines import latent_dataset, latent_encode
  data = cfg.data
  tfds_dir, vae_dir = os.path.join(data_dir, "tfds"), os.path.join(data_dir, VAE)
  if stage == "tfds":
    import tensorflow_datasets as tfds  # local: heavy import
    builder = _builder(cfg, tfds_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=data.manual_dir or None))
    return {"splits": {k: v.num_examples for k, v in builder.info.splits.items()}}
  if stage == "vae":
    if data.vae_kind != "own":
      return _convert_pretrained(cfg, _builder(cfg, tfds_dir), vae_dir, log)
    if data.source == "toy_world":
      from tv2tv_jax.vae import train as vae_train
      return {"eval": vae_train.train_vae(vae_config(cfg), vae_dir, log=log)["eval"]}
    shutil.copytree(data.vae_dir, vae_dir)
    return {"copied_from": os.path.abspath(data.vae_dir)}
  if stage == "latents":
    out = os.path.join(data_dir, LATENTS)
    if process_index == 0:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, ".prepare_settings.json"), "w") as f:
        json.dump(stage_settings(cfg)["latents"], f)
    _barrier("latents_begin", process_count)
    meta = latent_encode.encode_tfds(_builder(cfg, tfds_dir), latent_dataset.vae_encoder(vae_dir),
                                     out, process_index=process_index,
                                     process_count=process_count, log=log)
    return {"splits": {s: {"num_records": v["num_records"], "skipped": len(v["skipped"])}
                       for s, v in meta["splits"].items()}}
  path, source = os.path.join(data_dir, TOKENIZER), tokenizer_source(cfg)
  if source:
    shutil.copyfile(source, path)
    return {"copied_from": os.path.abspath(source)}
  return {"vocab_size": _train_tokenizer(data_dir, cfg, path)}


def _convert_pretrained(cfg: RunConfig, builder, vae_dir: str,
                        log: Callable[[str], None]) -> dict[str, Any]:
  """The vae stage for a pretrained tokenizer: converts `data.vae_dir`'s weights, checks
  the latents it makes of this dataset's frames against model.latent_shape, sets the
  latent statistics (`data.vae_stats`) and saves it all into vae_dir."""
  import dataclasses

  import numpy as np

  from data_pipelines import latent_dataset, latent_encode
  from tv2tv_jax.vae import pretrained, tokenizer_store, video_tokenizer
  data, model = cfg.data, cfg.exp.model
  tok = pretrained.load_pretrained_tokenizer(data.vae_kind, data.vae_dir,
                                             tile_latents=data.vae_tile_latents or None)
  num_frames = 1 + 4 * latent_encode.builder_num_chunks(builder)
  frame_shape = builder.info.features["frames"].shape  # (1+4k, H, W, 3)
  latent_shape = tok.latent_shape(num_frames, *frame_shape[1:3])
  if tuple(latent_shape[1:]) != tuple(model.latent_shape):
    raise config_lib.ConfigError("model.latent_shape", f"is {tuple(model.latent_shape)}, but "
                                 f"the {data.vae_kind} tokenizer makes {latent_shape[1:]} "
                                 f"latents of this dataset's {frame_shape[1]}x"
                                 f"{frame_shape[2]} frames")
  if data.vae_stats == "published":
    stats = tokenizer_store.published_stats(data.vae_dir, pretrained.class_name(data.vae_kind),
                                            tok.latent_channels)
  else:
    source = builder.as_data_source(split="train")
    clips = []
    for i in range(len(source)):
      if len(clips) == data.vae_stats_clips:
        break
      example = source[i]  # one read: a TFDS data source decodes on every access
      if latent_dataset.clip_fields(example, num_frames, i)[1] is None:
        # (a clip the encode would skip is not counted either)
        clips.append(video_tokenizer.to_float(np.asarray(example["frames"])))
    if not clips:
      raise ValueError(f"{builder.name}: no training clip of {num_frames} frames to compute "
                       "the latent statistics from")
    batches = [np.stack(clips[j:j + 4]) for j in range(0, len(clips), 4)]
    stats = pretrained.compute_stats(tok, batches)
    log(f"data stage vae: {data.vae_kind} latent statistics over {len(clips)} training clips")
  tokenizer_store.save_pretrained(vae_dir, dataclasses.replace(tok, stats=stats),
                                  source=os.path.abspath(data.vae_dir))
  return {"kind": data.vae_kind, "converted_from": os.path.abspath(data.vae_dir),
          "latent_shape": list(latent_shape), "stats": stats.to_json()}


def _barrier(name: str, process_count: int) -> None:
  if process_count > 1:
    from jax.experimental import multihost_utils  # local: only several processes need it
    multihost_utils.sync_global_devices(f"prepare_{name}")


def prepare(data_dir: str, cfg: RunConfig | Any, log: Callable[[str], None] = print, *,
            process_index: int = 0, process_count: int = 1) -> dict[str, Any]:
  """Runs the missing stages (module docstring) into `data_dir` (created).

  With several processes (every host of a pod running the same command), process 0 runs
  the tfds, vae and tokenizer stages and holds the directory's lock; the latent encode is
  shared, each process encoding its own shards (`latent_encode`); the others wait at
  barriers. The directory must be one every process sees.

  Args:
    cfg: the run's `config.RunConfig` (sections data, model, init), or a raw config.
    process_index / process_count: this process among those preparing together.
  Returns:
    {stage: its marker} for every stage (process 0; the others return {}).
  Raises:
    config.ConfigError naming the field, before any stage runs, when the configured
    preparation cannot run (`check_config`); run_lock.WorkdirLockedError when another
    live process prepares the same directory.
  """
  from tv2tv_jax import run_lock
  cfg = config_lib.as_run_config(cfg)
  check_config(cfg)
  if process_index:
    return _prepare_stages(data_dir, cfg, log, process_index, process_count)
  os.makedirs(data_dir, exist_ok=True)
  # One preparer per data directory (several runs may share one): <data_dir>/LOCK.
  with run_lock.WorkdirLock(data_dir, log):
    return _prepare_stages(data_dir, cfg, log, process_index, process_count)


def _prepare_stages(data_dir: str, cfg: RunConfig, log: Callable[[str], None], process_index: int,
                    process_count: int) -> dict[str, Any]:
  settings = stage_settings(cfg)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  markers = {}
  for stage in STAGES:
    shared = stage == "latents"
    # Every process learns from the markers (a directory they all see) whether the stage
    # is done: the ones before it were finished by process 0 ahead of the barrier.
    _barrier(f"{stage}_check", process_count)
    # Settings nest their upstream stages' settings, so a changed stage invalidates
    # exactly the stages downstream of it.
    marker = _done(data_dir, stage, settings[stage])
    if marker is not None:
      log(f"data stage {stage}: cached ({marker.get('seconds', 0):.1f}s when built)")
      markers[stage] = marker
      continue
    if process_index and not shared:
      continue
    t0 = time.time()
    if process_index == 0:
      if os.path.exists(os.path.join(data_dir, f"stage_{stage}.json")):
        _supersede(data_dir, stage, stamp, log)  # finished with other settings: keep it
      else:
        _clear_unfinished(data_dir, stage, settings[stage])
    info = _build(stage, data_dir, cfg, log, process_index, process_count)
    if process_index:
      continue
    info["seconds"] = time.time() - t0
    markers[stage] = _mark(data_dir, stage, settings[stage], **info)
    log(f"data stage {stage}: built in {info['seconds']:.1f}s "
        f"{json.dumps({k: v for k, v in info.items() if k != 'seconds'})}")
  _barrier("done", process_count)
  return markers if process_index == 0 else {}


def stage_timings(data_dir: str) -> dict[str, float]:
  """Seconds each finished stage took when it was built."""
  out = {}
  for stage in STAGES:
    path = os.path.join(data_dir, f"stage_{stage}.json")
    if os.path.exists(path):
      with open(path) as f:
        out[stage] = json.load(f).get("seconds")
  return out
