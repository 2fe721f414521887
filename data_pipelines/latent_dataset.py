"""Offline step: encode a toy-world TFDS split with a trained VAE into a latent dataset.

    python -m data_pipelines.latent_dataset --tfds_dir=DATA/tfds --tfds_config=tiny \
        --vae_dir=DATA/vae --out_dir=DATA/latents

Format (grain-readable ArrayRecord, no TFDS builder: the records are produced by a model,
not by a procedural generator, so a builder's `_generate_examples` would have to load the
VAE anyway). In `out_dir`:

  <split>.array_record   one record per clip (ArrayRecord, group_size 1 for random access);
                         each record is a msgpack map (`flax.serialization.msgpack_serialize`):
                           name     str           e.g. "train/seed_000000012" (from TFDS)
                           seed     int           the clip's seed
                           latents  f32[1+k, h, w, c]  VAE latent means, normalised per channel
                                                  with latent_stats.json; [0] is the first frame
                           texts    list[str] (k) the per-chunk training texts (may be "")
  latent_stats.json      per-channel {"mean": [c], "std": [c]} used for the normalisation
                         (the VAE's own stats; `tv2tv_jax.vae.model.denormalize` undoes it)
  meta.json              {"splits": {split: {"num_records", "skipped": [{"name", "reason"}]}},
                          "latent_shape": [h, w, c], "num_chunks": k, "tfds": ..., "encoder": ...}

Texts are stored as strings, not token ids: the tokenizer can be retrained (or swapped
for Llama-3's) without re-encoding video, which is the expensive part.

Bad records (a wrong frame count, non-finite latents, missing texts) are reported by name
and skipped; the count is in meta.json and in the returned summary.

Reading (`data_source`): a truncated or non-ArrayRecord file fails on opening, a damaged
record when it is read; both raise LatentRecordError naming the file (and the record
index), since a broken dataset must stop a run rather than feed it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from flax import serialization

SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
  """What turns frames into stored latents.

  Attributes:
    encode: frames f32[B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents f32[B, 1+k, h, w, c].
    stats: {"mean": [c], "std": [c]} the normalisation used (written to latent_stats.json).
    name: recorded in meta.json (e.g. the VAE directory's base name).
  """
  encode: Callable[[np.ndarray], Any]
  stats: dict[str, list[float]]
  name: str


def vae_encoder(vae_dir: str) -> LatentEncoder:
  """The trained VAE in `vae_dir` (`tv2tv_jax.vae.video_tokenizer.save` layout), normalising latents
  with its latent_stats.json."""
  from tv2tv_jax.vae import video_tokenizer
  tok = video_tokenizer.load_tokenizer(vae_dir)
  if tok.stats is None:
    raise ValueError(f"{vae_dir} has no latent_stats.json; normalised latents need it")
  return LatentEncoder(lambda frames: tok.encode(frames, normalized=True), tok.stats.to_json(),
                       os.path.basename(os.path.normpath(vae_dir)))


def record_bytes(name: str, seed: int, latents: np.ndarray, texts: Sequence[str]) -> bytes:
  """Serialises one clip (see the module docstring for the fields)."""
  return serialization.msgpack_serialize({
      "name": str(name), "seed": int(seed),
      "latents": np.ascontiguousarray(latents, np.float32),
      "texts": [str(t) for t in texts]})


def parse_record(raw: bytes) -> dict[str, Any]:
  """Inverse of `record_bytes`: {"name": str, "seed": int, "latents": f32[1+k,h,w,c],
  "texts": list[str]}."""
  rec = serialization.msgpack_restore(raw)
  texts = rec["texts"]
  if isinstance(texts, dict):  # msgpack_restore turns lists of leaves into {"0": ...}
    texts = [texts[str(i)] for i in range(len(texts))]
  return {"name": rec["name"], "seed": int(rec["seed"]),
          "latents": np.asarray(rec["latents"], np.float32), "texts": list(texts)}


def split_path(out_dir: str, split: str) -> str:
  return os.path.join(out_dir, f"{split}.array_record")


class LatentRecordError(RuntimeError):
  """A latent ArrayRecord file cannot be opened (truncated, not ArrayRecord) or one of its
  records cannot be read (corrupt chunk); the message names the file and record index."""


class LatentRecordSource:
  """Random-access source of one split's raw records (bytes) whose errors name the file.

  Wraps `grain.sources.ArrayRecordDataSource`, whose reader raises a bare RuntimeError
  ("Failed to read RiegeliPostscript", sometimes an empty message) that names neither the
  file nor the record. Picklable (the path and Grain's source), so Grain workers reopen it.
  """

  def __init__(self, path: str):
    import grain  # local: keeps this module importable without grain for the writer tests
    self.path = path
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such latent ArrayRecord file")
    try:  # opening reads the footer and index: a truncated file fails here
      self._source = grain.sources.ArrayRecordDataSource([path])
    except Exception as e:
      raise LatentRecordError(f"{path}: cannot open as an ArrayRecord file (truncated or not "
                              f"one?): {type(e).__name__}: {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> bytes:
    try:
      return self._source[index]
    except IndexError:
      raise
    except Exception as e:  # a corrupt chunk fails its checksum only when read
      raise LatentRecordError(f"{self.path}: record {int(index)} of {len(self)} cannot be "
                              f"read: {type(e).__name__}: {e}") from e

  def __repr__(self) -> str:
    return f"LatentRecordSource({self.path!r})"


def data_source(out_dir: str, split: str) -> LatentRecordSource:
  """Random-access source of raw records (bytes); `parse_record` decodes one.

  Raises:
    FileNotFoundError, LatentRecordError: naming the file (module doc: <split>.array_record).
  """
  return LatentRecordSource(split_path(out_dir, split))


def load_meta(out_dir: str) -> dict[str, Any]:
  with open(os.path.join(out_dir, "meta.json")) as f:
    return json.load(f)


def _decode_text(t: Any) -> str:
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def _check_clip(ex: dict[str, Any], want_frames: int) -> str | None:
  """Why a TFDS example cannot be encoded, or None."""
  frames = np.asarray(ex["frames"])
  if frames.ndim != 4 or frames.shape[0] != want_frames or frames.shape[-1] != 3:
    return f"frames have shape {frames.shape}, expected ({want_frames}, H, W, 3)"
  if len(ex["texts"]) != (want_frames - 1) // 4:
    return f"{len(ex['texts'])} texts for {(want_frames - 1) // 4} chunks"
  return None


def encode_split(examples: Iterable[dict[str, Any]], encode_fn: Callable[[np.ndarray], Any],
                 out_path: str, num_chunks: int, batch: int = 8,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Encodes TFDS examples (dicts with name, seed, frames u8[1+4k,H,W,3], texts) and writes
  one ArrayRecord file.

  Args:
    encode_fn: frames f32[B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents
      f32[B, 1+k, h, w, c].
  Returns:
    {"num_records": int, "skipped": [{"name", "reason"}], "seconds": float,
     "latent_shape": [h, w, c] of the written latents (None if none were written)}.
  """
  from array_record.python import array_record_module as ar  # local: heavy import
  want_frames = 1 + 4 * num_chunks
  writer = ar.ArrayRecordWriter(out_path, "group_size:1")
  skipped, written, pending, shape = [], 0, [], None
  t0 = time.time()

  def flush():
    nonlocal written, shape
    if not pending:
      return
    frames = np.stack([np.asarray(e["frames"], np.float32) / 127.5 - 1.0 for e in pending])
    z = np.asarray(encode_fn(frames), np.float32)
    for e, lat in zip(pending, z):
      name = _decode_text(e["name"])
      if not np.isfinite(lat).all():
        skipped.append({"name": name, "reason": "latents contain NaN or inf"})
        log(f"latent dataset: skipping {name}: latents contain NaN or inf")
        continue
      writer.write(record_bytes(name, int(e["seed"]), lat,
                                [_decode_text(t) for t in e["texts"]]))
      written += 1
      shape = list(lat.shape[1:])
    pending.clear()

  for ex in examples:
    reason = _check_clip(ex, want_frames)
    if reason is not None:
      name = _decode_text(ex.get("name", b"?"))
      skipped.append({"name": name, "reason": reason})
      log(f"latent dataset: skipping {name}: {reason}")
      continue
    pending.append(ex)
    if len(pending) == batch:
      flush()
  flush()
  writer.close()
  return {"num_records": written, "skipped": skipped, "seconds": time.time() - t0,
          "latent_shape": shape}


def build_latent_dataset(tfds_dir: str, tfds_config: Any, encoder: LatentEncoder | str,
                         out_dir: str, splits: Sequence[str] = SPLITS, batch: int = 8,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
  """Encodes every split of the toy-world TFDS dataset (built in `tfds_dir`); writes
  `out_dir` (module docstring).

  Args:
    tfds_config: a builder config name ("tiny", ...) or a `ToyWorldBuilderConfig`.
    encoder: a `LatentEncoder`, or a VAE work directory (`vae_encoder`).
  Returns:
    meta.json's content. meta.json is written last, so its presence marks a complete
    dataset.
  """
  from data_pipelines import toy_world_tfds

  if isinstance(encoder, str):
    encoder = vae_encoder(encoder)
  builder = toy_world_tfds.ToyWorld(config=tfds_config, data_dir=tfds_dir)
  k = builder.builder_config.num_chunks
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "latent_stats.json"), "w") as f:
    json.dump(encoder.stats, f, indent=2)
  meta = {"splits": {}, "num_chunks": k, "latent_shape": None,
          "tfds": {"config": builder.builder_config.name, "version": str(builder.version)},
          "encoder": encoder.name}
  for split in splits:
    src = builder.as_data_source(split=split)
    result = encode_split((src[i] for i in range(len(src))), encoder.encode,
                          split_path(out_dir, split), k, batch, log)
    log(f"latent dataset: {split}: {result['num_records']} clips encoded in "
        f"{result['seconds']:.1f}s, {len(result['skipped'])} skipped")
    meta["latent_shape"] = meta["latent_shape"] or result.pop("latent_shape")
    result.pop("latent_shape", None)
    meta["splits"][split] = result
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tfds_dir", required=True, help="TFDS data_dir holding toy_world")
  parser.add_argument("--tfds_config", default="tiny", help="toy_world builder config name")
  parser.add_argument("--vae_dir", required=True, help="work directory of a trained VAE")
  parser.add_argument("--out_dir", required=True, help="where to write the latent dataset")
  parser.add_argument("--batch", type=int, default=8, help="clips per encode call")
  args = parser.parse_args(argv)
  meta = build_latent_dataset(args.tfds_dir, args.tfds_config, args.vae_dir, args.out_dir,
                              batch=args.batch)
  print(json.dumps({s: v["num_records"] for s, v in meta["splits"].items()}))


if __name__ == "__main__":
  main()
