"""Encoding at scale (data_pipelines/latent_encode.py): shards with deterministic names, the
same bytes on any mesh and any number of processes, resume without re-encoding finished
shards, any builder's examples, and the older single-file layout still read."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines import latent_dataset, latent_encode, toy_world_tfds
from experiments import vae_toy_world
from tv2tv_jax.vae import model as vae_model, video_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD, BATCH = 3, 2  # toy_world/tiny: train 8 clips -> shards of 3, 3, 2; validation 4 -> 3, 1
RUN_FIELDS = ("seconds", "encode_run")  # meta.json fields that describe the run, not the data


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
  """toy_world/tiny built with TFDS, and a tiny VAE (random params, non-trivial stats)."""
  root = tmp_path_factory.mktemp("encode")
  tfds_dir, vae_dir = str(root / "tfds"), str(root / "vae")
  toy_world_tfds.ToyWorld(config="tiny", data_dir=tfds_dir).download_and_prepare()
  cfg = vae_model.vae_config_from_dict(vae_toy_world.get_config("tiny").vae.to_dict())
  stats = vae_model.LatentStats(np.array([0.1, -0.2, 0.0, 0.3], np.float32),
                                np.array([1.5, 0.5, 2.0, 1.0], np.float32))
  video_tokenizer.save(vae_dir, cfg, vae_model.init_params(cfg, jax.random.key(0)), stats)
  return tfds_dir, vae_dir


def _encode(tiny_data, out_dir, devices, **kw):
  tfds_dir, vae_dir = tiny_data
  return latent_dataset.build_latent_dataset(tfds_dir, "tiny", vae_dir, str(out_dir),
                                             batch=BATCH, shard_size=SHARD, devices=devices,
                                             log=lambda s: None, **kw)


def _data_meta(meta):
  """meta.json without what describes the run (timings, process and device counts)."""
  meta = {k: v for k, v in meta.items() if k not in RUN_FIELDS}
  meta["splits"] = {s: {k: v for k, v in m.items() if k not in RUN_FIELDS}
                    for s, m in meta["splits"].items()}
  return meta


def _files(out_dir):
  """{name: bytes} of the shard files (the records)."""
  return {n: open(os.path.join(out_dir, n), "rb").read() for n in sorted(os.listdir(out_dir))
          if n.endswith(".array_record")}


def _records(out_dir, split):
  src = latent_dataset.data_source(str(out_dir), split)
  return [latent_dataset.parse_record(src[i]) for i in range(len(src))]


def _assert_same_dataset(a, b):
  """Same shard files byte for byte, same meta.json apart from the run's own fields."""
  assert _files(a) == _files(b)
  assert _data_meta(latent_dataset.load_meta(str(a))) == _data_meta(
      latent_dataset.load_meta(str(b)))


def test_one_and_four_devices_write_the_same_shards(tiny_data, tmp_path):
  """1 device against the batch sharded over 4 (with padded last calls: shards of 3 clips,
  2 clips per device): identical bytes; the latents are the VAE's normalised means."""
  meta = _encode(tiny_data, tmp_path / "d1", jax.devices()[:1])
  meta4 = _encode(tiny_data, tmp_path / "d4", jax.devices()[:4])
  assert meta4["encode_run"]["devices_per_process"] == 4
  _assert_same_dataset(tmp_path / "d1", tmp_path / "d4")
  assert [s["file"] for s in meta["splits"]["train"]["shards"]] == [
      f"train-0000{i}-of-00003.array_record" for i in range(3)]
  assert [s["examples"] for s in meta["splits"]["validation"]["shards"]] == [[0, 3], [3, 4]]
  assert meta["tfds"]["name"] == "toy_world" and meta["tfds"]["config"] == "tiny"
  assert meta["tfds"]["config_fields"]["num_train"] == 8
  assert meta["encoder_info"]["vae_config"]["latent_channels"] == 4
  tfds_dir, vae_dir = tiny_data
  tok = video_tokenizer.load_tokenizer(vae_dir)
  with open(tmp_path / "d1" / "latent_stats.json") as f:
    assert json.load(f) == tok.stats.to_json()
  cfg = toy_world_tfds.ToyWorld.builder_configs["tiny"]
  for split, seeds in toy_world_tfds.split_seeds(cfg).items():
    recs = _records(tmp_path / "d4", split)
    assert [r["seed"] for r in recs] == seeds and all("source" not in r for r in recs)
    frames = np.stack([toy_world_tfds.generate_example(s, cfg, split)["frames"] for s in seeds])
    want = np.asarray(tok.encode(video_tokenizer.to_float(frames), normalized=True))
    got = np.stack([r["latents"] for r in recs])
    # Another batch shape (all clips in one call here) may round differently in the last
    # bits (module docstring of latent_encode); 1e-5 of the latent scale bounds that.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert [r["texts"] for r in recs] == [
        list(toy_world_tfds.generate_example(s, cfg, split)["texts"]) for s in seeds]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_device(tiny_data, tmp_path):
  """The command on 2 processes x 4 CPU devices (each encodes its own shards) writes the
  same shard files and records, in the same order, as one process on one device. About
  20 s on 2 shared cores, so it stays in the default tier."""
  _encode(tiny_data, tmp_path / "one", jax.devices()[:1])
  tfds_dir, vae_dir = tiny_data
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # device counts come from --cpu_devices
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "data_pipelines.latent_dataset", f"--tfds_dir={tfds_dir}",
       "--tfds_config=tiny", f"--vae_dir={vae_dir}", f"--out_dir={tmp_path / 'two'}",
       f"--shard_size={SHARD}", f"--batch={BATCH}", "--cpu_devices=4",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert json.loads(outs[0][0].strip().splitlines()[-1]) == {"train": 8, "validation": 4}
  # Process 1 encoded shards 1 and 3 of the five (round-robin over train's then validation's).
  assert "process 1/2: 2 of 5 shards, 4 cpu devices" in outs[1][0]
  assert "train-00001-of-00003.array_record: 3 records" in outs[1][0]
  assert "validation-00000-of-00002.array_record: 3 records" in outs[1][0]
  assert "train-00000-of-00003.array_record" not in outs[1][0]
  meta = latent_dataset.load_meta(str(tmp_path / "two"))
  assert meta["encode_run"]["process_count"] == 2
  _assert_same_dataset(tmp_path / "one", tmp_path / "two")
  for split in ("train", "validation"):
    a, b = _records(tmp_path / "one", split), _records(tmp_path / "two", split)
    assert [r["name"] for r in a] == [r["name"] for r in b]
    for ra, rb in zip(a, b):
      np.testing.assert_array_equal(ra["latents"], rb["latents"])


def _pool(frames):
  """Host stand-in encoder: f32[B, 1+4k, H, W, 3] -> f32[B, 1+k, 2, 2, 3] (2x2 mean pool)."""
  key = np.asarray(frames, np.float32)[:, ::4]
  b, t, h, w, c = key.shape
  return key.reshape(b, t, 2, h // 2, 2, w // 2, c).mean(axis=(3, 5))


class _Counting:
  """The pool encoder, counting the clips it encodes."""

  def __init__(self):
    self.clips = 0

  def __call__(self, frames):
    self.clips += len(frames)
    return _pool(frames)


class _FailingSource:
  """A split's examples that raise at index `fail_at` (a killed encode)."""

  def __init__(self, src, fail_at):
    self.src, self.fail_at = src, fail_at

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise RuntimeError("injected failure")
    return self.src[i]


def _pool_encoder(fn=_pool):
  return latent_dataset.LatentEncoder(fn, {"mean": [0.0] * 3, "std": [1.0] * 3}, "pool")


def test_killed_encode_resumes_without_reencoding_finished_shards(tiny_data, tmp_path):
  tfds_dir, _ = tiny_data
  builder = latent_encode.load_builder("toy_world", "tiny", tfds_dir)
  sources = {s: builder.as_data_source(split=s) for s in ("train", "validation")}
  kw = dict(num_chunks=4, description=latent_encode.describe_builder(builder),
            shard_size=SHARD, batch=1, process_index=0, process_count=1, log=lambda s: None)
  latent_encode.encode_dataset(sources, _pool_encoder(), str(tmp_path / "ref"), **kw)

  out = tmp_path / "killed"
  failing = dict(sources, train=_FailingSource(sources["train"], fail_at=7))  # in shard 2
  with pytest.raises(RuntimeError, match="injected"):
    latent_encode.encode_dataset(failing, _pool_encoder(), str(out), **kw)
  done = {n: os.stat(out / n) for n in ("train-00000-of-00003.array_record",
                                        "train-00001-of-00003.array_record")}
  # Shard 2 was being written (clip 6 in it) when the run died; nothing else exists.
  assert sorted(os.listdir(out)) == sorted(
      [*done, "train-00000-of-00003.json", "train-00001-of-00003.json",
       "train-00002-of-00003.array_record.tmp"])
  with pytest.raises(latent_dataset.LatentRecordError, match="has not finished"):
    latent_dataset.data_source(str(out), "train")

  counting = _Counting()
  meta = latent_encode.encode_dataset(sources, _pool_encoder(counting), str(out), **kw)
  assert counting.clips == 2 + 3 + 1  # train shard 2 and both validation shards, only
  for name, st in done.items():  # the finished shards were never rewritten
    now = os.stat(out / name)
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns,
                                                           st.st_size)
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert meta["splits"]["train"]["num_records"] == 8
  _assert_same_dataset(tmp_path / "ref", out)

  again = _Counting()  # a complete dataset: nothing to do
  assert latent_encode.encode_dataset(sources, _pool_encoder(again), str(out), **kw) == meta
  assert again.clips == 0


def test_an_encode_of_another_plan_is_refused(tiny_data, tmp_path):
  """A resume never mixes two encodes: another batch (which may round differently) or
  shard size is refused, by meta.json or by a finished shard's summary."""
  tfds_dir, _ = tiny_data
  builder = latent_encode.load_builder("toy_world", "tiny", tfds_dir)
  sources = {"train": builder.as_data_source(split="train")}
  kw = dict(num_chunks=4, description=latent_encode.describe_builder(builder),
            shard_size=SHARD, process_index=0, process_count=1, log=lambda s: None)
  latent_encode.encode_dataset(sources, _pool_encoder(), str(tmp_path), batch=1, **kw)
  with pytest.raises(ValueError, match=r"meta.json: holds another latent dataset"):
    latent_encode.encode_dataset(sources, _pool_encoder(), str(tmp_path), batch=2, **kw)
  os.remove(tmp_path / "meta.json")
  with pytest.raises(ValueError, match=r"train-00000-of-00003.json: a shard of another encode"):
    latent_encode.encode_dataset(sources, _pool_encoder(), str(tmp_path), batch=2, **kw)


def _example(name, k=2, hw=(8, 12), **features):
  rng = np.random.default_rng(list(name.encode()))
  return {"name": name.encode(), "frames": rng.integers(0, 256, (1 + 4 * k, *hw, 3), np.uint8),
          "texts": [f"{name} {i}".encode() for i in range(k)], **features}


def test_any_builders_examples_are_normalised_and_bad_ones_skipped_by_name(tmp_path):
  """Examples shaped as the CS:GO and captioned-video builders yield them (no seed; scalar
  identity features kept as `source`), from a plain list with a description; bad ones are
  skipped by name and counted per shard."""
  csgo = [_example(f"a.hdf5/frames_{i:06d}-{i + 8:06d}", file=b"a.hdf5",
                   start_frame=np.int32(i), actions=np.zeros((9, 51), np.float32))
          for i in range(0, 40, 8)]
  csgo[1].pop("texts")
  csgo[3]["frames"] = csgo[3]["frames"][:5]
  video = [_example(f"m.mp4/clip_{c:04d}", file=b"m.mp4", clip_index=np.int32(c),
                    start_time=np.float32(c * 0.5), prompt=b"A match.") for c in range(3)]
  poison = video[2]["name"]

  def encode(frames):  # the last video clip's latents come out NaN
    z = _pool(frames)
    z[[abs(f[0, 0, 0, 0] - (video[2]["frames"][0, 0, 0, 0] / 127.5 - 1)) < 1e-7
       for f in frames]] = np.nan
    return z

  description = {"name": "mixed", "config": "test", "version": "0.0.1"}
  meta = latent_encode.encode_dataset(
      {"train": csgo, "validation": video}, _pool_encoder(encode), str(tmp_path),
      num_chunks=2, description=description, shard_size=2, batch=2, process_index=0,
      process_count=1, log=lambda s: None)
  assert meta["tfds"] == description
  train = meta["splits"]["train"]
  assert [(r["name"], r["kind"]) for r in train["skipped"]] == [
      (csgo[1]["name"].decode(), "missing_key"), (csgo[3]["name"].decode(), "wrong_shape")]
  assert [s["num_skipped"] for s in train["shards"]] == [1, 1, 0]
  assert [s["num_records"] for s in train["shards"]] == [1, 1, 1]
  assert [(r["name"], r["kind"]) for r in meta["splits"]["validation"]["skipped"]] == [
      (poison.decode(), "non_finite")]
  recs = _records(tmp_path, "train")
  assert [r["name"] for r in recs] == [csgo[i]["name"].decode() for i in (0, 2, 4)]
  assert recs[1]["source"] == {"file": "a.hdf5", "start_frame": 16}
  assert recs[1]["seed"] == latent_dataset.stable_seed(csgo[2]["name"].decode())
  assert recs[1]["texts"] == [t.decode() for t in csgo[2]["texts"]]
  np.testing.assert_array_equal(recs[1]["latents"],
                                _pool(csgo[2]["frames"][None].astype(np.float32) / 127.5 - 1)[0])
  recs = _records(tmp_path, "validation")
  assert recs[1]["source"] == {"file": "m.mp4", "clip_index": 1, "start_time": 0.5,
                               "prompt": "A match."}


def test_older_single_file_layout_still_reads(tmp_path):
  """A dataset written before shards (<split>.array_record, meta.json without "shards")."""
  from array_record.python import array_record_module as ar
  writer = ar.ArrayRecordWriter(latent_dataset.split_path(str(tmp_path), "train"),
                                "group_size:1")
  for i in range(3):
    writer.write(latent_dataset.record_bytes(f"train/seed_{i:09d}", i,
                                             np.full((3, 2, 2, 4), i, np.float32), ["a", "b"]))
  writer.close()
  with open(tmp_path / "meta.json", "w") as f:
    json.dump({"splits": {"train": {"num_records": 3, "skipped": []}},
               "latent_shape": [2, 2, 4], "num_chunks": 2, "encoder": "old"}, f)
  src = latent_dataset.data_source(str(tmp_path), "train")
  assert isinstance(src, latent_dataset.LatentRecordSource)
  recs = [latent_dataset.parse_record(src[i]) for i in range(len(src))]
  assert [r["seed"] for r in recs] == [0, 1, 2] and recs[2]["latents"][0, 0, 0, 0] == 2.0


def test_a_shard_that_disagrees_with_meta_is_named(tiny_data, tmp_path):
  """Reading checks each shard's record count against meta.json (a shard replaced after the
  encode), and a missing or unreadable shard is named."""
  tfds_dir, _ = tiny_data
  builder = latent_encode.load_builder("toy_world", "tiny", tfds_dir)
  latent_encode.encode_tfds(builder, _pool_encoder(), str(tmp_path), splits=["train"],
                            shard_size=SHARD, batch=4, process_index=0, process_count=1,
                            log=lambda s: None)
  assert len(latent_dataset.data_source(str(tmp_path), "train")) == 8
  paths = latent_dataset.shard_paths(str(tmp_path), "train")
  os.replace(paths[2], paths[2] + ".aside")
  with pytest.raises(FileNotFoundError, match=rf"^{paths[2]}: no such"):
    latent_dataset.data_source(str(tmp_path), "train")
  os.replace(paths[2] + ".aside", paths[2])
  shutil.copy(paths[2], paths[1])  # shard 1's name now holds shard 2's 2 records
  with pytest.raises(latent_dataset.LatentRecordError,
                     match=rf"^{paths[1]}: holds 2 records, meta.json says 3"):
    latent_dataset.data_source(str(tmp_path), "train")
  with open(paths[0], "r+b") as f:
    f.truncate(100)
  with pytest.raises(latent_dataset.LatentRecordError, match=rf"^{paths[0]}: cannot open"):
    latent_dataset.data_source(str(tmp_path), "train")
