"""The generation evaluation's inputs and outputs (docs/evaluation.md).

In: what it needs to know about the run it evaluates: its toy-world config, the clip
length and texts it was trained on (`trained_num_chunks`, `text_format`), and the seed
ranges its data and VAE used, so that held-out clips come from seeds none of them
reaches (`held_out_seeds`).
Out: scores.json and the contact sheets (`write_outputs`, `write_sheet`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from data_pipelines import caption_scores, oracle
from data_pipelines import toy_world as tw
from tv2tv_jax import config as config_lib

FIRST_HELD_OUT_SEED = 5_000_000
# Every toy-world seed the project trains on (TFDS train split, VAE training and held-out
# clips) is below this; the TFDS validation split sits at VALIDATION_SEED_OFFSET (1e9).
TRAINING_SEED_BOUND = 2_000_000
SHEET_CLIPS = 4


class EvalError(ValueError):
  """An evaluation input is missing or malformed; the message names the flag / field."""


# --------------------------------------------------------------------------- in

def _builder_config(cfg: Any):
  """The run's toy-world TFDS builder config (cfg.data.toy_world), None if it has none.
  `cfg`: the run's `config.RunConfig` (a raw config is parsed)."""
  from data_pipelines import toy_world_tfds
  fields = config_lib.as_run_config(cfg).data.toy_world
  try:
    return toy_world_tfds.resolve_config(fields, "run")
  except (TypeError, ValueError) as e:
    raise EvalError(f"data.toy_world of the run's config: {e}") from e


def text_format(cfg: Any) -> caption_scores.TextFormat:
  """The run's chunk texts (cfg.data.toy_world): action texts unless it trained on the
  toy world's caption mode; action texts too when the run names no toy world."""
  return caption_scores.text_format(_builder_config(cfg))


def trained_num_chunks(cfg: Any) -> int | None:
  """Chunks per clip the run was trained on (cfg.data.toy_world), None if not known."""
  builder = _builder_config(cfg)
  return None if builder is None else int(builder.num_chunks)


def used_seed_ranges(cfg: Any, data_dir: str | None) -> list[tuple[str, int, int]]:
  """[(what, first, end)] toy-world seed ranges the run's data and VAE were built from."""
  from data_pipelines import toy_world_tfds
  out = [("the project's training seeds", 0, TRAINING_SEED_BOUND)]
  b = _builder_config(cfg)
  if b is not None:
    off = toy_world_tfds.VALIDATION_SEED_OFFSET
    out += [("the TFDS train split", b.base_seed, b.base_seed + b.num_train),
            ("the TFDS validation split", b.base_seed + off, b.base_seed + off + b.num_validation)]
  vae_cfg = os.path.join(data_dir or "", "vae", "config.json")
  if data_dir and os.path.exists(vae_cfg):
    with open(vae_cfg) as f:
      t = json.load(f).get("train", {})
    if {"train_seed_start", "num_steps", "batch_size"} <= set(t):
      start = int(t["train_seed_start"])
      # Steps use start + step * batch + [0, batch); latent statistics the first stats_clips.
      out.append(("the VAE's training clips", start, start + max(
          int(t["num_steps"]) * int(t["batch_size"]), int(t.get("stats_clips", 0)))))
    if {"eval_seed_start", "eval_clips"} <= set(t):
      out.append(("the VAE's held-out clips", int(t["eval_seed_start"]),
                  int(t["eval_seed_start"]) + int(t["eval_clips"])))
  return out


def held_out_seeds(first_seed: int, count: int, cfg: Any,
                   data_dir: str | None = None) -> list[int]:
  """Seeds first_seed .. first_seed + count - 1, after checking that no seed range the
  run used reaches them (`used_seed_ranges`). Raises EvalError naming --first_seed."""
  if first_seed < 0 or count < 1:
    raise EvalError(f"--first_seed must be >= 0 and --num_clips >= 1, got {first_seed}, "
                    f"{count}")
  end = first_seed + count
  for what, lo, hi in used_seed_ranges(cfg, data_dir):
    if first_seed < hi and lo < end:
      raise EvalError(f"--first_seed: evaluation seeds [{first_seed}, {end}) overlap "
                      f"{what} [{lo}, {hi}); pick seeds no split reaches")
  return list(range(first_seed, end))


def read_text(a: tw.Action) -> str:
  """An Action as the sheets and records show it: its text, "unknown" for the movement
  the oracle could not read."""
  if a.movement == oracle.UNKNOWN:
    return "unknown fire" if a.fire else "unknown"
  return tw.action_text(a)


# --------------------------------------------------------------------------- out

def write_sheet(path: str, runs: Sequence[dict[str, Any]], clips: Sequence[tw.Clip],
                title: str, limit: int = SHEET_CLIPS, scale: int = 2) -> str:
  """PNG of the first `limit` clips of a condition, one strip each: the first frame, then
  each chunk's last frame with its text and the oracle's reading under it; the
  intervened chunk (a forced caption: every chunk it covers) is framed in red and the
  forced text starred."""
  from PIL import Image, ImageDraw, ImageFont
  font = ImageFont.load_default()
  runs = list(runs)[:limit]
  k = len(runs[0]["generated"].texts) if runs else 0
  size = (runs[0]["generated"].frames.shape[1] if runs else 64) * scale
  cell, head, foot = size + 6, 16, 30
  sheet = Image.new("RGB", ((1 + k) * cell + 4, 18 + len(runs) * (head + size + foot)),
                    (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((4, 3), title, fill=(0, 0, 0), font=font)
  for row, (run, clip) in enumerate(zip(runs, clips)):
    y0 = 18 + row * (head + size + foot)
    g = run["generated"]
    iv = run.get("intervention")
    covered = 0 if iv is None else len(getattr(iv, "actions", ())) or 1
    framed = range(iv.chunk + 1, iv.chunk + 1 + covered) if iv is not None else range(0)
    draw.text((4, y0 + 2), f"clip {clip.seed}" + (
        f"   inserted at chunk {iv.chunk}: '{iv.text}' (own: '{iv.own_text}')" if iv else ""),
        fill=(0, 0, 0), font=font)
    for col in range(1 + k):
      frame = g.frames[0 if col == 0 else 4 * col]
      x, y = 3 + col * cell, y0 + head
      if col in framed:
        draw.rectangle([x - 3, y - 3, x + size + 2, y + size + 2], fill=(220, 0, 0))
      sheet.paste(Image.fromarray(frame).resize((size, size), Image.NEAREST), (x, y))
      if col == 0:
        lines = ["first frame"]
      else:
        mark = "*" if iv is not None and col == iv.chunk + 1 else ""
        lines = [f"{mark}[{col - 1}] {g.texts[col - 1]}"[:size // 6],
                 f"read {read_text(run['read'][col - 1])}"[:size // 6]]
      for n, line in enumerate(lines):
        draw.text((x, y + size + 3 + 12 * n), line, fill=(0, 0, 0), font=font)
  # The toy world's palette and the labels fit 256 colours: a quarter of the RGB file's
  # size, which matters for sheets committed with results.
  sheet.quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
  return path


def _jsonable(x: Any) -> Any:
  """NaN -> None (strict JSON), numpy scalars -> Python."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not np.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def write_outputs(out_dir: str, doc: dict[str, Any], clips: Sequence[tw.Clip]) -> list[str]:
  """scores.json and sheet_<condition>.png (model) / ceiling_sheet_<condition>.png."""
  os.makedirs(out_dir, exist_ok=True)
  doc = dict(doc)
  runs, ceiling_runs = doc.pop("_runs"), doc.pop("_ceiling_runs", None)
  paths = [os.path.join(out_dir, "scores.json")]
  with open(paths[0], "w") as f:
    json.dump(_jsonable(doc), f, indent=1, allow_nan=False)
  for who, rs in (("model", runs), ("ceiling", ceiling_runs)):
    for name, cond in (rs or {}).items():
      stem = "sheet" if who == "model" else "ceiling_sheet"
      paths.append(write_sheet(os.path.join(out_dir, f"{stem}_{name}.png"), cond, clips,
                               f"{who}: {name}"))
  return paths
