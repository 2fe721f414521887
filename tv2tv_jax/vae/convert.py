"""Published diffusers video-VAE weights (safetensors) -> Flax params, and back.

A diffusers model directory, as `save_pretrained` writes it (or a pipeline's `vae/`
subfolder)::

    vae_dir/config.json                              class name and architecture fields
    vae_dir/diffusion_pytorch_model.safetensors      one file, or several shards (+ index)

is read with `safetensors` only (NumPy; bfloat16 through `ml_dtypes`; no pickle, no torch).

Mapping. The Flax modules (`cosmos.py`) mirror the diffusers module tree, so one rule maps
every parameter: the Flax path joined with '.', with a trailing `_<i>` of a module name
becoming `.<i>` (`down_blocks_0` -> `down_blocks.0`, `to_out_0` -> `to_out.0`), and the leaf
`kernel` or `scale` becoming `weight`. Kernels move PyTorch's [out, in, *space-time] to
Flax's [*space-time, in, out]; every other tensor is copied as is.

The set of tensors expected, and each one's shape, come from the Flax init of the config
(`jax.eval_shape`, nothing allocated), so config.json selects the layout (e.g. CV4x8x8
against CV8x8x8 through `temporal_compression_ratio`). Checks, each raising an error
that names the tensor: a tensor the model needs is absent (`MissingTensorError`), the file
holds one it has no place for (`UnexpectedTensorError`), a tensor has the wrong shape
(`TensorShapeError`), or holds NaN/inf (`NonFiniteTensorError`).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes  # noqa: F401  (registers numpy's 'bfloat16' dtype: safetensors reads BF16)
import numpy as np
from safetensors import safe_open

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class PretrainedVAEError(ValueError):
  """Published VAE weights cannot be loaded into the Flax model."""


class CheckpointFileError(PretrainedVAEError):
  """config.json or a safetensors file is absent or cannot be read."""


class MissingTensorError(PretrainedVAEError):
  """A tensor the model needs is absent from the checkpoint (the message names it)."""


class UnexpectedTensorError(PretrainedVAEError):
  """The checkpoint holds a tensor the model has no place for (the message names it)."""


class TensorShapeError(PretrainedVAEError):
  """A checkpoint tensor has a shape other than the model's (the message names it)."""


class NonFiniteTensorError(PretrainedVAEError):
  """A checkpoint tensor holds NaN or inf values (the message names it)."""


# --------------------------------------------------------------------------- names and layout

def torch_name(path: tuple[str, ...]) -> str:
  """The diffusers state-dict key of a Flax param path, e.g. ('encoder', 'down_blocks_0',
  'resnets_1', 'norm1', 'norm', 'scale') -> 'encoder.down_blocks.0.resnets.1.norm1.norm.weight'."""
  parts = []
  for name in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    parts += [m.group(1), m.group(2)] if m else [name]
  leaf = path[-1]
  return ".".join(parts + ["weight" if leaf in ("kernel", "scale") else leaf])


def _kernel_perm(ndim: int) -> tuple[int, ...]:
  """PyTorch [out, in, *k] -> Flax [*k, in, out]."""
  return tuple(range(2, ndim)) + (1, 0)


def to_flax(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
  """A diffusers tensor in the Flax layout of the param at `path`, as float32."""
  tensor = np.asarray(tensor, np.float32)
  return tensor.transpose(_kernel_perm(tensor.ndim)) if path[-1] == "kernel" else tensor


def to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The diffusers shape of the Flax param at `path` with shape `shape`."""
  if path[-1] != "kernel":
    return tuple(shape)
  inverse = np.argsort(_kernel_perm(len(shape)))
  return tuple(int(shape[i]) for i in inverse)


def flat_params(tree: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(path, leaf) of a nested params dict, in sorted order."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      for sub, leaf in flat_params(value):
        yield (key, *sub), leaf
    else:
      yield (key,), value


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax params -> a diffusers state dict (float32 NumPy, PyTorch layout): the inverse of
  `load_params`, for writing a checkpoint (`safetensors.numpy.save_file`)."""
  out = {}
  for path, leaf in flat_params(params):
    x = np.asarray(leaf, np.float32)
    if path[-1] == "kernel":
      x = x.transpose(np.argsort(_kernel_perm(x.ndim)))
    out[torch_name(path)] = np.ascontiguousarray(x)
  return out


# --------------------------------------------------------------------------- files

def model_dir(path: str | os.PathLike) -> str:
  """The directory holding config.json: `path`, or its `vae/` subfolder (a pipeline)."""
  path = os.fspath(path)
  if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(
      os.path.join(path, "vae", "config.json")):
    return os.path.join(path, "vae")
  return path


def read_config(path: str | os.PathLike, class_name: str) -> dict:
  """config.json of a diffusers model directory, checked to be a `class_name`."""
  cfg_path = os.path.join(model_dir(path), "config.json")
  try:
    with open(cfg_path) as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointFileError(f"{cfg_path}: cannot read a JSON config: {e}") from e
  if not isinstance(raw, dict):
    raise CheckpointFileError(f"{cfg_path}: expected a JSON object")
  found = raw.get("_class_name", class_name)
  if found != class_name:
    raise PretrainedVAEError(f"{cfg_path}: _class_name is {found!r}, expected {class_name!r}")
  return raw


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of every *.safetensors file in the model directory (NumPy, stored dtype)."""
  directory = model_dir(path)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not files:
    raise CheckpointFileError(f"{directory}: no *.safetensors file (a .bin/.pt checkpoint "
                              f"is not read: convert it with diffusers' save_pretrained)")
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    try:
      with safe_open(file, framework="np") as handle:
        for key in handle.keys():
          if key in tensors:
            raise CheckpointFileError(f"tensor {key!r} appears in more than one file of "
                                      f"{directory}")
          tensors[key] = handle.get_tensor(key)
    except CheckpointFileError:
      raise
    except Exception as e:  # SafetensorError: truncated file, bad header
      raise CheckpointFileError(f"{file}: cannot read as safetensors: {type(e).__name__}: "
                                f"{e}") from e
  return tensors


def load_params(tensors: Mapping[str, np.ndarray], expected: Mapping[str, Any],
                source: str = "the checkpoint") -> dict:
  """Flax params (nested dicts of float32 NumPy arrays) from a diffusers state dict.

  Args:
    tensors: diffusers key -> array (any float dtype), e.g. `read_tensors(vae_dir)`.
    expected: the params tree to fill, leaves with `.shape` (e.g. `jax.eval_shape` of the
      model's init): it decides which tensors must be there and their shapes.
    source: named in error messages.
  Raises:
    MissingTensorError, UnexpectedTensorError, TensorShapeError, NonFiniteTensorError:
      each naming the diffusers tensor.
  """
  out: dict = {}
  used = set()
  for path, leaf in flat_params(expected):
    name = torch_name(path)
    if name not in tensors:
      raise MissingTensorError(f"tensor {name!r} (params/{'/'.join(path)}) is missing from "
                               f"{source}")
    tensor = tensors[name]
    want = to_torch_shape(path, leaf.shape)
    if tuple(tensor.shape) != want:
      raise TensorShapeError(f"tensor {name!r}: expected shape {want}, found "
                             f"{tuple(tensor.shape)} in {source}")
    value = to_flax(path, tensor)
    bad = int(np.count_nonzero(~np.isfinite(value)))
    if bad:
      raise NonFiniteTensorError(f"tensor {name!r} holds {bad} NaN/inf values (of "
                                 f"{value.size}) in {source}")
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
    used.add(name)
  extra = sorted(set(tensors) - used)
  if extra:
    raise UnexpectedTensorError(f"tensor {extra[0]!r} in {source} has no place in the model"
                                + (f" ({len(extra) - 1} more)" if len(extra) > 1 else ""))
  return out


def load_pretrained(path: str | os.PathLike, class_name: str, config_from_diffusers,
                    init_params, **overrides) -> tuple[Any, dict]:
  """(config, params) of a diffusers model directory.

  config_from_diffusers: config.json dict -> our frozen config (`overrides` passed on);
  init_params: (config, rng) -> params, traced only through `jax.eval_shape`.
  """
  cfg = config_from_diffusers(read_config(path, class_name), **overrides)
  expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  return cfg, load_params(read_tensors(path), expected, source=model_dir(path))
