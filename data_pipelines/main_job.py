r"""The toy-world main job's data stages, cached in a data directory.

    build the toy-world TFDS dataset -> train the VAE -> encode latents -> train a tokenizer

`prepare_toy_world(data_dir, cfg)` runs the stages that are missing and returns the
`grain_pipeline.PipelineConfig` the trainer's input stream reads. `tv2tv_jax.inputs`
calls it when `data.source = 'toy_world'`, so the README command runs the whole chain:

    python -m tv2tv_jax.main --config=experiments/toy_world.py:quick --workdir=/tmp/tv2tv_quick

(the data directory defaults to <workdir>/toy_world_data).

Layout of the data directory; each stage's marker is written last and records the
stage's settings, so a finished stage is skipped and a stage whose settings changed (or
whose upstream stage was redone) is run again:

  tfds/           toy_world TFDS dataset (ArrayRecord)       marker: stage_tfds.json
  vae/            trained VAE (tv2tv_jax.vae.train layout)     marker: stage_vae.json (+ eval PSNR)
  latents/        latent dataset (data_pipelines.latent_dataset) marker: stage_latents.json
  tokenizer.json  character-level BPE on the dataset's texts   marker: stage_tokenizer.json
  superseded/<time>/  what a rebuild replaced (stage outputs and markers), never deleted:
                  checkpoints trained on it may still need it

`data_identity(data_dir)` gives short hashes of what a trained run depends on; the
trainer stores them in every checkpoint and refuses to resume, evaluate or sample on
data whose hashes differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

from data_pipelines import grain_pipeline

STAGES = ("tfds", "vae", "latents", "tokenizer")


def _section(cfg: Any, name: str) -> dict[str, Any]:
  sec = cfg.get(name) if hasattr(cfg, "get") else None
  if sec is None:
    return {}
  return sec.to_dict() if hasattr(sec, "to_dict") else dict(sec)


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, default=str))


def stage_settings(cfg: Any) -> dict[str, dict[str, Any]]:
  """What each stage's output depends on (its own settings and its upstream stages')."""
  data, model = _section(cfg, "data"), _section(cfg, "model")
  tfds = {"toy_world": data.get("toy_world") or {}}
  placement = _sports_placement(data)
  if placement is not None:
    # Sports captions moved from after to before the chunks they describe, and a config
    # may leave the placement to the default (or name a registered config): a stage
    # built under the old default recorded no placement and must not pass for a new
    # one. Dense settings stay as they were, so their cached stages stay valid.
    tfds["caption_placement"] = placement
  # The VAE trains on generate_clip seeds of its own config, not on the TFDS splits, so a
  # resized dataset keeps the trained VAE. Its resolved config (variant, overrides and
  # latent channels applied), not only the variant's name: a variant whose recipe changed
  # must not reuse the VAE trained with the old one.
  vae = {"config": _vae_config(cfg).to_dict()}
  latents = {"tfds": tfds, "vae": vae}
  tokenizer = {"latents": latents, "vocab_size": int(model["vocab_size"]),
               "prompt": data.get("prompt", "")}
  return _jsonable({"tfds": tfds, "vae": vae, "latents": latents, "tokenizer": tokenizer})


def _builder_config(data: dict[str, Any]):
  from data_pipelines import toy_world_tfds
  tw = dict(data.get("toy_world") or {})
  name = tw.pop("name", "custom")
  if not tw:  # a registered config by name
    return name
  return toy_world_tfds.ToyWorldBuilderConfig(name=name, description="main job", **tw)


def _sports_placement(data: dict[str, Any]) -> str | None:
  """The caption placement of a sports-mode toy world (None for dense data)."""
  from data_pipelines import toy_world_tfds
  builder = _builder_config(data)
  if isinstance(builder, str):  # a registered config, by name
    builder = next((c for c in toy_world_tfds.ToyWorld.BUILDER_CONFIGS if c.name == builder),
                   None)
  if builder is None or builder.caption_mode != "sports":
    return None
  return builder.caption_placement


def _vae_config(cfg: Any):
  from experiments import vae_toy_world
  data, model = _section(cfg, "data"), _section(cfg, "model")
  vcfg = vae_toy_world.get_config(data.get("vae_variant", "quick"))
  # The flow model's latent channels decide the VAE's (the spatial size is fixed by the VAE's
  # 8x downsampling of 64x64 frames and checked against model.latent_shape downstream).
  vcfg.vae.latent_channels = int(model["latent_shape"][-1])
  for section, values in (data.get("vae_overrides") or {}).items():
    vcfg[section].update(values)  # e.g. {"train": {"num_steps": 300}}
  return vcfg


def check_vae_config(cfg: Any) -> None:
  """Raises config.ConfigError, named `data.vae_overrides.<field>`, when the VAE config
  that `data.vae_variant` and `data.vae_overrides` resolve to cannot train (checked before
  any stage runs: it would otherwise surface after the dataset is built, named as the
  VAE's own field)."""
  from tv2tv_jax import config as config_lib
  from tv2tv_jax.vae import train as vae_train
  try:
    vae_train.configs_from_config_dict(stage_settings(cfg)["vae"]["config"])
  except config_lib.ConfigError as e:
    raise config_lib.vae_override_error(e, _section(cfg, "data")) from e


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
_OUTPUTS = {"tfds": "tfds", "vae": "vae", "latents": "latents", "tokenizer": "tokenizer.json"}


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


def adopt_stage(data_dir: str, source_dir: str, stage: str, cfg: Any,
                log: Callable[[str], None] = print) -> bool:
  """Copies a finished stage (output and marker) from another data directory, so that
  `prepare_toy_world` finds it cached instead of building it again.

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


def _hash_files(paths: list[str], root: str, content: bool) -> str:
  h = hashlib.sha256()
  for path in sorted(paths):
    h.update(os.path.relpath(path, root).encode() + b"\0")
    if content:
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
    else:
      h.update(str(os.path.getsize(path)).encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


def data_identity(data_dir: str) -> dict[str, str]:
  """{part: 16-hex hash} of the prepared data a trained run depends on.

  tokenizer: tokenizer.json's bytes (token ids); vae: vae/vae_config.json and
  vae/params.msgpack (what a latent means); latents: latents/*.json (metadata and
  normalisation statistics) by content and the record files by name and size (the
  records are not read: cheap on large datasets). A part whose files are absent is left
  out.
  """
  parts = {
      "tokenizer": ([os.path.join(data_dir, "tokenizer.json")], True),
      "vae": ([os.path.join(data_dir, "vae", n) for n in ("vae_config.json",
                                                          "params.msgpack")], True),
  }
  latent_dir = os.path.join(data_dir, "latents")
  names = sorted(os.listdir(latent_dir)) if os.path.isdir(latent_dir) else []
  out = {k: _hash_files(p, data_dir, content) for k, (p, content) in parts.items()
         if all(os.path.exists(x) for x in p)}
  if names:
    paths = [os.path.join(latent_dir, n) for n in names]
    meta = [p for p in paths if p.endswith(".json")]
    records = [p for p in paths if not p.endswith(".json")]
    out["latents"] = hashlib.sha256((_hash_files(meta, data_dir, True)
                                     + _hash_files(records, data_dir, False)).encode()
                                    ).hexdigest()[:16]
  return out


def _train_tokenizer(data_dir: str, cfg: Any, path: str) -> int:
  from data_pipelines import latent_dataset, tokenizer as tokenizer_lib
  data, model = _section(cfg, "data"), _section(cfg, "model")
  latent_dir = os.path.join(data_dir, "latents")
  src = latent_dataset.data_source(latent_dir, "train")
  texts = [t for i in range(len(src)) for t in latent_dataset.parse_record(src[i])["texts"] if t]
  corpus = tokenizer_lib.toy_world_corpus() + texts + [data.get("prompt", "")]
  tok = tokenizer_lib.train_bpe([t for t in corpus if t], int(model["vocab_size"]),
                                byte_level=False)
  tok.save(path)
  return tok.vocab_size


def prepare_toy_world(data_dir: str, cfg: Any,
                      log: Callable[[str], None] = print) -> grain_pipeline.PipelineConfig:
  """Runs the missing stages (module docstring) into `data_dir`; returns the pipeline config.

  Args:
    data_dir: the stage cache directory (created).
    cfg: the experiment ConfigDict (sections data and model).
  """
  from data_pipelines import latent_dataset, toy_world_tfds
  from tv2tv_jax.vae import train as vae_train

  check_vae_config(cfg)
  os.makedirs(data_dir, exist_ok=True)
  data = _section(cfg, "data")
  settings = stage_settings(cfg)
  tfds_dir, vae_dir = os.path.join(data_dir, "tfds"), os.path.join(data_dir, "vae")
  latent_dir, tok_path = os.path.join(data_dir, "latents"), os.path.join(data_dir,
                                                                         "tokenizer.json")
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for stage in STAGES:
    # Settings nest their upstream stages' settings, so a changed stage invalidates
    # exactly the stages downstream of it.
    marker = _done(data_dir, stage, settings[stage])
    if marker is not None:
      log(f"data stage {stage}: cached ({marker.get('seconds', 0):.1f}s when built)")
      continue
    t0 = time.time()
    info: dict[str, Any] = {}
    if os.path.exists(os.path.join(data_dir, f"stage_{stage}.json")):
      _supersede(data_dir, stage, stamp, log)  # finished with other settings: keep it
    elif stage in ("tfds", "latents"):
      # An unfinished build must go: TFDS would otherwise reuse a prepared dataset of the
      # same name and version with the old sizes.
      shutil.rmtree(tfds_dir if stage == "tfds" else latent_dir, ignore_errors=True)
    if stage == "tfds":
      builder = toy_world_tfds.ToyWorld(config=_builder_config(data), data_dir=tfds_dir)
      builder.download_and_prepare()
      info["splits"] = {k: v.num_examples for k, v in builder.info.splits.items()}
    elif stage == "vae":
      summary = vae_train.train(_vae_config(cfg), vae_dir, log=log)
      info["eval"] = summary["eval"]
    elif stage == "latents":
      meta = latent_dataset.build_latent_dataset(tfds_dir, _builder_config(data), vae_dir,
                                                 latent_dir, log=log)
      info["splits"] = {s: {"num_records": v["num_records"], "skipped": len(v["skipped"])}
                        for s, v in meta["splits"].items()}
    else:
      info["vocab_size"] = _train_tokenizer(data_dir, cfg, tok_path)
    info["seconds"] = time.time() - t0
    _mark(data_dir, stage, settings[stage], **info)
    log(f"data stage {stage}: built in {info['seconds']:.1f}s "
        f"{json.dumps({k: v for k, v in info.items() if k != 'seconds'})}")
  return pipeline_config(data_dir, cfg)


def pipeline_config(data_dir: str, cfg: Any) -> grain_pipeline.PipelineConfig:
  """The PipelineConfig for a prepared data directory and the config's `data` knobs."""
  data = _section(cfg, "data")
  return grain_pipeline.PipelineConfig(
      latent_dir=os.path.join(data_dir, "latents"),
      tokenizer_path=os.path.join(data_dir, "tokenizer.json"),
      prompt=data.get("prompt", ""), shuffle_seed=int(data.get("shuffle_seed", 0)),
      num_workers=int(data.get("num_workers", 0)),
      caption_every=int(data.get("caption_every", 1)),
      wrong_caption_rate=float(data.get("wrong_caption_rate", 0.0)),
      plan_drop_rate=float(data.get("plan_drop_rate", 0.0)),
      max_open=int(data.get("max_open", 4)), window=int(data.get("window", 64)))


def stage_timings(data_dir: str) -> dict[str, float]:
  """Seconds each finished stage took when it was built."""
  out = {}
  for stage in STAGES:
    path = os.path.join(data_dir, f"stage_{stage}.json")
    if os.path.exists(path):
      with open(path) as f:
        out[stage] = json.load(f).get("seconds")
  return out
