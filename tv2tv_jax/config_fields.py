"""How config sections are read: the error that names a field, building a frozen section
from a mapping.

`tv2tv_jax.config` builds every section with these; they sit below it so that the
sections and their readers share one spelling of each message.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from typing import Any, Mapping


class ConfigError(ValueError):
  """A config field holds a value the model cannot work with."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config field '{field}': {message}")
    self.field = field
    self.message = message  # without the field, for re-raising under another name


def did_you_mean(name: str, options) -> str:
  """' (did you mean 'x'?)' for the closest of `options`, '' when none is close."""
  close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_key_path(cfg: Any, path: str) -> None:
  """Raises ConfigError naming the first part of dotted `path` that `cfg` lacks.

  For command-line overrides (`--config.train.num_stepz=5`): ml_collections refuses an
  unknown key with a bare KeyError deep in flag parsing; this names the dotted key, the
  closest existing one and the keys the section has.
  """
  node, done = cfg, []
  for part in path.split("."):
    where = ".".join(done) or "the config"
    if not (hasattr(node, "keys") and hasattr(node, "__getitem__")):
      raise ConfigError(".".join(done), f"is a value ({node!r}), not a section: it has "
                        f"no key {part!r}")
    keys = sorted(node.keys())
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1)
      hint = f"did you mean {'.'.join(done + close)!r}? " if close else ""
      raise ConfigError(".".join(done + [part]), f"unknown key; {hint}{where} has "
                        f"{', '.join(keys)}")
    node, done = node[part], done + [part]


def build_section(cls, section: str, values: Mapping[str, Any] | None):
  """The frozen dataclass `cls` from a mapping (None: every default); an unknown field
  raises ConfigError naming `<section>.<field>` and the closest known one. Lists become
  tuples (a saved config.json holds lists where the config had tuples)."""
  values = dict(values or {})
  names = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ConfigError(f"{section}.{unknown[0]}", f"unknown field"
                      f"{did_you_mean(unknown[0], names)}; {cls.__name__} has "
                      f"{sorted(names)}")
  for key, value in values.items():
    if isinstance(value, list):
      values[key] = tuple(value)
  return cls(**values)


def require(cond: bool, field: str, message: str):
  """Raises ConfigError(field, message) unless `cond`."""
  if not cond:
    raise ConfigError(field, message)


def require_count(value: Any, field: str, minimum: int, meaning: str = "") -> None:
  """An integer >= minimum; a float or bool count would fail later inside range() or
  numpy, far from the field that holds it."""
  require(isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= minimum, field,
          f"must be an integer >= {minimum}{meaning}, got {value!r}")


class FrozenMapping(Mapping):
  """A read-only, hashable mapping: the nested sub-configs a section passes on unread
  (`data.toy_world`, `data.vae`, `data.builder_config`), whose owners check them.

  Nested mappings are frozen too, lists become tuples; `to_dict()` gives plain dicts back
  (tuples stay tuples, as ConfigDict.to_dict() gives them).
  """

  def __init__(self, values: Any = ()):
    values = values.to_dict() if hasattr(values, "to_dict") else dict(values or {})
    self._values = {k: freeze(v) for k, v in values.items()}

  def __getitem__(self, key):
    return self._values[key]

  def __iter__(self):
    return iter(self._values)

  def __len__(self):
    return len(self._values)

  def __hash__(self):
    return hash(tuple(sorted(self._values.items(), key=lambda kv: str(kv[0]))))

  def __repr__(self):
    return f"FrozenMapping({self._values!r})"

  def to_dict(self) -> dict[str, Any]:
    return {k: v.to_dict() if isinstance(v, FrozenMapping) else v
            for k, v in self._values.items()}


def freeze(value: Any) -> Any:
  """Mappings (ConfigDicts too) as FrozenMapping, lists as tuples, recursively."""
  if isinstance(value, Mapping) or hasattr(value, "to_dict"):
    return FrozenMapping(value)
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  return value


def plain_dict(values: Any) -> dict[str, Any]:
  """A section (ConfigDict, mapping or None) as a new plain dict."""
  return dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
