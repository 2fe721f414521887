"""The latent dataset: records reproduce the generated clips; bad records are skipped by name."""

import json
import os

import numpy as np
import pytest

from data_pipelines import latent_dataset, toy_world_tfds
import grain_fixture


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("latent"))
  return root, grain_fixture.build(root)


def test_records_reproduce_the_generated_clips(built):
  root, pcfg = built
  meta = latent_dataset.load_meta(pcfg.latent_dir)
  assert meta["latent_shape"] == [8, 8, 4]
  assert meta["splits"]["train"]["num_records"] == grain_fixture.NUM_TRAIN
  assert meta["splits"]["validation"]["num_records"] == grain_fixture.NUM_VAL
  cfg = grain_fixture.builder_config()
  seeds = toy_world_tfds.split_seeds(cfg)
  for split in ("train", "validation"):
    src = latent_dataset.data_source(pcfg.latent_dir, split)
    assert len(src) == len(seeds[split])
    for i in (0, len(src) - 1):
      rec = latent_dataset.parse_record(src[i])
      want = toy_world_tfds.generate_example(seeds[split][i], cfg, split)
      assert rec["name"] == want["name"] and rec["seed"] == seeds[split][i]
      assert rec["texts"] == list(want["texts"])
      frames = want["frames"][None].astype(np.float32) / 127.5 - 1.0
      np.testing.assert_array_equal(rec["latents"], grain_fixture.pool_encode(frames)[0])
  with open(os.path.join(pcfg.latent_dir, "latent_stats.json")) as f:
    assert json.load(f) == {"mean": [0.0] * 4, "std": [1.0] * 4}


def test_bad_records_are_reported_by_name_and_skipped(tmp_path):
  cfg = grain_fixture.builder_config()
  good = [toy_world_tfds.generate_example(s, cfg) for s in (0, 1, 2)]
  short = dict(good[1], name="train/short", frames=good[1]["frames"][:5])
  poison = dict(good[2], name="train/poison")
  poison["frames"] = poison["frames"].copy()
  poison["frames"][0, 0, 0, 0] = 7  # the encoder below turns this clip into NaN

  def encode(frames):
    z = grain_fixture.pool_encode(frames)
    z[np.abs(frames[:, 0, 0, 0, 0] - (7 / 127.5 - 1)) < 1e-6] = np.nan
    return z

  logs = []
  out = str(tmp_path / "train.array_record")
  result = latent_dataset.encode_split([good[0], short, poison, good[1]], encode, out,
                                       grain_fixture.NUM_CHUNKS, batch=2, log=logs.append)
  assert result["num_records"] == 2
  assert [s["name"] for s in result["skipped"]] == ["train/short", "train/poison"]
  assert "frames have shape" in result["skipped"][0]["reason"]
  assert "NaN" in result["skipped"][1]["reason"]
  assert any("train/poison" in line for line in logs)
  src = latent_dataset.data_source(str(tmp_path), "train")
  assert [latent_dataset.parse_record(src[i])["name"] for i in range(len(src))] == [
      good[0]["name"], good[1]["name"]]


def _write_records(path, n=3):
  """An ArrayRecord file of `n` small latent records (group_size 1: one chunk each)."""
  from array_record.python import array_record_module as ar
  writer = ar.ArrayRecordWriter(str(path), "group_size:1")
  for i in range(n):
    writer.write(latent_dataset.record_bytes(f"train/seed_{i}", i,
                                             np.full((3, 8, 8, 4), i, np.float32), ["a", "b"]))
  writer.close()
  return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 100, 0.5, -10])
def test_truncated_latent_file_is_an_error_naming_it(tmp_path, keep):
  """A truncated <split>.array_record fails on opening with an error naming the file (the
  reader's own RuntimeError names nothing, sometimes with an empty message)."""
  data = _write_records(tmp_path / "train.array_record")
  cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
  (tmp_path / "train.array_record").write_bytes(data[:cut])
  with pytest.raises(latent_dataset.LatentRecordError) as err:
    latent_dataset.data_source(str(tmp_path), "train")
  path = latent_dataset.split_path(str(tmp_path), "train")
  assert str(err.value).startswith(f"{path}: cannot open as an ArrayRecord file")
  assert isinstance(err.value.__cause__, RuntimeError)  # the reader's error is kept


def test_corrupt_latent_record_is_an_error_naming_file_and_index(tmp_path):
  """A damaged chunk opens fine and fails its checksum when read: the error names the file
  and the record index; the other records still read."""
  data = bytearray(_write_records(tmp_path / "train.array_record"))
  src = latent_dataset.data_source(str(tmp_path), "train")
  want = [src[i] for i in range(3)]
  # Record 1's chunk starts where a file holding only record 0 stops agreeing with this one.
  only_first = _write_records(tmp_path / "one.array_record", n=1)
  start = next(i for i, (a, b) in enumerate(zip(only_first, data)) if a != b)
  data[start + 48:start + 56] = b"\x00" * 8  # past the 40-byte chunk header: its data
  (tmp_path / "train.array_record").write_bytes(bytes(data))
  src = latent_dataset.data_source(str(tmp_path), "train")
  assert src[0] == want[0] and src[2] == want[2]
  path = latent_dataset.split_path(str(tmp_path), "train")
  with pytest.raises(latent_dataset.LatentRecordError, match=rf"^{path}: record 1 of 3 "):
    src[1]
  with pytest.raises(FileNotFoundError, match="validation.array_record"):
    latent_dataset.data_source(str(tmp_path), "validation")
