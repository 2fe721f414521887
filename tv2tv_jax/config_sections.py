"""The run's config sections beside the Experiment: data, mesh, sharding rules, init and
sample, each a frozen dataclass with its builder (the one definition of each
default). `config.run_config_from_config_dict` assembles them into a `RunConfig`;
`tv2tv_jax.config` re-exports every name here, which is how the code imports them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from tv2tv_jax import axes
from tv2tv_jax.config_fields import (ConfigError, FrozenMapping, build_section,
                                     did_you_mean, plain_dict, require, require_count)

# `data.source` values `inputs.make_train_input` reads.
# data.source: 'synthetic' needs no data; the others read a prepared data directory
# (data_pipelines.prepared), built by `python -m tv2tv_jax.prepare`.
# Recorded video (not the procedural toy world).
REAL_SOURCES = ("csgo", "captioned_video")
PREPARED_SOURCES = ("toy_world",) + REAL_SOURCES
DATA_SOURCES = ("synthetic",) + PREPARED_SOURCES
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data` section: where training batches come from (`inputs`, `data_pipelines`).

  source: `DATA_SOURCES`; 'synthetic' needs no data, the others read the prepared
    directory `data_dir` ('' = a folder of the work directory,
    `prepared.default_data_dir`), built by `python -m tv2tv_jax.prepare`.
  synthetic_batches / max_examples_per_row / max_text_len: the synthetic stream (distinct
    batches to cycle through, 0 = a fresh batch every step; examples and text tokens per
    example in a random row).
  toy_world / vae: the toy world's TFDS builder config ({name} of a registered one, or
    custom sizes) and VAE recipe (an experiments/vae_toy_world.py config).
  builder_config / manual_dir / vae_dir / tokenizer_path: the real sources' TFDS builder
    config, raw files, trained VAE to copy, and tokenizer.json to copy ('' with no
    init.llama_dir: one is trained on the dataset's texts).
  vae_kind: the video tokenizer, `VAE_KINDS`: 'own' (our VAE: trained on the toy world
    from `vae`, or copied from `vae_dir` for the other sources), or a pretrained one
    ('cosmos', 'wan') converted from the diffusers weights directory `vae_dir`, for any
    source.
  vae_stats / vae_stats_clips: a pretrained tokenizer's latent statistics: 'data' (per
    channel over the first `vae_stats_clips` training clips) or 'published' (config.json's
    latents_mean / latents_std).
  vae_tile_latents: a pretrained tokenizer encodes and decodes in temporal tiles of this
    many latent frames (the same latents; bounds memory on long clips); 0 = whole clips.
  prompt ... window: the Grain pipeline's knobs (`grain_pipeline.PipelineConfig`).
  """
  source: str = "synthetic"
  data_dir: str = ""
  synthetic_batches: int = 0
  max_examples_per_row: int = 3
  max_text_len: int = 3
  toy_world: FrozenMapping = FrozenMapping()
  vae: FrozenMapping = FrozenMapping()
  builder_config: FrozenMapping = FrozenMapping()
  manual_dir: str = ""
  vae_dir: str = ""
  vae_kind: str = "own"
  vae_stats: str = "data"
  vae_stats_clips: int = 64
  vae_tile_latents: int = 0
  tokenizer_path: str = ""
  prompt: str = ""
  shuffle_seed: int = 0
  num_workers: int = 0
  caption_every: int = 1
  wrong_caption_rate: float = 0.0
  plan_drop_rate: float = 0.0
  max_open: int = 4
  window: int = 64


# `data` fields read as counts (minimum, meaning) and as rates.
_DATA_COUNTS = {
    "synthetic_batches": (0, " (0: a fresh batch every step)"),
    "max_examples_per_row": (1, ""),
    "max_text_len": (0, ""),
    "shuffle_seed": (0, ""),
    "num_workers": (0, " (0: in this process)"),
    "caption_every": (1, ""),
    "max_open": (1, ""),
    "window": (1, ""),
    "vae_stats_clips": (1, ""),
    "vae_tile_latents": (0, " (0: whole clips)"),
}
# data.vae_kind: 'own' and the pretrained tokenizers of `tv2tv_jax.vae.pretrained`
# (test_config checks the two lists agree; the registry imports JAX, this module does not).
VAE_KINDS = ("own", "cosmos", "wan")
VAE_STATS = ("data", "published")
_DATA_RATES = ("wrong_caption_rate", "plan_drop_rate")
# Fields older configs (and the checkpoints that saved them) hold, read by nothing now:
# accepted and dropped, so that those runs still load (`data.vae` replaced the first two).
_RETIRED_DATA_FIELDS = ("vae_variant", "vae_overrides", "tfds_name")
_NESTED_DATA_FIELDS = ("toy_world", "vae", "builder_config")


def data_config(values: Any) -> DataConfig:
  """The `data` section (a mapping, None, or a DataConfig: returned as is), checked.

  The input streams read these fields only when they start (after preparation, which
  can take minutes), and a bad count would fail there in numpy. The toy world's VAE
  recipe (`data.vae`) is checked as the VAE's own configs would check it, named under
  `data.vae`.
  """
  if isinstance(values, DataConfig):
    return values
  values = plain_dict(values)
  for name in _RETIRED_DATA_FIELDS:
    values.pop(name, None)
  for name in _NESTED_DATA_FIELDS:
    if name in values:
      values[name] = FrozenMapping(values[name])
  d = build_section(DataConfig, "data", values)
  require(d.source in DATA_SOURCES, "data.source",
          f"one of {DATA_SOURCES}, got {d.source!r}")
  for name, (minimum, meaning) in _DATA_COUNTS.items():
    require_count(getattr(d, name), f"data.{name}", minimum, meaning)
  for name in _DATA_RATES:
    value = getattr(d, name)
    require(isinstance(value, numbers.Real) and 0.0 <= value <= 1.0, f"data.{name}",
            f"must be a rate in [0, 1], got {value!r}")
  require(d.vae_kind in VAE_KINDS, "data.vae_kind",
          f"one of {VAE_KINDS}, got {d.vae_kind!r}{did_you_mean(d.vae_kind, VAE_KINDS)}")
  require(d.vae_stats in VAE_STATS, "data.vae_stats",
          f"one of {VAE_STATS}, got {d.vae_stats!r}")
  if d.source == "toy_world" and d.vae and d.vae_kind == "own":
    check_vae_section(d.vae, "data.vae")
  return d


MESH_AXES = ("data", "fsdp", "tensor", "sequence")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The `mesh` section: device mesh axis sizes (`sharding` says what each axis does);
  -1 takes the devices the other axes leave (one axis at most)."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1


def mesh_config(values: Any) -> MeshConfig:
  """The `mesh` section (a mapping, None, or a MeshConfig: returned as is). Sizes are
  checked against the devices when the mesh is made (`sharding.resolve_mesh_shape`)."""
  if isinstance(values, MeshConfig):
    return values
  values = plain_dict(values)
  unknown = sorted(set(values) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"mesh.{unknown[0]}", f"unknown mesh axis"
                      f"{did_you_mean(unknown[0], MESH_AXES)}; the axes are "
                      f"{', '.join(MESH_AXES)}")
  return MeshConfig(**values)


# Logical axis -> mesh axis (a name, a tuple of names, or None: replicated).
Rules = tuple[tuple[str, Any], ...]


def sharding_rules(raw: Any) -> Rules:
  """The `sharding_rules` list ([logical axis, mesh axis or list or None] pairs; the
  logical names are `tv2tv_jax.axes`'), checked; None (absent): every axis replicated."""
  if raw is None:
    return axes.REPLICATED_RULES
  logical = axes.PARAM_AXES + axes.ACTIVATION_AXES
  rules = []
  for i, entry in enumerate(raw):
    name, target = entry
    if name not in logical:
      raise ConfigError(f"sharding_rules[{i}]", f"unknown logical axis {name!r}"
                        f"{did_you_mean(name, logical)} (tv2tv_jax/axes.py)")
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    for t in (target if isinstance(target, tuple) else (target,)):
      if t is not None and t not in MESH_AXES:
        raise ConfigError(f"sharding_rules[{i}]", f"{name!r} -> unknown mesh axis {t!r}"
                          f"{did_you_mean(t, MESH_AXES)}; the mesh axes are "
                          f"{', '.join(MESH_AXES)} (or None: replicated)")
    rules.append((name, target))
  return tuple(rules)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """The `init` section: where the weights of a fresh run come from (`llama_init`).

  llama_dir: a Hugging Face Llama-3 checkpoint directory (config.json, *.safetensors) for
    the text tower ('' trains from scratch); video_tower_from_llama: the video tower too.
  """
  llama_dir: str = ""
  video_tower_from_llama: bool = False


def init_config(values: Any) -> InitConfig:
  """The `init` section (a mapping, None, or an InitConfig: returned as is)."""
  if isinstance(values, InitConfig):
    return values
  values = plain_dict(values)
  if values.get("ignore_rope_scaling"):
    # Older configs opted into plain RoPE for Llama-3.1/3.2; the scaling now exists.
    raise ConfigError("init.ignore_rope_scaling", "is no longer supported: llama3 RoPE "
                      "scaling is implemented; set model.rope_type and model.rope_* to the "
                      "checkpoint's (experiments/llama3_common.py does) and drop this field")
  values.pop("ignore_rope_scaling", None)
  return build_section(InitConfig, "init", values)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """The `sample` section: the video `main` generates after training when
  `after_training` (as `python -m tv2tv_jax.generate` would, with these settings):
  `prompt`, `interventions` ("chunk:text" strings forcing chunk texts), `num_chunks`,
  `cfg_scale`, `ode_steps` and `seed`."""
  after_training: bool = False
  prompt: str = ""
  interventions: tuple[str, ...] = ()
  num_chunks: int = 4
  cfg_scale: float = 1.0
  ode_steps: int = 16
  seed: int = 0


def check_vae_section(vae_cfg: Mapping[str, Any], field: str) -> None:
  """Raises ConfigError named `<field>.<section>.<name>` when a VAE experiment config
  (sections `vae` and `train`, as in experiments/vae_toy_world.py) has an unknown section
  or field, or values the VAE's configs refuse.

  The VAE's own configs name their fields `vae.*` / `train.*` (right for a VAE run of its
  own); inside a flow experiment `train.warmup_steps` would read as the flow trainer's
  field, so the name is prefixed.
  """
  # Local: the VAE modules import this one (ConfigError).
  from tv2tv_jax.vae import model as vae_model, train as vae_train
  sections = {"vae": vae_model.VAEConfig, "train": vae_train.VAETrainConfig}
  values = vae_cfg.to_dict() if hasattr(vae_cfg, "to_dict") else dict(vae_cfg)
  for section, fields in values.items():
    require(section in sections, f"{field}.{section}", f"unknown section"
            f"{did_you_mean(section, sections)}; the VAE config has {sorted(sections)}")
    require(hasattr(fields, "keys"), f"{field}.{section}",
            f"must map {sections[section].__name__} fields to values, got {fields!r}")
    names = sorted(f.name for f in dataclasses.fields(sections[section]))
    for key in fields.keys():
      require(key in names, f"{field}.{section}.{key}", f"unknown field"
              f"{did_you_mean(key, names)}; the VAE's {sections[section].__name__} has "
              f"{names}")
  try:
    vae_train.configs_from_config_dict(values)
  except ConfigError as e:
    raise ConfigError(f"{field}.{e.field}", e.message) from e
