"""A prepared data directory: what the trainer, the evaluation and generation read.

`python -m tv2tv_jax.prepare` (`data_pipelines.preparation`) writes it; nothing here
builds, trains or encodes anything. Layout, whatever the source (toy world, CS:GO,
captioned video):

  latents/        the latent dataset (`data_pipelines.latent_dataset`): records of
                  (name, latents f32[1+k, h, w, c] normalised, texts), latent_stats.json,
                  meta.json (written last: its presence marks a complete dataset)
  tokenizer.json  the text tokenizer (trained on the dataset's texts, or a Llama-3 one)
  vae/            the video tokenizer that encoded the latents and decodes samples
                  (`tv2tv_jax.vae.video_tokenizer` layout)
  stage_<name>.json  one marker per finished preparation stage, holding its settings
  superseded/<time>/ what a rebuild replaced, never deleted

`data_identity(data_dir)` gives short hashes of what a trained run depends on; the
trainer stores them in every checkpoint and refuses to resume, evaluate or sample on data
whose hashes differ. `pipeline_config(data_dir, data)` is what the Grain pipeline reads.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Mapping

from data_pipelines import grain_pipeline
from tv2tv_jax import workdirs
from tv2tv_jax import config as config_lib
from tv2tv_jax.config import REAL_SOURCES, ConfigError, DataConfig

LATENTS, TOKENIZER, VAE = "latents", "tokenizer.json", "vae"


class NotPreparedError(ConfigError):
  """The data directory is not (completely) prepared; names what is missing and the
  command that prepares it."""


def default_data_dir(data: DataConfig | Mapping[str, Any],
                     workdir: str | os.PathLike | None) -> str:
  """The prepared directory of a run: `data.data_dir`, else <workdir>/data for the real
  sources (CS:GO, captioned video) and <workdir>/toy_world_data for the toy world and
  synthetic runs (whose generation reads the toy world's tokenizers), else (no work
  directory) <system temp dir>/tv2tv_<source>_data. Always a local path.

  Raises workdirs.WorkdirError naming `data.data_dir` when it (or the default under a
  gs:// work directory) is not local: the preparation stages and the tokenizers use local
  file I/O. `data`: the `data` section (a mapping is parsed, `config.data_config`).
  """
  data = config_lib.data_config(data)
  source = data.source
  if data.data_dir:
    data_dir = os.fspath(data.data_dir)
  elif workdir:
    # The toy world's name predates the other sources; runs and docs refer to it.
    name = "data" if source in REAL_SOURCES else "toy_world_data"
    data_dir = os.fspath(workdirs.as_path(workdir) / name)
  else:
    data_dir = os.path.join(tempfile.gettempdir(), f"tv2tv_{source}_data")
  return workdirs.require_local(
      data_dir, "data.data_dir", "prepared data (defaulting to a folder of the work "
      "directory) is read with local file I/O; set data.data_dir to a local path")


# What training reads (the latents and the tokenizer); generation also needs vae/, which
# `tv2tv_jax.run_state.load_tokenizers` checks with its own named error.
TRAINING_PARTS = (os.path.join(LATENTS, "meta.json"), os.path.join(LATENTS, "latent_stats.json"),
                  TOKENIZER)


def missing_parts(data_dir: str, need=TRAINING_PARTS) -> list[str]:
  """The files of `need` (relative paths) that `data_dir` lacks."""
  return [p for p in need if not os.path.exists(os.path.join(data_dir, p))]


def check_prepared(data_dir: str, field: str = "data.data_dir") -> None:
  """Raises NotPreparedError naming `field`, the missing files and the prepare command
  when `data_dir` lacks what training reads."""
  missing = missing_parts(data_dir)
  if missing:
    raise NotPreparedError(field, f"{data_dir} is not prepared data (it lacks "
                           f"{', '.join(missing)}); run `python -m tv2tv_jax.prepare "
                           f"--config=<the run's config> --data_dir={data_dir}` first")


def hash_files(paths: list[str], root: str, content: bool) -> str:
  """16-hex hash of `paths` (relative to `root`, sorted): by content, or by size only."""
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
      "tokenizer": ([os.path.join(data_dir, TOKENIZER)], True),
      "vae": ([os.path.join(data_dir, VAE, n) for n in ("vae_config.json",
                                                        "params.msgpack")], True),
  }
  latent_dir = os.path.join(data_dir, LATENTS)
  paths = []
  if os.path.isdir(latent_dir):
    # Sharded datasets keep their shards in sub-folders per split: walk them all, but
    # never the temporary files of an encode in progress.
    for root, _, files in os.walk(latent_dir):
      paths += [os.path.join(root, n) for n in files if not n.startswith(".")]
  out = {k: hash_files(p, data_dir, content) for k, (p, content) in parts.items()
         if all(os.path.exists(x) for x in p)}
  if paths:
    meta = [p for p in paths if p.endswith(".json")]
    records = [p for p in paths if not p.endswith(".json")]
    out["latents"] = hashlib.sha256((hash_files(meta, data_dir, True)
                                     + hash_files(records, data_dir, False)).encode()
                                    ).hexdigest()[:16]
  return out


def pipeline_config(data_dir: str, data: DataConfig) -> grain_pipeline.PipelineConfig:
  """The Grain pipeline's config for a prepared directory and the `data` section's knobs
  (`DataConfig` holds their defaults)."""
  return grain_pipeline.PipelineConfig(
      latent_dir=os.path.join(data_dir, LATENTS),
      tokenizer_path=os.path.join(data_dir, TOKENIZER),
      **{f: getattr(data, f) for f in grain_pipeline.PIPELINE_DATA_FIELDS})
