"""Initialise the text tower (and optionally the video tower) from a Hugging Face Llama checkpoint.

The paper initialises TV2TV's text tower from Llama-3 (3.2-3B for CS:GO, 3.1-8B for sports).
This module reads a Hugging Face checkpoint directory::

    llama_dir/config.json                    the HF LlamaConfig
    llama_dir/model.safetensors              one file, or
    llama_dir/model-0000i-of-0000n.safetensors + model.safetensors.index.json  (sharded)

with the `safetensors` library (NumPy arrays; bfloat16 through `ml_dtypes`, a JAX dependency)
and writes the tensors into an existing TV2TV params tree::

    params = train_step.init_params(model, exp, rng)          # boxed or unboxed, any dtype
    params = load_llama_params("path/to/Llama-3.2-3B", exp.model, params)

Tensor mapping (HF stores linear weights as [out, in]; ours are [in, ...]):

  HF tensor                                    ours (per tower layer i)       transform
  model.embed_tokens.weight        [V, D]      embed/embedding      [V, D]    as is
  lm_head.weight                   [V, D]      lm_head/kernel       [D, V]    transpose
    (tie_word_embeddings: model.embed_tokens.weight is used instead)
  model.norm.weight                [D]         text_norm/scale      [D]       as is
  model.layers.i.input_layernorm.weight        attn_norm/scale      [D]       as is
  model.layers.i.self_attn.q_proj.weight [H*dh, D]  qkv/wq   [D, H, dh]       T, reshape
  model.layers.i.self_attn.k_proj.weight [Hkv*dh, D] qkv/wk  [D, Hkv, dh]     T, reshape
  model.layers.i.self_attn.v_proj.weight [Hkv*dh, D] qkv/wv  [D, Hkv, dh]     T, reshape
  model.layers.i.self_attn.o_proj.weight [D, H*dh]  out/wo   [H, dh, D]       T, reshape
  model.layers.i.post_attention_layernorm.weight    ffn_norm/scale [D]        as is
  model.layers.i.mlp.gate_proj.weight    [F, D]     ffn/w_gate [D, F]         transpose
  model.layers.i.mlp.up_proj.weight      [F, D]     ffn/w_up   [D, F]         transpose
  model.layers.i.mlp.down_proj.weight    [D, F]     ffn/w_down [F, D]         transpose

Layer params live under `stack/layers/<tower>/...` with a leading [num_layers] axis when
`scan_layers=True`, or under `stack/layer_<i>/<tower>/...` otherwise; both are handled.

RoPE. HF's q_proj/k_proj rows are already in the "rotate_half" (half-split) order: Meta's
interleaved-pair weights are permuted once by HF's conversion script. `layers.apply_rope`
uses the same half-split convention and the same frequencies theta^(-2i/dh), so q/k are
copied without any permutation. Llama-3.1/3.2's `rope_type: "llama3"` frequency scaling
is implemented (`layers.rope_inv_freq`); the model config must declare the checkpoint's
(`model.rope_type`, `rope_factor`, `rope_low_freq_factor`, `rope_high_freq_factor`,
`rope_original_max_position_embeddings`), which `check_config` compares like rope_theta.
Other rope types ("linear", "dynamic", "yarn", ...) raise `RopeScalingError`.

Damaged checkpoints. A config.json or index that is not JSON, and a safetensors file that
cannot be opened (truncated: its header promises more bytes than the file holds), raise
`CheckpointFileError` naming the file; a tensor holding NaN or inf raises
`NonFiniteTensorError` naming the file and the tensor, since such weights would load
without complaint and poison every step after.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype: safetensors reads BF16)
import numpy as np
from flax.core import meta
from safetensors import safe_open

from tv2tv_jax import config as config_lib
from tv2tv_jax.config import ConfigError, InitConfig, ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# Older checkpoints store RoPE's inverse frequencies; they are derived, not learned.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


class LlamaInitError(ValueError):
  """A Llama checkpoint cannot be loaded into the model."""


class MissingTensorError(LlamaInitError):
  """A tensor the mapping needs is absent from the checkpoint."""


class TensorShapeError(LlamaInitError):
  """A checkpoint tensor (or the target param) has an unexpected shape."""


class UnexpectedTensorError(LlamaInitError):
  """The checkpoint holds a learned tensor the model has no place for (e.g. a bias)."""


class CheckpointFileError(LlamaInitError):
  """A checkpoint file (config.json, the index, a safetensors file) cannot be read."""


class NonFiniteTensorError(LlamaInitError):
  """A checkpoint tensor holds NaN or inf values."""


class RopeScalingError(LlamaInitError):
  """The checkpoint's RoPE scaling type is not one `layers.rope_inv_freq` implements, or
  its parameters are incomplete."""


class LlamaConfigMismatch(ConfigError):
  """A model config field disagrees with the checkpoint's config.json.

  `field` is our dotted field name (e.g. 'model.mlp_dim'); the message also names the
  Hugging Face key and both values.
  """


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
  """The parts of a Hugging Face `config.json` that decide tensor shapes and numerics."""
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  intermediate_size: int
  vocab_size: int
  rope_theta: float
  rms_norm_eps: float
  tie_word_embeddings: bool
  # None when rope_type is "default" or absent; else the HF dict with "rope_type" set.
  rope_scaling: Mapping[str, Any] | None
  hidden_act: str = "silu"
  attention_bias: bool = False
  mlp_bias: bool = False


def _read_json(path: str) -> dict:
  """The JSON object in `path`; CheckpointFileError naming the file if it is not one."""
  try:
    with open(path, "rb") as f:
      raw = json.loads(f.read())
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise CheckpointFileError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise CheckpointFileError(f"{path}: expected a JSON object, found a "
                              f"{type(raw).__name__}")
  return raw


def read_llama_config(llama_dir: str | os.PathLike) -> LlamaSpec:
  """Parses `llama_dir/config.json`, old style (`rope_theta`, `rope_scaling`, e.g. the Hub's
  Llama-3.x files) or transformers>=5 style (`rope_parameters`).

  Raises:
    CheckpointFileError: config.json is not a JSON object, naming it.
    LlamaInitError: naming the file: missing, not a llama model, or a field missing or
      of the wrong type.
  """
  path = os.path.join(os.fspath(llama_dir), "config.json")
  if not os.path.exists(path):
    raise LlamaInitError(f"{path}: no config.json in the Llama checkpoint directory")
  raw = _read_json(path)
  try:
    return _spec_from_config(raw, path)
  except LlamaInitError:
    raise
  except KeyError as e:
    raise LlamaInitError(f"{path}: lacks the field {e}") from e
  except (TypeError, ValueError, AttributeError) as e:  # e.g. "hidden_size": "big"
    raise LlamaInitError(f"{path}: a field has the wrong type: {type(e).__name__}: {e}") from e


def _spec_from_config(raw: dict, path: str) -> LlamaSpec:
  """The LlamaSpec of a parsed config.json (`path` for messages); KeyError for a missing
  required field."""
  if raw.get("model_type", "llama") != "llama":
    raise LlamaInitError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'llama'")
  rope = dict(raw.get("rope_parameters") or {})
  theta = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
  scaling = raw.get("rope_scaling") or (rope if rope else None)
  if scaling is not None:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling = None if kind in (None, "default") else dict(scaling, rope_type=kind)
  heads = int(raw["num_attention_heads"])
  return LlamaSpec(
      hidden_size=int(raw["hidden_size"]),
      num_hidden_layers=int(raw["num_hidden_layers"]),
      num_attention_heads=heads,
      num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
      head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
      intermediate_size=int(raw["intermediate_size"]),
      vocab_size=int(raw["vocab_size"]),
      rope_theta=float(theta),
      rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
      rope_scaling=scaling,
      hidden_act=str(raw.get("hidden_act", "silu")),
      attention_bias=bool(raw.get("attention_bias", False)),
      mlp_bias=bool(raw.get("mlp_bias", False)),
  )


# Our ModelConfig field -> the key of Hugging Face's llama3 rope parameters.
_LLAMA3_ROPE_FIELDS = (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                       ("rope_high_freq_factor", "high_freq_factor"),
                       ("rope_original_max_position_embeddings",
                        "original_max_position_embeddings"))


def check_config(spec: LlamaSpec, cfg: ModelConfig):
  """Raises LlamaConfigMismatch (naming our field and the HF key) on any shape or numerics
  disagreement, LlamaInitError for architecture features we lack, RopeScalingError for a
  RoPE scaling type we do not implement."""
  pairs = (("d_model", "hidden_size"), ("num_layers", "num_hidden_layers"),
           ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
           ("head_dim", "head_dim"), ("mlp_dim", "intermediate_size"),
           ("vocab_size", "vocab_size"))
  for ours, theirs in pairs:
    got, want = getattr(cfg, ours), getattr(spec, theirs)
    if got != want:
      raise LlamaConfigMismatch(f"model.{ours}", f"is {got} but the Llama checkpoint's "
                                f"{theirs} is {want}")
  # Floats: the same value may be written as 500000 or 5e5, hence isclose.
  for ours, theirs in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
    got, want = float(getattr(cfg, ours)), getattr(spec, theirs)
    if not math.isclose(got, want, rel_tol=1e-6):
      raise LlamaConfigMismatch(f"model.{ours}", f"is {got} but the Llama checkpoint's "
                                f"{theirs} is {want}")
  _check_rope_scaling(spec, cfg)
  if spec.hidden_act != "silu":
    raise LlamaInitError(f"hidden_act {spec.hidden_act!r}: our SwiGLU uses silu")
  if spec.attention_bias or spec.mlp_bias:
    raise LlamaInitError("attention_bias/mlp_bias: our projections have no biases")


def _check_rope_scaling(spec: LlamaSpec, cfg: ModelConfig) -> None:
  """The checkpoint's rope_type and llama3 parameters must equal model.rope_*."""
  scaling = dict(spec.rope_scaling or {})
  kind = scaling.get("rope_type", "default")
  if kind not in ("default", "llama3"):
    raise RopeScalingError(
        f"the checkpoint uses RoPE scaling {scaling}; rope_type {kind!r} is not implemented "
        f"(model.rope_type supports 'default' and 'llama3')")
  if cfg.rope_type != kind:
    raise LlamaConfigMismatch("model.rope_type", f"is {cfg.rope_type!r} but the Llama "
                              f"checkpoint's rope_type is {kind!r} ({scaling or 'no scaling'})")
  if kind == "default":
    return
  for ours, theirs in _LLAMA3_ROPE_FIELDS:
    if scaling.get(theirs) is None:
      raise RopeScalingError(f"the checkpoint's llama3 RoPE scaling {scaling} lacks "
                             f"{theirs!r} (needed for model.{ours})")
    got, want = float(getattr(cfg, ours)), float(scaling[theirs])
    if not math.isclose(got, want, rel_tol=1e-6):
      raise LlamaConfigMismatch(f"model.{ours}", f"is {getattr(cfg, ours)} but the Llama "
                                f"checkpoint's rope scaling {theirs} is {scaling[theirs]}")


class LlamaCheckpoint:
  """Lazy, name-addressed access to the tensors of one or more safetensors files.

  Use as a context manager; files stay memory-mapped while open. `shape(name)` reads only
  the header; `get(name)` returns a NumPy array in the stored dtype (bfloat16 included).
  """

  def __init__(self, llama_dir: str | os.PathLike):
    self.dir = os.fspath(llama_dir)
    index = os.path.join(self.dir, INDEX_FILE)
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointFileError(f"{index}: no 'weight_map' object")
      self._files = sorted(set(weight_map.values()))
      self._where = dict(weight_map)
    else:
      # No index: every *.safetensors file in the directory, keys read from the headers.
      self._files = sorted(os.path.basename(p)
                           for p in glob.glob(os.path.join(self.dir, "*.safetensors")))
      self._where = None
    if not self._files:
      raise LlamaInitError(f"{self.dir}: no *.safetensors files (and no {INDEX_FILE})")
    self._handles = {}

  def __enter__(self) -> "LlamaCheckpoint":
    for name in self._files:
      path = os.path.join(self.dir, name)
      if not os.path.exists(path):
        raise LlamaInitError(f"{path}: listed in {INDEX_FILE} but missing")
      try:
        self._handles[name] = safe_open(path, framework="np")
      except Exception as e:  # SafetensorError: "incomplete metadata, file not fully covered"
        raise CheckpointFileError(f"{path}: cannot open as safetensors (truncated or not a "
                                  f"safetensors file?): {type(e).__name__}: {e}") from e
    if self._where is None:
      self._where = {}
      for name, handle in self._handles.items():
        for key in handle.keys():
          if key in self._where:
            raise LlamaInitError(f"tensor {key!r} appears in both {self._where[key]} and {name}")
          self._where[key] = name
    return self

  def __exit__(self, *exc):
    self._handles.clear()  # safe_open handles release their mmaps when dropped

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    if name not in self._where:
      raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def path(self, name: str) -> str:
    """The safetensors file holding tensor `name`."""
    return os.path.join(self.dir, self._where[name])

  def get(self, name: str, expect: tuple[int, ...]) -> np.ndarray:
    """The tensor `name` (HF layout), after checking it has shape `expect` and only finite
    values (NonFiniteTensorError naming file and tensor otherwise)."""
    found = self.shape(name)
    if found != tuple(expect):
      raise TensorShapeError(f"tensor {name!r}: expected shape {tuple(expect)}, found {found}")
    try:
      tensor = self._handles[self._where[name]].get_tensor(name)
    except Exception as e:
      raise CheckpointFileError(f"{self.path(name)}: cannot read tensor {name}: "
                                f"{type(e).__name__}: {e}") from e
    bad = _count_nonfinite(tensor)
    if bad:
      raise NonFiniteTensorError(f"{self.path(name)}: {name} holds {bad} NaN/inf values "
                                 f"(of {tensor.size})")
    return tensor


def _count_nonfinite(x: np.ndarray, block: int = 1 << 24) -> int:
  """Number of NaN/inf entries of any-dtype `x` (bfloat16 included), checked in blocks of
  `block` elements so that a 128k x 4k embedding needs no full-size mask."""
  flat = x.reshape(-1)
  return sum(int(np.count_nonzero(~np.isfinite(flat[i:i + block])))
             for i in range(0, flat.size, block))


# HF name pattern (per layer) -> (our path inside a tower layer, HF shape, converter).
# Shapes and converters are functions of the spec, so one table serves every size.
def _layer_table(s: LlamaSpec):
  d, h, kv, dh, f = (s.hidden_size, s.num_attention_heads, s.num_key_value_heads,
                     s.head_dim, s.intermediate_size)
  ident = lambda w: w
  return {
      "input_layernorm.weight": (("attn_norm", "scale"), (d,), ident),
      "self_attn.q_proj.weight": (("qkv", "wq"), (h * dh, d), lambda w: w.T.reshape(d, h, dh)),
      "self_attn.k_proj.weight": (("qkv", "wk"), (kv * dh, d), lambda w: w.T.reshape(d, kv, dh)),
      "self_attn.v_proj.weight": (("qkv", "wv"), (kv * dh, d), lambda w: w.T.reshape(d, kv, dh)),
      "self_attn.o_proj.weight": (("out", "wo"), (d, h * dh), lambda w: w.T.reshape(h, dh, d)),
      "post_attention_layernorm.weight": (("ffn_norm", "scale"), (d,), ident),
      "mlp.gate_proj.weight": (("ffn", "w_gate"), (f, d), lambda w: w.T),
      "mlp.up_proj.weight": (("ffn", "w_up"), (f, d), lambda w: w.T),
      "mlp.down_proj.weight": (("ffn", "w_down"), (d, f), lambda w: w.T),
  }


def _get_leaf(tree: Mapping[str, Any], path: tuple[str, ...]):
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise LlamaInitError(f"the params tree has no {'/'.join(path[:i + 1])}; is it a TV2TV "
                           f"params tree (the 'params' collection)?")
    node = node[key]
  return node


def _set_leaf(tree: dict, path: tuple[str, ...], value: np.ndarray, source: str):
  """Replaces the leaf at `path` by `value`, in the old leaf's dtype, sharding and box."""
  old = _get_leaf(tree, path)
  boxed = isinstance(old, meta.AxisMetadata)
  target = old.unbox() if boxed else old
  if tuple(target.shape) != tuple(value.shape):
    raise TensorShapeError(f"{source} -> params/{'/'.join(path)}: converted shape "
                           f"{tuple(value.shape)}, but the param has shape {tuple(target.shape)}")
  # Cast on the host (bf16 -> f32 is exact); keep the param's dtype, not the checkpoint's.
  new = np.asarray(value).astype(target.dtype)
  sharding = getattr(target, "sharding", None)
  if sharding is not None:
    new = jax.device_put(new, sharding)
  node = tree
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = old.replace_boxed(new) if boxed else new


def _mutable_copy(tree):
  """Nested plain dicts (Flax FrozenDicts and boxes kept as leaves) that `_set_leaf` can edit."""
  if isinstance(tree, Mapping) and not isinstance(tree, meta.AxisMetadata):
    return {k: _mutable_copy(v) for k, v in tree.items()}
  return tree


def load_llama_params(llama_dir: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any],
                      *, video_tower_from_llama: bool = False,
                      log: Callable[[str], None] | None = None) -> dict:
  """Returns `params` with the text tower (and optionally the video tower) from Llama.

  Args:
    llama_dir: a Hugging Face Llama checkpoint directory (config.json + safetensors).
    cfg: the model config; every shape/numerics field must match config.json.
    params: a TV2TV params tree (the 'params' collection), boxed (`nn.Partitioned`) or
      unboxed, scanned or unrolled layers, any param dtype. Its leaves give the target
      shapes, dtypes and (for jax.Arrays) shardings. Not modified.
    video_tower_from_llama: also copy every layer into the video tower, and model.norm
      into `video_norm`; otherwise the video tower and norm keep their values in `params`.
    log: optional progress callback.
  Returns:
    A new nested-dict params tree: replaced leaves are NumPy arrays in the param's dtype
    (device arrays on the param's sharding when the old leaf had one); the embedding,
    lm_head, text_norm and tower params come from the checkpoint; everything else (the
    U-Nets, the video tower unless asked) is carried over unchanged.
  Raises:
    LlamaConfigMismatch, RopeScalingError, MissingTensorError, TensorShapeError,
    UnexpectedTensorError, LlamaInitError: each names the field or tensor involved.
  """
  spec = read_llama_config(llama_dir)
  check_config(spec, cfg)
  towers = ("text", "video") if video_tower_from_llama else ("text",)
  out = _mutable_copy(params)
  stack = _get_leaf(out, ("stack",))
  scanned = "layers" in stack
  if scanned != cfg.scan_layers:
    raise LlamaInitError(f"model.scan_layers={cfg.scan_layers} but the params tree is "
                         f"{'scanned (stack/layers)' if scanned else 'unrolled (stack/layer_i)'}")
  n, d, v = spec.num_hidden_layers, spec.hidden_size, spec.vocab_size
  used = set()
  with LlamaCheckpoint(llama_dir) as ckpt:
    def take(name, shape):
      used.add(name)
      return ckpt.get(name, shape)

    embed = take("model.embed_tokens.weight", (v, d))
    _set_leaf(out, ("embed", "embedding"), embed, "model.embed_tokens.weight")
    if spec.tie_word_embeddings:
      # Tied checkpoints (Llama-3.2) store no lm_head; ours is a separate, untied param.
      head_src, head = "model.embed_tokens.weight (tied)", embed
      used.add("lm_head.weight")  # a redundant copy, if present, is ignored
    else:
      head_src, head = "lm_head.weight", take("lm_head.weight", (v, d))
    _set_leaf(out, ("lm_head", "kernel"), head.T, head_src)
    del embed, head
    final_norm = take("model.norm.weight", (d,))
    _set_leaf(out, ("text_norm", "scale"), final_norm, "model.norm.weight")
    if video_tower_from_llama:
      _set_leaf(out, ("video_norm", "scale"), final_norm, "model.norm.weight")

    for suffix, (sub, shape, convert) in _layer_table(spec).items():
      names = [f"model.layers.{i}.{suffix}" for i in range(n)]
      per_layer = [convert(take(name, shape)) for name in names]  # one kind at a time
      for tower in towers:
        if scanned:
          source = f"model.layers.{{0..{n - 1}}}.{suffix}"
          _set_leaf(out, ("stack", "layers", tower) + sub, np.stack(per_layer), source)
        else:
          for i, w in enumerate(per_layer):
            _set_leaf(out, ("stack", f"layer_{i}", tower) + sub, w, names[i])
      if log:
        log(f"loaded {n} x {suffix} -> {'+'.join(towers)}/{'/'.join(sub)}")
      del per_layer

    extra = [k for k in ckpt.keys()
             if k not in used and not k.endswith(_DERIVED_SUFFIXES)]
    if extra:
      raise UnexpectedTensorError(f"the checkpoint holds {len(extra)} tensor(s) the model has "
                                  f"no place for, e.g. {extra[:3]}")
  return out


def init_from_config(init_cfg: InitConfig | Mapping[str, Any] | None, cfg: ModelConfig,
                     params: Mapping[str, Any], log: Callable[[str], None] | None = print):
  """Applies an experiment's `init` section (`config.InitConfig`; a mapping is parsed,
  which refuses the retired `ignore_rope_scaling`) to freshly initialised params:
  unchanged without `llama_dir`, else the Llama weights (`load_llama_params`)."""
  init = config_lib.init_config(init_cfg)
  if not init.llama_dir:
    return params
  return load_llama_params(init.llama_dir, cfg, params,
                           video_tower_from_llama=init.video_tower_from_llama, log=log)
