"""The prepared latent dataset: its record format, how it is read, and the encode command.

    python -m data_pipelines.latent_dataset --tfds_dir=DATA/tfds --tfds_config=tiny \
        --vae_dir=DATA/vae --out_dir=DATA/latents \
        [--builder=toy_world|csgo_dust2|captioned_video] [--shard_size=256] [--batch=8] \
        [--distributed | --coordinator_address=host:port --num_processes=N --process_id=i]

Started on every host of a pod (same command, `--distributed` or the coordinator flags of
`tv2tv_jax.distributed`), each process encodes its own shards into the same, shared
`out_dir` (`latent_encode`, which also says what is identical across process counts).

Format (grain-readable ArrayRecord, no TFDS builder: the records are produced by a model,
not by a procedural generator, so a builder's `_generate_examples` would have to load the
VAE anyway). In `out_dir`:

  <split>-SSSSS-of-NNNNN.array_record
                         shard S of N: the split's examples [S * shard_size, (S+1) *
                         shard_size), good ones only, in example order (group_size 1 for
                         random access). Each record is a msgpack map
                         (`flax.serialization.msgpack_serialize`):
                           name     str           e.g. "train/seed_000000012" (from TFDS)
                           seed     int           the clip's seed; for builders without one
                                                  a stable hash of the name (`stable_seed`)
                           latents  f32[1+k, h, w, c]  VAE latent means, normalised per channel
                                                  with latent_stats.json; [0] is the first frame
                           texts    list[str] (k) the per-chunk training texts (may be "")
                           source   {str: str|int|float}  only for builders whose examples carry
                                                  scalar identity features besides name and seed
                                                  (CS:GO: file, start_frame; captioned video:
                                                  file, clip_index, start_time, prompt)
  <split>-SSSSS-of-NNNNN.json   that shard's summary (records, skipped clips, plan hash)
  latent_stats.json      per-channel {"mean": [c], "std": [c]} used for the normalisation
                         (the VAE's own stats; `tv2tv_jax.vae.model.denormalize` undoes it)
  meta.json              written last: {"splits": {split: {"num_records", "num_examples",
                         "skipped": [{"name", "kind", "reason"}], "seconds", "shards": [{"file",
                         "examples": [start, stop], "num_records", "num_skipped"}]}},
                         "latent_shape": [h, w, c], "num_chunks": k, "tfds": {"name",
                         "config", "version", "config_fields"}, "encoder": name, "encoder_info",
                         "layout": "shards", "shard_size", "batch_per_device", "plan",
                         "encode_run": {how this run was spread over processes and devices}}

The older single-file layout (`<split>.array_record` holding the whole split, meta.json
without "shards") is still read: `data_source` picks whichever layout meta.json describes.

Texts are stored as strings, not token ids: the tokenizer can be retrained (or swapped
for Llama-3's) without re-encoding video, which is the expensive part.

Bad records (a wrong frame count, non-finite latents, missing texts) are reported by name
and skipped; the count is in meta.json and in the returned summary.

Reading (`data_source`): a truncated or non-ArrayRecord file fails on opening, a damaged
record when it is read, a shard holding another record count than meta.json says on
opening; all raise LatentRecordError naming the file (and the record index), since a
broken dataset must stop a run rather than feed it.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from flax import serialization

SPLITS = ("train", "validation")
# Example features that are the record itself rather than identity fields of its source.
RECORD_FEATURES = ("name", "seed", "frames", "texts")


@dataclasses.dataclass(frozen=True)
class LatentEncoder:
  """What turns frames into stored latents.

  Attributes:
    encode: frames f32[B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents f32[B, 1+k, h, w, c]
      (any host function; used as is when `apply` is None).
    stats: {"mean": [c], "std": [c]} the normalisation used (written to latent_stats.json).
    name: recorded in meta.json (e.g. the VAE directory's base name).
    apply: optional pure JAX form of `encode`, (params, frames) -> latents with the shapes
      above; when given, the encode is jitted with the batch sharded over the devices
      (`latent_encode.sharded_encode_fn`).
    params: the pytree `apply` takes.
    info: JSON-able description of the encoder for meta.json (config, parameter hash).
  """
  encode: Callable[[np.ndarray], Any]
  stats: dict[str, list[float]]
  name: str
  apply: Callable[[Any, Any], Any] | None = None
  params: Any = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def vae_encoder(vae_dir: str) -> LatentEncoder:
  """The video tokenizer in `vae_dir` (either layout of `tv2tv_jax.vae.tokenizer_store`: our
  trained VAE or a converted pretrained one), normalising latents with its
  latent_stats.json. Its identity (kind and weights hash) goes into meta.json, which is what
  sampling checks the tokenizer it decodes with against."""
  from tv2tv_jax.vae import tokenizer_store
  tok = tokenizer_store.load(vae_dir)
  if tok.stats is None:
    raise ValueError(f"{vae_dir} has no latent_stats.json; normalised latents need it")

  def apply(params, frames):
    return dataclasses.replace(tok, params=params).encode(frames, normalized=True)

  ident = tokenizer_store.identity(vae_dir)
  # Our own VAE's entry stays as it was before other kinds existed (no "kind"), so that
  # the encode plan of latent datasets in progress keeps its hash.
  info = {"vae_config": dataclasses.asdict(tok.config), "params_sha256": ident["params_sha256"],
          **({"kind": ident["kind"]} if ident["kind"] != tokenizer_store.OWN else {})}
  return LatentEncoder(lambda frames: tok.encode(frames, normalized=True), tok.stats.to_json(),
                       os.path.basename(os.path.normpath(vae_dir)), apply, tok.params, info)


def stable_seed(name: str) -> int:
  """A clip's seed when its builder has none: 63 bits of sha256(name), so the same clip gets
  the same seed (and the same caption knobs in the Grain pipeline) in every encode."""
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") >> 1


def record_bytes(name: str, seed: int, latents: np.ndarray, texts: Sequence[str],
                 source: Mapping[str, Any] | None = None) -> bytes:
  """Serialises one clip (see the module docstring for the fields). latents: f32[1+k, h, w, c].
  Without `source` the bytes are those of the original toy-world format."""
  rec = {"name": str(name), "seed": int(seed),
         "latents": np.ascontiguousarray(latents, np.float32),
         "texts": [str(t) for t in texts]}
  if source:
    rec["source"] = dict(source)
  return serialization.msgpack_serialize(rec)


def parse_record(raw: bytes) -> dict[str, Any]:
  """Inverse of `record_bytes`: {"name": str, "seed": int, "latents": f32[1+k,h,w,c],
  "texts": list[str]} and "source" (dict) when the record has one."""
  rec = serialization.msgpack_restore(raw)
  texts = rec["texts"]
  if isinstance(texts, dict):  # msgpack_restore turns lists of leaves into {"0": ...}
    texts = [texts[str(i)] for i in range(len(texts))]
  out = {"name": rec["name"], "seed": int(rec["seed"]),
         "latents": np.asarray(rec["latents"], np.float32), "texts": list(texts)}
  if "source" in rec:
    out["source"] = dict(rec["source"])
  return out


def split_path(out_dir: str, split: str) -> str:
  """The single file of a split in the older layout (module docstring)."""
  return os.path.join(out_dir, f"{split}.array_record")


def shard_name(split: str, shard: int, num_shards: int) -> str:
  """A shard's file name: shard 3 of 10 of train is "train-00003-of-00010.array_record"."""
  return f"{split}-{shard:05d}-of-{num_shards:05d}.array_record"


def shard_paths(out_dir: str, split: str) -> list[str]:
  """The split's shard files in shard order, as meta.json lists them."""
  return [os.path.join(out_dir, s["file"]) for s in load_meta(out_dir)["splits"][split]["shards"]]


class LatentRecordError(RuntimeError):
  """A latent ArrayRecord file cannot be opened (truncated, not ArrayRecord) or one of its
  records cannot be read (corrupt chunk); the message names the file and record index."""


class LatentRecordSource:
  """Random-access source of one file's raw records (bytes) whose errors name the file.

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


class ShardedRecordSource:
  """The shards of one split read as one random-access source, in shard order.

  Record i of the split is record i - offset[s] of the shard s holding it, so the order
  depends only on the shard files, never on how many processes wrote them. Errors name
  the shard file (`LatentRecordSource`). Picklable.
  """

  def __init__(self, paths: Sequence[str], counts: Sequence[int] | None = None):
    self.paths = list(paths)
    self._shards = [LatentRecordSource(p) for p in self.paths]
    for src, want in zip(self._shards, counts or []):
      if len(src) != want:
        raise LatentRecordError(f"{src.path}: holds {len(src)} records, meta.json says {want} "
                                "(a shard replaced after the encode finished?)")
    self._ends = np.cumsum([len(s) for s in self._shards]).tolist()

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index) -> bytes:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)}")
    s = bisect.bisect_right(self._ends, index)
    return self._shards[s][index - (self._ends[s - 1] if s else 0)]

  def __repr__(self) -> str:
    return f"ShardedRecordSource({len(self.paths)} shards, first {self.paths[:1]})"


def data_source(out_dir: str, split: str) -> ShardedRecordSource | LatentRecordSource:
  """Random-access source of the split's raw records (bytes), in the order the dataset
  defines (example order); `parse_record` decodes one. Either layout (module docstring).

  Raises:
    FileNotFoundError, LatentRecordError: naming the file.
  """
  meta_path = os.path.join(out_dir, "meta.json")
  split_meta = load_meta(out_dir)["splits"].get(split) if os.path.exists(meta_path) else None
  if split_meta is not None and "shards" in split_meta:
    return ShardedRecordSource([os.path.join(out_dir, s["file"]) for s in split_meta["shards"]],
                               [s["num_records"] for s in split_meta["shards"]])
  single = split_path(out_dir, split)
  if not os.path.exists(single) and glob.glob(os.path.join(glob.escape(out_dir),
                                                           f"{split}-*-of-*.array_record")):
    raise LatentRecordError(f"{out_dir}: {split} shards but no meta.json listing them: the "
                            "encode has not finished (run it again to resume)")
  return LatentRecordSource(single)


def load_meta(out_dir: str) -> dict[str, Any]:
  with open(os.path.join(out_dir, "meta.json")) as f:
    return json.load(f)


def _decode_text(t: Any) -> str:
  return t.decode("utf-8") if isinstance(t, bytes) else str(t)


def _scalar(v: Any) -> str | int | float | None:
  """A JSON/msgpack scalar for a scalar example feature, None for anything else."""
  if isinstance(v, (str, bytes)):
    return _decode_text(v)
  if np.ndim(v) != 0:
    return None
  v = np.asarray(v)
  if v.dtype.kind in "iub":
    return int(v)
  return float(v) if v.dtype.kind == "f" else None


def clip_fields(ex: Mapping[str, Any], want_frames: int, index: int = 0
                ) -> tuple[dict[str, Any], dict[str, str] | None]:
  """Normalises an example of any of this codebase's builders to the record's fields.

  Args:
    ex: name, frames u8[1+4k, H, W, 3], texts[k] (str or bytes), optional seed, and any
      scalar identity features (kept as `source`).
    want_frames: 1 + 4k.
    index: the example's index in its split (names an example without a name).
  Returns:
    ({"name", "seed", "texts", "source"}, None), or (that, {"name", "kind", "reason"}) when
    the example cannot be encoded (kinds as in `tfds_common.BAD_RECORD_KINDS`).
  """
  name = _decode_text(ex["name"]) if "name" in ex else f"example {index}"
  seed = int(ex["seed"]) if "seed" in ex else stable_seed(name)
  source = {k: s for k, v in ex.items() if k not in RECORD_FEATURES
            and (s := _scalar(v)) is not None}
  fields = {"name": name, "seed": seed, "texts": [], "source": source}
  bad = lambda kind, reason: (fields, {"name": name, "kind": kind, "reason": reason})
  if "frames" not in ex:
    return bad("missing_key", "no frames")
  if "texts" not in ex or ex["texts"] is None:
    return bad("missing_key", "no texts")
  frames = np.asarray(ex["frames"])
  if frames.ndim != 4 or frames.shape[0] != want_frames or frames.shape[-1] != 3:
    return bad("wrong_shape", f"frames have shape {frames.shape}, expected ({want_frames}, "
               "H, W, 3)")
  if len(ex["texts"]) != (want_frames - 1) // 4:
    return bad("wrong_shape", f"{len(ex['texts'])} texts for {(want_frames - 1) // 4} chunks")
  fields["texts"] = [_decode_text(t) for t in ex["texts"]]
  return fields, None


def encode_split(examples: Iterable[Mapping[str, Any]], encode_fn: Callable[[np.ndarray], Any],
                 out_path: str, num_chunks: int, batch: int = 8,
                 log: Callable[[str], None] = print, first_index: int = 0) -> dict[str, Any]:
  """Encodes examples (`clip_fields`: name, frames u8[1+4k,H,W,3], texts, ...) and writes
  one ArrayRecord file of the good ones, in order.

  Args:
    encode_fn: frames f32[B, 1+4k, H, W, 3] in [-1, 1] -> normalised latents
      f32[B, 1+k, h, w, c], B <= batch.
    batch: clips per `encode_fn` call.
    first_index: the split index of the first example (names examples without a name).
  Returns:
    {"num_records": int, "skipped": [{"name", "kind", "reason"}], "seconds": float,
     "latent_shape": [h, w, c] of the written latents (None if none were written)}.
  """
  from array_record.python import array_record_module as ar  # local: heavy import
  want_frames = 1 + 4 * num_chunks
  writer = ar.ArrayRecordWriter(out_path, "group_size:1")
  skipped, written, pending, shape = [], 0, [], None
  t0 = time.time()

  def skip(report):
    skipped.append(report)
    log(f"latent dataset: skipping {report['name']}: {report['reason']}")

  def flush():
    nonlocal written, shape
    if not pending:
      return
    frames = np.stack([np.asarray(e["frames"], np.float32) / 127.5 - 1.0 for _, e in pending])
    z = np.asarray(encode_fn(frames), np.float32)
    for (f, _), lat in zip(pending, z):
      if not np.isfinite(lat).all():
        skip({"name": f["name"], "kind": "non_finite", "reason": "latents contain NaN or inf"})
        continue
      writer.write(record_bytes(f["name"], f["seed"], lat, f["texts"], f["source"]))
      written += 1
      shape = list(lat.shape[1:])
    pending.clear()

  for i, ex in enumerate(examples):
    fields, report = clip_fields(ex, want_frames, first_index + i)
    if report is not None:
      skip(report)
      continue
    pending.append((fields, ex))
    if len(pending) == batch:
      flush()
  flush()
  writer.close()
  return {"num_records": written, "skipped": skipped, "seconds": time.time() - t0,
          "latent_shape": shape}


def build_latent_dataset(tfds_dir: str, tfds_config: Any, encoder: LatentEncoder | str,
                         out_dir: str, splits: Sequence[str] | None = SPLITS, batch: int = 8,
                         log: Callable[[str], None] = print, *, builder: str = "toy_world",
                         shard_size: int = 256, process_index: int = 0,
                         process_count: int = 1, devices: Sequence[Any] | None = None
                         ) -> dict[str, Any]:
  """Encodes the splits of a TFDS dataset of this codebase (built in `tfds_dir`) into
  `out_dir` (module docstring), resuming an interrupted encode there.

  Args:
    tfds_config: a builder config name ("tiny", ...) or a builder config object.
    encoder: a `LatentEncoder`, or a VAE work directory (`vae_encoder`).
    splits: the splits to encode (None: every split the builder has).
    batch: clips per device per encode call.
    builder: a name of `latent_encode.BUILDERS` (toy_world, csgo_dust2, captioned_video).
    shard_size: examples per shard.
    process_index / process_count: this process's share of the shards. The defaults
      encode everything here, as the main job's process 0 does while the others wait;
      the command passes jax.process_index() / jax.process_count().
    devices: the devices the encode is sharded over (default: this process's).
  Returns:
    meta.json's content. meta.json is written last, so its presence marks a complete
    dataset.
  """
  from data_pipelines import latent_encode  # local: latent_encode builds on this module
  if isinstance(encoder, str):
    encoder = vae_encoder(encoder)
  tfds_builder = latent_encode.load_builder(builder, tfds_config, tfds_dir)
  return latent_encode.encode_tfds(tfds_builder, encoder, out_dir, splits=splits,
                                   shard_size=shard_size, batch=batch, devices=devices,
                                   process_index=process_index, process_count=process_count,
                                   log=log)


def main(argv: Sequence[str] | None = None):
  from data_pipelines import latent_encode
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tfds_dir", required=True, help="TFDS data_dir holding the dataset")
  parser.add_argument("--builder", default="toy_world", choices=sorted(latent_encode.BUILDERS))
  parser.add_argument("--tfds_config", default="tiny", help="the builder's config name")
  parser.add_argument("--vae_dir", required=True, help="work directory of a trained VAE")
  parser.add_argument("--out_dir", required=True, help="where to write the latent dataset "
                      "(with several processes: a directory every process sees)")
  parser.add_argument("--splits", default=None, help="comma-separated (default: all)")
  parser.add_argument("--batch", type=int, default=8, help="clips per device per encode call")
  parser.add_argument("--shard_size", type=int, default=256, help="examples per shard")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  # What is left are the process flags of tv2tv_jax.distributed (multi-host, CPU devices).
  from absl import flags
  from tv2tv_jax import distributed
  flags.FLAGS([sys.argv[0], *rest])
  distributed.setup_process()
  import jax
  meta = build_latent_dataset(
      args.tfds_dir, args.tfds_config, args.vae_dir, args.out_dir,
      args.splits.split(",") if args.splits else None, args.batch, builder=args.builder,
      shard_size=args.shard_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  if jax.process_index() == 0:
    print(json.dumps({s: v["num_records"] for s, v in meta["splits"].items()}))


if __name__ == "__main__":
  main()
