"""Frozen, typed configs built from an experiment's ConfigDict, validated before any compile.

Every section the code reads is a frozen dataclass here, with the one definition of each
default: the Experiment (model, seq, flow, loss, optim, train: what is trained) and the
run's other sections (data, mesh, sharding_rules, init, sample, study; defined in
`config_sections` and importable from here), together a `RunConfig`.
`run_config_from_config_dict` is the one place a ConfigDict (or a saved config.json)
becomes them: the ml-collections ConfigDict stops at the commands that parse flags, and
library modules take these. It checks every constraint that would otherwise surface as a
shape error deep inside a compile, and raises `ConfigError` whose message starts with the
dotted name of the offending field (an unknown one with the closest known name).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tv2tv_jax import axes
# Re-exported: modules and tests name the error, the key check and the run's sections
# through this module (the sections live in config_sections, to keep files small).
from tv2tv_jax.config_fields import (ConfigError, FrozenMapping, build_section,
                                     check_key_path, did_you_mean, plain_dict, require,
                                     require_count)
from tv2tv_jax.config_sections import (DATA_SOURCES, MESH_AXES, PREPARED_SOURCES,
                                       REAL_SOURCES, VAE_KINDS, VAE_STATS, DataConfig,
                                       InitConfig, MeshConfig,
                                       Rules, SampleConfig, check_vae_section, data_config,
                                       init_config, mesh_config, sharding_rules)

LAYOUTS = ("tv2tv", "t2v", "think2v")
ATTENTION_IMPLS = ("xla", "pallas")
# CFG's second branch (`sampling.decoding.SamplerConfig.uncond`); the first is the default.
UNCOND_BRANCHES = ("mask", "plan_free")
# RoPE frequency schemes `layers.rope_inv_freq` implements ("default": plain theta^(-2i/dh)).
ROPE_TYPES = ("default", "llama3")
DTYPES = ("float32", "bfloat16")


def apply_config_arg(cfg: Any, arg: str | None, variants: Mapping[str, Any], *,
                     layouts: tuple[str, ...] = LAYOUTS, default: str = "default") -> None:
  """Applies an experiment file's `get_config(arg)` argument to its ConfigDict `cfg`.

  `arg` is comma-separated parts (e.g. "quick", "quick,t2v", "cpu_test,think2v"): each a
  key of `variants` (a function editing `cfg`, applied in order) or one of `layouts`,
  which sets `cfg.seq.layout`. Empty or None means `default`. Every experiment file that
  takes a variant (and a layout) parses it here, so the accepted spellings and the error
  are the same everywhere; pass `layouts=()` for a file without layouts.

  Raises ValueError naming the unknown part, the variants and the layouts.
  """
  for part in (arg or default).split(","):
    part = part.strip()
    if part in variants:
      variants[part](cfg)
    elif part in layouts:
      cfg["seq"]["layout"] = part
    else:
      raise ValueError(f"unknown config variant {part!r}; variants {sorted(variants)}"
                       + (f", layouts {list(layouts)}" if layouts else ""))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes of the Mixture-of-Transformers and its video in/out U-Nets.

  Both towers share these shapes (the paper's MoT has towers of identical shape).
  """
  vocab_size: int = 512
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 256
  rope_theta: float = 10_000.0
  # RoPE scaling as Llama-3.1/3.2 declare it (rope_type "llama3"; see
  # `layers.rope_inv_freq`). The four rope_* numbers below are read only with "llama3"
  # and must keep their defaults otherwise (so a forgotten rope_type is an error).
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  norm_eps: float = 1e-5
  # One chunk latent, [h, w, c] (a VAE latent frame), and the U-Net around it.
  latent_shape: tuple[int, int, int] = (8, 8, 8)
  patch_size: int = 2
  unet_channels: int = 64
  unet_blocks: int = 1
  unet_groups: int = 8
  time_embed_dim: int = 64
  dtype: str = "float32"  # activations / matmul inputs
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  scan_layers: bool = True
  remat: bool = False

  @property
  def tokens_per_chunk(self) -> int:
    """n: tokens one chunk latent becomes after patchify."""
    h, w, _ = self.latent_shape
    return (h // self.patch_size) * (w // self.patch_size)

  @property
  def rope_scaling(self) -> "Llama3RopeScaling | None":
    """The RoPE frequency scaling `layers.apply_rope` takes; None for plain RoPE."""
    if self.rope_type != "llama3":
      return None
    return Llama3RopeScaling(factor=float(self.rope_factor),
                             low_freq_factor=float(self.rope_low_freq_factor),
                             high_freq_factor=float(self.rope_high_freq_factor),
                             original_max_position_embeddings=int(
                                 self.rope_original_max_position_embeddings))


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1's RoPE frequency scaling (Hugging Face rope_type "llama3").

  Names as in Hugging Face's `rope_parameters`; `layers.rope_inv_freq` applies it.
  Llama-3.1-8B: factor 8, Llama-3.2-3B: factor 32; both low 1, high 4, original 8192.
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class SequenceConfig:
  """Capacity of one packed row and the special token ids.

  A row holds `text_len` text slots, then `num_noisy` noisy chunk copies, then
  `max_chunks` clean chunk copies, each copy `tokens_per_chunk` slots (see
  `tv2tv_jax.sequence`). `noisy_chunks` (0: `max_chunks`) sizes the noisy region
  on its own: a clip with a given first frame has one clean copy more than noisy
  copies, so rows of such clips fill with `noisy_chunks` = `max_chunks` - clips per row.
  """
  layout: str = "tv2tv"
  text_len: int = 128
  max_chunks: int = 8
  noisy_chunks: int = 0
  pad_id: int = 0
  bof_id: int = 1
  eof_id: int = 2
  eos_id: int = 3

  @property
  def num_noisy(self) -> int:
    """Noisy chunk copies per row."""
    return self.noisy_chunks or self.max_chunks


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Flow-matching recipe; the time convention is documented in `tv2tv_jax.flow`."""
  time_mean: float = 0.0  # logit-normal location
  time_std: float = 1.0  # logit-normal scale
  time_shift: float = 1.0  # >1 moves mass towards noise (t -> 0)
  cfg_drop_prob: float = 0.1
  clean_flip_prob: float = 0.1
  clean_flip_min_t: float = 0.8


@dataclasses.dataclass(frozen=True)
class LossConfig:
  lambda_txt: float = 1.0
  lambda_vid: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  batch_size: int = 8
  # Microbatches per step (gradient accumulation, `train_step.loss_and_grads`): the same
  # update as one pass over `batch_size` rows, with the activations of batch_size / n.
  grad_accum_steps: int = 1
  num_steps: int = 1000
  log_every: int = 10
  seed: int = 0
  # Checkpoints: every `save_every` steps (0 = only at the end); keep the last
  # `keep_last`, plus every `keep_every`-th step forever (0 = none).
  save_every: int = 0
  keep_last: int = 3
  keep_every: int = 0
  async_checkpoints: bool = True
  # Evaluation at fixed flow times on held-out batches (0 = only at the end).
  eval_every: int = 0
  eval_batches: int = 2
  eval_times: tuple[float, ...] = (0.25, 0.5, 0.75)
  # Stop after this many consecutive skipped (non-finite) updates.
  max_nonfinite_steps: int = 5


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  seq: SequenceConfig
  flow: FlowConfig
  loss: LossConfig
  optim: OptimConfig
  train: TrainConfig

  @property
  def row_len(self) -> int:
    """L: slots in one packed row."""
    s = self.seq
    return s.text_len + (s.num_noisy + s.max_chunks) * self.model.tokens_per_chunk


def _validate_rope(m: ModelConfig) -> None:
  require(m.rope_theta > 0, "model.rope_theta", f"must be positive, got {m.rope_theta}")
  require(m.rope_type in ROPE_TYPES, "model.rope_type",
          f"one of {ROPE_TYPES}, got {m.rope_type!r} (other Hugging Face rope types, e.g. "
          f"'linear', 'dynamic', 'yarn', are not implemented)")
  scaling_fields = ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                    "rope_original_max_position_embeddings")
  if m.rope_type == "default":
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for name in scaling_fields:
      require(getattr(m, name) == defaults[name], f"model.{name}",
              f"is {getattr(m, name)} but is read only with model.rope_type='llama3' "
              f"(rope_type is 'default'); set rope_type or leave it at {defaults[name]}")
    return
  require(m.rope_factor >= 1.0, "model.rope_factor", f"must be >= 1, got {m.rope_factor}")
  require(m.rope_low_freq_factor > 0, "model.rope_low_freq_factor",
          f"must be positive, got {m.rope_low_freq_factor}")
  require(m.rope_high_freq_factor > m.rope_low_freq_factor, "model.rope_high_freq_factor",
          f"must exceed rope_low_freq_factor={m.rope_low_freq_factor}, got "
          f"{m.rope_high_freq_factor}")
  orig = m.rope_original_max_position_embeddings
  require(isinstance(orig, int) and not isinstance(orig, bool) and orig >= 1,
          "model.rope_original_max_position_embeddings",
          f"must be a positive integer, got {orig!r}")


def validate(exp: Experiment) -> Experiment:
  """Checks every cross-field constraint; returns `exp` unchanged or raises ConfigError."""
  m, s, f = exp.model, exp.seq, exp.flow
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "mlp_dim", "patch_size", "unet_channels", "unet_groups",
               "time_embed_dim"):
    require(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
  require_count(m.unet_blocks, "model.unet_blocks", 0)
  require(m.d_model % m.num_heads == 0, "model.num_heads",
          f"num_heads={m.num_heads} does not divide d_model={m.d_model}")
  require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
          f"num_kv_heads={m.num_kv_heads} does not divide num_heads={m.num_heads}")
  require(m.head_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {m.head_dim}")
  _validate_rope(m)
  require(len(m.latent_shape) == 3 and all(int(v) > 0 for v in m.latent_shape),
          "model.latent_shape", f"must be positive (h, w, c), got {m.latent_shape}")
  h, w, _ = m.latent_shape
  require(h % m.patch_size == 0 and w % m.patch_size == 0, "model.latent_shape",
          f"latent grid {h}x{w} is not divisible by patch_size={m.patch_size}")
  require(m.unet_channels % m.unet_groups == 0, "model.unet_groups",
          f"unet_groups={m.unet_groups} does not divide unet_channels={m.unet_channels}")
  require(m.time_embed_dim % 2 == 0, "model.time_embed_dim", "must be even (sin/cos pairs)")
  require(m.dtype in DTYPES, "model.dtype", f"one of {DTYPES}, got {m.dtype!r}")
  require(m.param_dtype in DTYPES, "model.param_dtype", f"one of {DTYPES}, got {m.param_dtype!r}")
  require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
          f"one of {ATTENTION_IMPLS}, got {m.attention_impl!r}")

  require(s.layout in LAYOUTS, "seq.layout", f"one of {LAYOUTS}, got {s.layout!r}")
  specials = {"pad_id": s.pad_id, "bof_id": s.bof_id, "eof_id": s.eof_id, "eos_id": s.eos_id}
  for name, tok in specials.items():
    require(0 <= tok < m.vocab_size, f"seq.{name}",
            f"{tok} is outside the vocabulary [0, {m.vocab_size})")
  require(len(set(specials.values())) == 4, "seq.bof_id",
          f"special token ids must be distinct, got {specials}")
  require(s.max_chunks >= 1, "seq.max_chunks", f"must be >= 1, got {s.max_chunks}")
  require(0 <= s.noisy_chunks <= s.max_chunks, "seq.noisy_chunks",
          f"must be in [0, max_chunks={s.max_chunks}] (0: max_chunks), got {s.noisy_chunks}")
  # The shortest useful example: BOF, one chunk (noisy + clean), EOF, EOS.
  require(s.text_len >= 3, "seq.text_len",
          f"{s.text_len} text slots cannot hold one chunk's BOF, EOF and EOS")

  require(f.time_std > 0, "flow.time_std", f"must be positive, got {f.time_std}")
  require(f.time_shift > 0, "flow.time_shift", f"must be positive, got {f.time_shift}")
  for name in ("cfg_drop_prob", "clean_flip_prob"):
    require(0.0 <= getattr(f, name) <= 1.0, f"flow.{name}", "must be a probability in [0, 1]")
  require(0.0 <= f.clean_flip_min_t <= 1.0, "flow.clean_flip_min_t", "must lie in [0, 1]")

  o, t = exp.optim, exp.train
  require(o.learning_rate > 0, "optim.learning_rate", "must be positive")
  require_count(o.total_steps, "optim.total_steps", 1)
  require_count(o.warmup_steps, "optim.warmup_steps", 0)
  require(o.warmup_steps < o.total_steps, "optim.warmup_steps",
          f"must lie in [0, total_steps={o.total_steps}), got {o.warmup_steps}")
  require_count(t.batch_size, "train.batch_size", 1)
  require_count(t.grad_accum_steps, "train.grad_accum_steps", 1, " (1: no accumulation)")
  require(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
          f"must divide train.batch_size={t.batch_size} into equal microbatches, "
          f"got {t.grad_accum_steps}")
  # The trainer runs steps [start, num_steps): 0 compiles the step and trains none.
  require_count(t.num_steps, "train.num_steps", 0, " (0: compile only, no step)")
  # A negative seed fails numpy's generators (the synthetic input stream).
  require_count(t.seed, "train.seed", 0)
  for name in ("save_every", "keep_every", "eval_every"):
    require_count(getattr(t, name), f"train.{name}", 0, " (0: off)")
  # The held-out batches are averaged (the final evaluation always runs): none is no mean.
  for name in ("log_every", "keep_last", "eval_batches", "max_nonfinite_steps"):
    require_count(getattr(t, name), f"train.{name}", 1)
  require(len(t.eval_times) >= 1 and all(0.0 <= x <= 1.0 for x in t.eval_times),
          "train.eval_times", f"need at least one time in [0, 1], got {t.eval_times}")
  require(exp.loss.lambda_txt >= 0 and exp.loss.lambda_vid >= 0, "loss.lambda_txt",
          "loss weights must be non-negative")
  return exp


# --------------------------------------------------------------------------- the run

@dataclasses.dataclass(frozen=True)
class StudyEvalConfig:
  """`study.eval`: the generation evaluation of every study run (`generation_eval`):
  `num_clips` held-out clips in batches of `batch`, CFG scale `cfg_scale` (t2v: 1),
  `ode_steps` per chunk, actions inserted at `times` (seconds), sampler `seed`, and
  `uncond`, CFG's second branch: 'mask' or 'plan_free' (docs/model.md)."""
  num_clips: int = 32
  batch: int = 8
  cfg_scale: float = 3.0
  ode_steps: int = 16
  times: tuple[float, ...] = (1.0, 3.0)
  seed: int = 0
  uncond: str = UNCOND_BRANCHES[0]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """The `study` section (`tv2tv_jax.study` checks its values): the `arms` (layouts)
  trained with each of `seeds`, their evaluation, and the bootstrap resamples of the
  report."""
  arms: tuple[str, ...] = LAYOUTS
  seeds: tuple[int, ...] = (0, 1, 2)
  eval: StudyEvalConfig = StudyEvalConfig()
  bootstrap_resamples: int = 2000


def study_config(values: Any) -> StudyConfig | None:
  """The `study` section (None when the config has none); unknown fields raise."""
  if values is None:
    return None
  values = plain_dict(values)
  values["eval"] = build_section(StudyEvalConfig, "study.eval", values.get("eval"))
  return build_section(StudyConfig, "study", values)


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  """One point of `sweep.points`: a `name`, its abscissa `x` (None: a reference drawn
  as a line, e.g. T2V as zero text density), the study `arm` it trains, and `overrides`
  of the study config ({dotted field: value}; `tv2tv_jax.sweep` applies them)."""
  name: str
  arm: str
  x: float | None = None
  overrides: FrozenMapping = FrozenMapping()


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The `sweep` section (`tv2tv_jax.sweep`): its `name`, the `seeds` of every point,
  the `points`, and how the report draws x (`x_label`, `x_log`)."""
  name: str
  seeds: tuple[int, ...]
  points: tuple[SweepPoint, ...]
  x_label: str = "x"
  x_log: bool = False


def sweep_config(values: Any) -> SweepConfig | None:
  """The `sweep` section (None when the config has none): unknown fields raise; point
  names must be distinct and non-empty, seeds distinct, arms layouts."""
  if values is None:
    return None
  values = plain_dict(values)
  raw_points = values.get("points") or ()
  points = []
  for i, p in enumerate(raw_points):
    p = plain_dict(p)
    name = p.get("name")
    field = f"sweep.points[{name!r}]" if name else f"sweep.points[{i}]"
    p["overrides"] = FrozenMapping(p.get("overrides") or {})
    for key in ("name", "arm"):
      require(key in p, f"{field}.{key}", "is required")
    point = build_section(SweepPoint, field, p)
    require(point.arm in LAYOUTS, f"{field}.arm", f"one of {list(LAYOUTS)}, got {point.arm!r}")
    points.append(point)
  values["points"] = tuple(points)
  values["seeds"] = tuple(int(s) for s in values.get("seeds") or ())
  require("name" in values, "sweep.name", "is required")
  sweep = build_section(SweepConfig, "sweep", values)
  names = [p.name for p in sweep.points]
  require(bool(names) and all(names) and len(set(names)) == len(names), "sweep.points",
          f"needs named points with distinct names, got {names}")
  require(bool(sweep.seeds) and len(set(sweep.seeds)) == len(sweep.seeds), "sweep.seeds",
          f"needs distinct seeds, got {sweep.seeds}")
  return sweep


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything the code reads from an experiment config, typed and checked.

  exp: what is trained (model, sequence, flow, loss, optimiser, training loop); data:
  where batches come from; mesh and sharding_rules: how it is laid out on the devices;
  init: where a fresh run's weights come from; sample: what `main` generates afterwards;
  study: the study command's arms, seeds and evaluation (None outside a study); sweep:
  the sweep command's points and seeds (None outside a sweep).
  """
  exp: Experiment
  data: DataConfig = DataConfig()
  mesh: MeshConfig = MeshConfig()
  sharding_rules: Rules = axes.REPLICATED_RULES
  init: InitConfig = InitConfig()
  sample: SampleConfig = SampleConfig()
  study: StudyConfig | None = None
  sweep: SweepConfig | None = None


# Top-level keys an experiment config may hold: RunConfig's sections.
SECTIONS = ("model", "seq", "flow", "loss", "optim", "train", "data", "mesh",
            "sharding_rules", "init", "sample", "study", "sweep")


def run_config_from_config_dict(cfg: Mapping[str, Any]) -> RunConfig:
  """Builds and checks every section of an experiment ConfigDict (or plain dict, e.g. a
  saved config.json): the one place a ConfigDict becomes typed configs.

  Raises ConfigError naming the dotted field: an unknown section or field (with the
  closest name), or a value that cannot work.
  """
  keys = sorted(cfg.keys()) if hasattr(cfg, "keys") else []
  for key in keys:
    require(key in SECTIONS, str(key), f"unknown section{did_you_mean(key, SECTIONS)}; "
            f"an experiment config has {', '.join(SECTIONS)}")
  def section(name):
    value = cfg[name] if name in keys else None
    return value.to_dict() if hasattr(value, "to_dict") else value
  exp = validate(Experiment(
      model=build_section(ModelConfig, "model", section("model")),
      seq=build_section(SequenceConfig, "seq", section("seq")),
      flow=build_section(FlowConfig, "flow", section("flow")),
      loss=build_section(LossConfig, "loss", section("loss")),
      optim=build_section(OptimConfig, "optim", section("optim")),
      train=build_section(TrainConfig, "train", section("train")),
  ))
  return RunConfig(exp=exp, data=data_config(section("data")),
                   mesh=mesh_config(section("mesh")),
                   sharding_rules=sharding_rules(section("sharding_rules")),
                   init=init_config(section("init")),
                   sample=build_section(SampleConfig, "sample", section("sample")),
                   study=study_config(section("study")),
                   sweep=sweep_config(section("sweep")))


def as_run_config(cfg: Any) -> RunConfig:
  """`cfg` when it is a RunConfig, else `run_config_from_config_dict(cfg)`: for library
  functions that also take a raw config (tests, scripts)."""
  return cfg if isinstance(cfg, RunConfig) else run_config_from_config_dict(cfg)


def experiment_from_config_dict(cfg: Mapping[str, Any]) -> Experiment:
  """The frozen Experiment of a ConfigDict (or plain dict), every section checked
  (`run_config_from_config_dict`)."""
  return run_config_from_config_dict(cfg).exp
