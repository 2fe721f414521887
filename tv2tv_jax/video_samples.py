"""Videos sampled from a restored run: prompts and interventions in, files out.

`generate_to_dir` is the library behind `python -m tv2tv_jax.generate` and `main`'s sample
after training; `sample_prompts` generates several prompts as the rows of one batch; the
helpers turn the run's tokenizers into the sampler's ids and latents and back
(`encode_text`, `first_frame_latent`, `decode_frames`, `decode_text`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tv2tv_jax import workdirs
from tv2tv_jax.config import REAL_SOURCES
from tv2tv_jax.run_state import Assets, GenerateError, load_assets
from tv2tv_jax.sampling import outputs


def parse_intervention(spec: str, fps: int = outputs.FPS,
                       frames_per_chunk: int = outputs.FRAMES_PER_CHUNK) -> tuple[int, str]:
  """'8:left fire' -> (8, 'left fire'); '1.5s:left fire' -> (the chunk at 1.5 s, ...).

  Raises GenerateError naming --intervene.
  """
  head, sep, text = spec.partition(":")
  head = head.strip()
  if sep and head.lstrip("-").isdigit():
    return int(head), text
  if sep and head.endswith("s"):
    try:
      seconds = float(head[:-1])
    except ValueError:
      seconds = None
    if seconds is not None:
      if not np.isfinite(seconds) or seconds < 0:
        raise GenerateError(f"--intervene {spec!r}: the time must be >= 0 seconds")
      return outputs.chunk_at_time(seconds, fps, frames_per_chunk), text
  raise GenerateError(f"--intervene {spec!r}: expected '<chunk index>:<text>' or "
                      f"'<seconds>s:<text>'")

def parse_interventions(specs: Sequence[str], fps: int = outputs.FPS,
                        frames_per_chunk: int = outputs.FRAMES_PER_CHUNK) -> dict[int, str]:
  """Every --intervene (`parse_intervention`) as {chunk: text}. Raises GenerateError
  naming both when two land on one chunk (silently keeping one would ignore the other)."""
  out, given = {}, {}
  for spec in specs:
    chunk, text = parse_intervention(spec, fps, frames_per_chunk)
    if chunk in out:
      raise GenerateError(f"--intervene {given[chunk]!r} and --intervene {spec!r} both set "
                          f"chunk {chunk}; give one text per chunk")
    out[chunk], given[chunk] = text, spec
  return out

def encode_text(assets: Assets, text: str, field: str) -> np.ndarray:
  """Text -> i32[N] ids; GenerateError naming `field` and the text if it cannot be encoded
  or holds ids beyond the model's vocabulary."""
  from data_pipelines.tokenizer import UnknownCharacterError
  try:
    ids = assets.text.encode(text)
  except UnknownCharacterError as e:
    raise GenerateError(f"{field}: {e}") from e
  vocab = assets.run.exp.model.vocab_size
  if ids.size and ids.max() >= vocab:
    raise GenerateError(f"{field} {text!r}: token id {int(ids.max())} is outside the model's "
                        f"vocabulary [0, {vocab})")
  return ids


def decode_text(assets: Assets, ids: Any) -> str:
  """i32[N] ids -> text (the sampler never draws ids past the tokenizer's vocabulary)."""
  return assets.text.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def first_frame_latent(assets: Assets, first_frame: Any, seed: int) -> tuple[np.ndarray, str]:
  """The normalised first-frame latent f32[h, w, c] and a description of its source.

  first_frame: None (for CS:GO and captioned-video runs the first latent of validation
  clip `seed` (modulo the split's size) of the run's prepared data; else frame 0 of
  toy-world clip `seed`), a .png / .npy path, or an array: uint8[H, W, 3] frame of the
  size the latent grid decodes to (h x w times the tokenizer's spatial factor), or
  f32[h, w, c] normalised latent.
  """
  from tv2tv_jax.vae import video_tokenizer
  latent_shape = tuple(assets.run.exp.model.latent_shape)
  # The frame the latent grid decodes to (any aspect ratio).
  frame_shape = tuple(n * assets.video.spatial_factor for n in latent_shape[:2]) + (3,)
  source = "array"
  if first_frame is None and assets.run.config.data.source in REAL_SOURCES:
    first_frame, source = _validation_first_latent(assets, seed)
  elif first_frame is None:
    from data_pipelines import toy_world
    first_frame, source = toy_world.generate_clip(seed, 1).frames[0], f"toy_world clip {seed}"
  elif isinstance(first_frame, (str, os.PathLike)):
    path, source = os.fspath(first_frame), os.fspath(first_frame)
    if not os.path.exists(path):
      raise GenerateError(f"--first_frame: {path} does not exist")
    try:
      if path.endswith(".npy"):
        first_frame = np.load(path)  # no pickles: an object array is refused here
      else:
        from PIL import Image
        first_frame = np.asarray(Image.open(path).convert("RGB"))
    except (ValueError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
      raise GenerateError(f"--first_frame: {path} cannot be read as a "
                          f"{'.npy array' if path.endswith('.npy') else 'image'} "
                          f"({type(e).__name__}: {e})") from e
  arr = np.asarray(first_frame)
  if arr.shape == latent_shape and np.issubdtype(arr.dtype, np.floating):
    if not np.isfinite(arr).all():
      raise GenerateError(f"--first_frame ({source}): the latent holds NaN or inf")
    return arr.astype(np.float32), source
  if arr.shape != frame_shape:
    raise GenerateError(f"--first_frame ({source}): shape {arr.shape}; expected a frame "
                        f"{frame_shape} or a float latent {latent_shape}")
  if arr.dtype != np.uint8:
    raise GenerateError(f"--first_frame ({source}): a frame must be uint8, got {arr.dtype}")
  z = assets.video.encode(video_tokenizer.to_float(arr)[None, None], normalized=True)
  return np.asarray(z[0, 0], np.float32), source


def _validation_first_latent(assets: Assets, seed: int) -> tuple[np.ndarray, str]:
  """The normalised first latent f32[h, w, c] of validation record `seed` mod N of the
  run's prepared latents, and its description."""
  from data_pipelines import latent_dataset
  latent_dir = os.path.join(assets.data_dir, "latents")
  try:
    src = latent_dataset.data_source(latent_dir, "validation")
  except (OSError, latent_dataset.LatentRecordError) as e:
    raise GenerateError(f"--first_frame: none given, and the run's validation latents in "
                        f"{latent_dir} cannot be read ({e}); give a --first_frame") from e
  if not len(src):
    raise GenerateError(f"--first_frame: none given, and {latent_dir} holds no validation "
                        f"clip to take one from")
  rec = latent_dataset.parse_record(src[seed % len(src)])
  return np.asarray(rec["latents"][0], np.float32), f"validation clip {rec['name']}"


def decode_frames(assets: Assets, first_latent: np.ndarray, chunks: np.ndarray) -> np.ndarray:
  """Normalised latents (first f32[h,w,c], chunks f32[N,h,w,c]) -> uint8[1 + 4N, H, W, 3]."""
  from tv2tv_jax.vae import video_tokenizer
  lat = np.concatenate([first_latent[None], np.asarray(chunks, np.float32)])
  frames = assets.video.decode(lat[None], normalized=True)
  return video_tokenizer.to_uint8(frames[0])


def cache_capacity(exp, prompt_len: int, num_chunks: int, max_text: int,
                   forced: Mapping[int, np.ndarray]) -> int:
  """Cache slots for the whole generation: prompt, first frame + EOF, per chunk text + BOF +
  clean chunk + EOF, and in Think2V the EOF closing each plan item (so no request of this
  size hits CacheFullError)."""
  n = exp.model.tokens_per_chunk
  text = sum(max(max_text, len(forced.get(i, ()))) for i in range(num_chunks))
  plan_eofs = num_chunks if exp.seq.layout == "think2v" else 0
  return prompt_len + n * (num_chunks + 1) + text + 2 * num_chunks + 2 + plan_eofs

def sample_prompts(assets: Assets, prompts: Sequence[str], interventions: Mapping[int, str],
                   num_chunks: int, sc_kwargs: Mapping[str, Any], seed: int, out_dir: str,
                   first_frame: Any = None, stems: Sequence[str] | None = None) -> list[str]:
  """Prompts -> files in out_dir, generated together as the rows of one batch.

  Every prompt gets the same interventions, first frame and seed; prompt k is
  written as `stems[k]`.* (see `outputs.write_all`). Returns the paths.
  Raises GenerateError / sampling.RequestError naming the bad field.
  """
  from tv2tv_jax.sampling import Request, SamplerConfig, sample
  exp = assets.run.exp
  if not isinstance(num_chunks, int) or num_chunks < 1:
    raise GenerateError(f"--num_chunks must be >= 1, got {num_chunks!r}")
  for i in interventions:
    if not 0 <= i < num_chunks:
      raise GenerateError(f"--intervene {i}:{interventions[i]!r}: chunk {i} is beyond the "
                          f"chunk budget (--num_chunks={num_chunks}: chunks 0..{num_chunks - 1})")
  prompt_ids = [encode_text(assets, p, "--prompt") for p in prompts]
  forced = {i: encode_text(assets, t, f"--intervene {i}") for i, t in interventions.items()}
  latent0, source = first_frame_latent(assets, first_frame, seed)
  sc = SamplerConfig(**{k: v for k, v in sc_kwargs.items()})
  # The model's vocabulary may be padded beyond the tokenizer's: never sample those ids.
  sc = dataclasses.replace(sc, text_vocab=min(assets.text.vocab_size, exp.model.vocab_size))
  sc = dataclasses.replace(sc, capacity=sc.capacity or cache_capacity(
      exp, max(len(p) for p in prompt_ids), num_chunks, sc.max_text_tokens, forced))
  gens = sample(assets.run.model, assets.params, exp,
                [Request(prompt=ids, num_chunks=num_chunks, first_frame=latent0,
                         interventions=forced, seed=seed) for ids in prompt_ids], sc)
  settings = {k: v for k, v in dataclasses.asdict(sc).items()}
  settings.update(num_chunks=num_chunks, first_frame=source, batch=len(prompts),
                  interventions={str(i): t for i, t in interventions.items()})
  paths = []
  for prompt, gen, stem in zip(prompts, gens, stems or ["sample"] * len(prompts)):
    frames = decode_frames(assets, latent0, gen.chunks)
    texts = [decode_text(assets, t) for t in gen.texts]
    doc = outputs.transcript(gen.to_json(), texts, prompt=prompt, settings=settings, seed=seed,
                             checkpoint_step=assets.step,
                             trailing_text=decode_text(assets, gen.trailing_text))
    paths += outputs.write_all(out_dir, frames, texts, doc, stem=stem)
  return paths

def generate_to_dir(workdir: str, prompts: Sequence[str], interventions: Mapping[int, str],
                    num_chunks: int, cfg_scale: float, ode_steps: int, seed: int,
                    out_dir: str | None = None, *, checkpoint: int | None = None,
                    first_frame: Any = None, solver: str = "euler", temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, max_text_tokens: int = 16,
                    assets: Assets | None = None, devices=None) -> list[str]:
  """Generates one sample per prompt into out_dir (default <workdir>/samples/<seed>).

  One prompt writes sample.{gif,json,mp4} and sample_sheet.png; several are generated
  together (one batch, all with `seed` and the same interventions) and write
  sample_<k>.*. `assets` (from `load_assets`) skips restoring the checkpoint again.
  Returns the paths.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts:
    raise GenerateError("--prompt: at least one prompt is needed")
  assets = assets or load_assets(workdir, checkpoint, devices)
  out_dir = out_dir or os.fspath(workdirs.as_path(workdir) / "samples" / str(seed))
  sc_kwargs = dict(steps=ode_steps, solver=solver, cfg_scale=cfg_scale,
                   temperature=temperature, top_k=top_k, top_p=top_p,
                   max_text_tokens=max_text_tokens)
  stems = ["sample"] if len(prompts) == 1 else [f"sample_{k}" for k in range(len(prompts))]
  args = (assets, list(prompts), dict(interventions), num_chunks, sc_kwargs, seed)
  if workdirs.is_local(out_dir):
    return sample_prompts(*args, out_dir, first_frame, stems)
  # The GIF / MP4 / PNG writers need local files: write them locally, then copy them up.
  import tempfile
  remote = workdirs.as_path(out_dir, "--out")
  remote.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    paths = []
    for path in sample_prompts(*args, tmp, first_frame, stems):
      dst = remote / os.path.basename(path)
      dst.write_bytes(workdirs.as_path(path).read_bytes())
      paths.append(os.fspath(dst))
  return paths
