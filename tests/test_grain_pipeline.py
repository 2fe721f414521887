"""The Grain input pipeline: determinism, exact round trip, packing, exact resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import grain_pipeline, latent_dataset, tokenizer as tokenizer_lib
from tv2tv_jax import masks, sequence
import grain_fixture

B = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pcfg(tmp_path_factory):
  return grain_fixture.build(str(tmp_path_factory.mktemp("grain")))


def _batches(pcfg, n, layout="tv2tv", split="train", **kw):
  exp = grain_fixture.experiment(layout)
  ds = grain_pipeline.make_dataset(pcfg, split, exp.seq, exp.model, B, **kw)
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_same_batches_other_seed_differs(pcfg):
  import dataclasses
  a, b = _batches(pcfg, 6), _batches(pcfg, 6)
  assert _equal(a, b)
  c = _batches(dataclasses.replace(pcfg, shuffle_seed=1), 6)
  assert not _equal(a, c)


def _expected_text(rec, tok, seq):
  """The tv2tv text slots of one record, written out independently of sequence.py."""
  ids = list(tok.encode(grain_fixture.PROMPT))
  if len(rec["latents"]) == len(rec["texts"]) + 1:  # a given first frame, closed by EOF
    ids += [seq.eof_id]
  for text in rec["texts"]:
    ids += list(tok.encode(text)) if text else []
    ids += [seq.bof_id, seq.eof_id]
  return ids + [seq.eos_id]


def test_round_trip_rows_hold_the_encoded_source_exactly(pcfg):
  exp = grain_fixture.experiment()
  tok = tokenizer_lib.load_tokenizer(pcfg.tokenizer_path)
  src = latent_dataset.data_source(pcfg.latent_dir, "train")
  records = [latent_dataset.parse_record(src[i]) for i in range(len(src))]
  by_first = {r["latents"][0].tobytes(): r for r in records}
  seen = []
  K, T = exp.seq.max_chunks, exp.seq.text_len
  for batch in _batches(pcfg, 8):
    for b in range(B):
      seg_text = batch["segment_ids"][b, :T]
      clean_seg = batch["segment_ids"][b, T + K * 16::16][:K]
      for seg in range(1, int(batch["segment_ids"][b].max()) + 1):
        lat = batch["latents"][b][(clean_seg == seg) & batch["clean_valid"][b]]
        rec = by_first[lat[0].tobytes()]
        np.testing.assert_array_equal(lat, rec["latents"])  # every latent, in order
        assert batch["text_tokens"][b][seg_text == seg].tolist() == _expected_text(
            rec, tok, exp.seq)
        seen.append(rec["name"])
  # 8 batches x 4 rows x 2 examples cover the 24 training clips; the first epoch is a
  # permutation, so every clip appears and none twice among the first 24 packed.
  assert set(seen) == {r["name"] for r in records}


@pytest.mark.parametrize("layout", ["tv2tv", "t2v", "think2v"])
def test_packed_examples_never_see_each_other(pcfg, layout):
  batch = _batches(pcfg, 1, layout=layout)[0]
  seg = batch["segment_ids"]
  assert (seg.max(1) >= 2).all(), "rows should hold several examples"
  mask = np.asarray(masks.dense_mask(masks.SeqMeta.from_batch(batch)))
  cross = (seg[:, :, None] != seg[:, None, :]) & (seg[:, :, None] > 0) & (seg[:, None, :] > 0)
  assert not (mask & cross).any()
  for b in range(B):
    for s in range(1, int(seg[b].max()) + 1):
      sel = seg[b] == s
      pos, order = batch["positions"][b][sel], batch["order"][b][sel]
      assert pos.min() == 0 and order.min() == 0  # positions restart per example
      assert sorted(order.tolist()) == list(range(order.size))


def test_caption_knobs(pcfg):
  import dataclasses
  rec = latent_dataset.parse_record(latent_dataset.data_source(pcfg.latent_dir, "train")[0])
  exp = grain_fixture.experiment()
  sparse = grain_pipeline.ToExample(dataclasses.replace(pcfg, caption_every=2), exp.seq,
                                    exp.model, "tv2tv")
  assert sparse.texts(rec) == [rec["texts"][0], ""]
  wrong = grain_pipeline.ToExample(dataclasses.replace(pcfg, wrong_caption_rate=1.0), exp.seq,
                                   exp.model, "tv2tv")
  src = latent_dataset.data_source(pcfg.latent_dir, "train")
  changed = 0
  for i in range(len(src)):
    rec = latent_dataset.parse_record(src[i])
    texts = wrong.texts(rec)
    assert texts == wrong.texts(rec)  # fixed per clip
    for t, r in zip(texts, rec["texts"]):
      assert t in rec["texts"]
      if len(set(rec["texts"]) - {""}) > 1 and r:
        assert t != r  # rate 1: every caption that can be wrong is
        changed += 1
  assert changed > 0
  none = grain_pipeline.ToExample(pcfg, exp.seq, exp.model, "tv2tv")
  assert none.texts(rec) == rec["texts"]


def test_plan_drop_rate_drops_whole_plans_per_clip(pcfg):
  """plan_drop_rate: a clip loses all its texts or none, fixed per clip seed, at about the
  rate asked (binomial, 4 SE); it leaves the other knobs' draws unchanged."""
  import dataclasses
  exp = grain_fixture.experiment()
  recs = [{"texts": ["left", "up fire", "stop"], "seed": s} for s in range(400)]
  to = lambda **kw: grain_pipeline.ToExample(dataclasses.replace(pcfg, **kw), exp.seq,
                                             exp.model, "think2v")
  assert all(to(plan_drop_rate=1.0).texts(r) == ["", "", ""] for r in recs)
  assert all(to(plan_drop_rate=0.0).texts(r) == r["texts"] for r in recs)
  half = to(plan_drop_rate=0.3, wrong_caption_rate=0.5)
  wrong = to(wrong_caption_rate=0.5)
  dropped = 0
  for r in recs:
    texts = half.texts(r)
    assert texts == half.texts(r)
    if texts == ["", "", ""]:
      dropped += 1
    else:
      assert texts == wrong.texts(r)  # the corruption draws are the same with or without
  assert abs(dropped / len(recs) - 0.3) < 4 * np.sqrt(0.3 * 0.7 / len(recs))
  with pytest.raises(grain_pipeline.ConfigError, match="data.plan_drop_rate"):
    dataclasses.replace(pcfg, plan_drop_rate=1.5)


def test_hosts_read_disjoint_shards(pcfg):
  exp = grain_fixture.experiment()
  firsts = []
  for p in range(2):
    ds = grain_pipeline.make_dataset(pcfg, "train", exp.seq, exp.model, B, process_index=p,
                                     process_count=2, num_epochs=1)
    rows = [b for b in ds]
    assert all(b["segment_ids"].shape[0] == B // 2 for b in rows)
    firsts.append({b["latents"][r, 0].tobytes() for b in rows for r in range(B // 2)})
  assert firsts[0] and firsts[1] and not firsts[0] & firsts[1]


def test_resume_in_process_is_exact(pcfg):
  exp = grain_fixture.experiment()
  ds = grain_pipeline.make_dataset(pcfg, "train", exp.seq, exp.model, B)
  it = iter(ds)
  ref = [next(it) for _ in range(12)]
  it2 = iter(ds)
  for _ in range(5):
    next(it2)
  state = json.loads(json.dumps(it2.get_state()))  # what a checkpoint stores
  it3 = iter(ds)
  it3.set_state(state)
  assert _equal([next(it3) for _ in range(7)], ref[5:])


_RESUME_SCRIPT = r'''
import json, sys
sys.path.insert(0, {tests!r})
import numpy as np
import grain_fixture
from data_pipelines import grain_pipeline

def main():
  mode, k, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  pcfg = grain_pipeline.PipelineConfig(**json.loads(sys.argv[5]))
  exp = grain_fixture.experiment()
  it = grain_pipeline.GrainBatches(grain_pipeline.make_dataset(pcfg, "train", exp.seq,
                                                               exp.model, {B}))
  if mode == "restore":
    it.set_state(json.load(open(out + ".state")))
  batches = [next(it) for _ in range(n)]
  if mode == "stop":
    json.dump(it.get_state(), open(out + ".state", "w"))
  np.savez(out, *[b["latents"] for b in batches], *[b["text_tokens"] for b in batches],
           *[b["segment_ids"] for b in batches])
  it.close()

if __name__ == "__main__":
  main()
'''


def test_resume_in_a_fresh_process_with_two_workers(pcfg, tmp_path):
  import dataclasses
  script = tmp_path / "resume.py"
  script.write_text(_RESUME_SCRIPT.format(tests=os.path.dirname(__file__), B=B))
  cfg = json.dumps(dataclasses.asdict(dataclasses.replace(pcfg, num_workers=2, window=8)))
  env = dict(os.environ, PYTHONPATH=REPO)

  def run(mode, n, out):
    subprocess.run([sys.executable, str(script), mode, "0", str(n), str(out), cfg], check=True,
                   env=env, cwd=REPO, timeout=300)
    return np.load(str(out) + ".npz")

  full = run("full", 10, tmp_path / "full")
  run("stop", 4, tmp_path / "part")
  rest = run("restore", 6, tmp_path / "part")
  for i in range(6):  # latents, text tokens and segment ids of batches 4..9
    for kind in range(3):
      np.testing.assert_array_equal(rest[f"arr_{kind * 6 + i}"], full[f"arr_{kind * 10 + 4 + i}"])


def _long_clip_data(root, num_chunks, num_train=16):
  """A latent dataset of longer clips (pool encoder, 4 channels) for packing efficiency."""
  from data_pipelines import toy_world_tfds
  cfg = toy_world_tfds.ToyWorldBuilderConfig(
      name=f"eff_k{num_chunks}", description="efficiency test", num_train=num_train,
      num_validation=1, num_chunks=num_chunks, caption_mode="dense")
  tfds_dir, out = os.path.join(root, "tfds"), os.path.join(root, f"latents_k{num_chunks}")
  toy_world_tfds.ToyWorld(config=cfg, data_dir=tfds_dir).download_and_prepare()
  enc = latent_dataset.LatentEncoder(grain_fixture.pool_encode, {"mean": [0.0] * 4,
                                                                 "std": [1.0] * 4}, "pool")
  latent_dataset.build_latent_dataset(tfds_dir, cfg, enc, out, log=lambda s: None)
  return out


def test_packing_efficiency_on_toy_world_rows(pcfg, tmp_path):
  """The default row of experiments/toy_world.py on toy-world clips of 15 chunks: >= 95%
  non-pad (its text region is sized to toy-world texts; a text region of 256 slots, the
  paper configs' budget for long captions, is mostly padding on this data)."""
  import dataclasses
  from experiments import toy_world
  out = _long_clip_data(str(tmp_path), 15)
  c = grain_fixture.experiment_config()
  default = toy_world.get_config("default").seq
  c.seq.update(text_len=default.text_len, max_chunks=default.max_chunks)
  assert default.noisy_chunks == 15  # a given first frame has no noisy twin
  from tv2tv_jax import config as config_lib
  # Texts tokenised as the main job does (data_pipelines/preparation.py: BPE trained on the
  # toy world's texts with the model's vocabulary); the fixture's 96-id tokenizer, trained
  # on 4 clips, writes longer texts than any run would.
  tok_path = str(tmp_path / "tokenizer.json")
  tokenizer_lib.train_bpe(tokenizer_lib.toy_world_corpus() + [grain_fixture.PROMPT],
                          c.model.vocab_size, byte_level=False).save(tok_path)
  p = dataclasses.replace(pcfg, latent_dir=out, tokenizer_path=tok_path)
  # The default row, then one budgeted for long captions (256 text slots, 16 + 16 copies).
  for text_len, noisy, want in ((default.text_len, default.noisy_chunks, 0.95),
                                (256, 0, None)):
    c.seq.update(text_len=text_len, noisy_chunks=noisy)
    exp = config_lib.experiment_from_config_dict(c)
    it = iter(grain_pipeline.make_dataset(p, "train", exp.seq, exp.model, 8))
    batch = next(it)
    assert it.get_state()["skipped"] == 0  # every clip fits the default row
    seg = batch["segment_ids"]
    video = seg[:, text_len:] > 0
    # 16 clean + 15 noisy copies per clip: the default row's chunk regions are full.
    assert video.mean() == (1.0 if noisy else 31 / 32)
    if want:
      assert sequence.packing_efficiency(seg) >= want, sequence.packing_efficiency(seg)
    else:
      assert sequence.packing_efficiency(seg) < 0.75


@pytest.mark.slow
def test_main_job_stages_run_once_then_train(tmp_path):
  """data.source='toy_world' end to end: stages built once (then cached), trainer runs."""
  from data_pipelines import preparation
  from experiments import toy_world
  from tv2tv_jax import config as config_lib, inputs, trainer
  c = grain_fixture.experiment_config()
  data_dir = str(tmp_path / "data")
  c.data.update(source="toy_world", data_dir=data_dir,
                toy_world=dict(name="t", num_train=12, num_validation=4, num_chunks=2,
                               caption_mode="sports"), caption_every=2)
  c.data.vae = toy_world.vae_recipe("tiny", train={"num_steps": 4})
  c.train.update(num_steps=3, eval_every=3, eval_batches=1)
  exp = config_lib.experiment_from_config_dict(c)
  preparation.prepare(data_dir, c, log=lambda _: None)
  stream = inputs.make_train_input(exp, c)
  assert set(preparation.stage_timings(data_dir)) == set(preparation.STAGES)
  batch = next(stream)
  assert batch["latents"].shape == (exp.train.batch_size, 6, 8, 8, 4)
  logs = []
  preparation.prepare(data_dir, c, log=logs.append)
  assert logs and all("cached" in line for line in logs), logs
  records = trainer.train(c, str(tmp_path / "run"), log=lambda s: None)
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses and np.isfinite(losses).all(), records


def test_bad_examples_are_named_skipped_and_counted(pcfg, caplog):
  """Examples too long for the row are skipped by name; the packer state counts them."""
  from tv2tv_jax import config as config_lib
  exp = grain_fixture.experiment()
  to_ex = grain_pipeline.ToExample(pcfg, exp.seq, exp.model, "tv2tv")
  src = latent_dataset.data_source(pcfg.latent_dir, "train")
  need = {}
  for i in range(len(src)):
    ex = to_ex.example(src[i])
    need[ex.name] = sequence.layout_example(ex, exp.seq, exp.model).num_text
  lengths = sorted(need.values())
  assert lengths[0] < lengths[-1]
  c = grain_fixture.experiment_config()
  c.seq.text_len = lengths[len(lengths) // 2]  # about half the clips no longer fit
  exp = config_lib.experiment_from_config_dict(c)
  too_long = {name for name, n in need.items() if n > c.seq.text_len}
  it = iter(grain_pipeline.make_dataset(pcfg, "train", exp.seq, exp.model, 2, shuffle=False,
                                        num_epochs=1))
  with caplog.at_level("WARNING"):
    rows = sum(b["segment_ids"].shape[0] for b in it)
  assert rows > 0
  # Other tests' read-ahead threads may log too: match this test's text_len.
  tag = f"seq.text_len is {c.seq.text_len}"
  logged = {r.args[0] for r in caplog.records if tag in r.getMessage()}
  assert logged == too_long
  assert it.get_state()["skipped"] == len(too_long)


def _damaged_copy(pcfg, tmp_path, damage):
  """pcfg over a copy of its latent dataset whose train shard's bytes (one shard: 24 records)
  went through `damage`."""
  import dataclasses
  import shutil
  latent_dir = str(tmp_path / "latents")
  shutil.copytree(pcfg.latent_dir, latent_dir)
  [path] = latent_dataset.shard_paths(latent_dir, "train")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(damage(data))
  return dataclasses.replace(pcfg, latent_dir=latent_dir), path


def test_truncated_latent_file_fails_the_pipeline_naming_it(pcfg, tmp_path):
  """The trainer's input (make_dataset) refuses a truncated train shard by name."""
  bad, path = _damaged_copy(pcfg, tmp_path, lambda d: d[:len(d) // 2])
  exp = grain_fixture.experiment()
  with pytest.raises(latent_dataset.LatentRecordError, match=rf"^{path}: cannot open"):
    grain_pipeline.make_dataset(bad, "train", exp.seq, exp.model, B)


def test_corrupt_latent_record_fails_the_pipeline_naming_file_and_index(pcfg, tmp_path):
  """A damaged record is read only when the stream reaches it; the error then names the
  file and the record index (it is a broken dataset, not a bad example to skip)."""
  from array_record.python import array_record_module as ar
  first = str(tmp_path / "first.array_record")  # record 0 alone, written as the dataset is
  writer = ar.ArrayRecordWriter(first, "group_size:1")
  writer.write(latent_dataset.data_source(pcfg.latent_dir, "train")[0])
  writer.close()
  with open(first, "rb") as f:
    only_first = f.read()

  def damage(data):
    # Record 1's chunk starts where the file of record 0 alone stops agreeing with this one.
    start = next(i for i, (a, b) in enumerate(zip(only_first, data)) if a != b)
    return data[:start + 48] + b"\x00" * 8 + data[start + 56:]  # past its 40-byte header
  bad, path = _damaged_copy(pcfg, tmp_path, damage)
  exp = grain_fixture.experiment()
  it = iter(grain_pipeline.make_dataset(bad, "train", exp.seq, exp.model, B, shuffle=False,
                                        num_epochs=1))
  with pytest.raises(latent_dataset.LatentRecordError, match=rf"^{path}: record 1 of 24 "):
    for _ in it:
      pass
