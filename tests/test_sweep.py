"""The sweep command (tv2tv_jax/sweep.py), its report (tv2tv_jax/sweep_report.py), its
configs (experiments/toy_sweeps.py) and the data-stage keying it relies on."""

import dataclasses
import json
import os
import subprocess

import numpy as np
import pytest

from data_pipelines import preparation
from experiments import toy_study, toy_sweeps
from tv2tv_jax import config as config_lib
from tv2tv_jax import study, sweep, sweep_report
from tv2tv_jax.config import experiment_from_config_dict


def _points(cfg):
  return {p.name: p for p in sweep.check_config(cfg).sweep.points}


def _keys(cfg, name):
  p = _points(cfg)[name]
  pcfg = sweep.point_config(cfg, p)
  acfg = study.arm_config(pcfg, p.arm, 0, "")
  return sweep.run_key(pcfg, p.arm), preparation.stage_settings(acfg)


def test_sweep_points_are_study_configs_with_their_overrides(tmp_path):
  density, error = toy_sweeps.get_config("density"), toy_sweeps.get_config("error")
  assert list(_points(density)) == ["every1", "every2", "every4", "every8", "every16", "t2v"]
  assert [p.x for p in _points(error).values()] == [0.0, 0.1, 0.3, 0.5]
  for cfg in (density, error):
    for p in _points(cfg).values():
      pcfg = sweep.point_config(cfg, p)
      assert "sweep" not in pcfg and pcfg.study.eval == toy_study.get_config().study.eval
      tw = pcfg.data.toy_world
      for path, value in p.overrides.items():
        assert tw[path.split(".")[-1]] == value
      assert (tw.caption_mode, tw.caption_placement, tw.num_chunks) == ("sports", "plan", 16)
      experiment_from_config_dict(study.arm_config(pcfg, p.arm, 0, str(tmp_path)))
  # The error sweep's 0% point is the density sweep's every-8 run: one run, one data dir.
  assert _keys(density, "every8") == _keys(error, "every8_wrong0")
  # Captions differ -> their own data stages, but one VAE (it trains on frames only).
  (k1, s1), (k2, s2) = _keys(density, "every1"), _keys(density, "every2")
  assert k1 != k2 and s1["tfds"] != s2["tfds"] and s1["vae"] == s2["vae"]
  # T2V reads no chunk text: it shares the every-1 data.
  (kt, st) = _keys(density, "t2v")
  assert kt != k1 and st == s1


@pytest.mark.parametrize("sweep_name,point", [("density", "every1"), ("density", "every16"),
                                              ("error", "every8_wrong50")])
def test_sweep_rows_hold_every_clip_of_a_point(sweep_name, point):
  """A 16-chunk clip with its captions (tokenised as the tokenizer stage would) fits one
  row of the point's config: none of 200 clips is rejected as too long."""
  from data_pipelines import tokenizer, toy_world as tw
  from tv2tv_jax import sequence
  cfg = toy_sweeps.get_config(sweep_name)
  pcfg = sweep.point_config(cfg, _points(cfg)[point])
  exp = experiment_from_config_dict(study.arm_config(pcfg, "tv2tv", 0, ""))
  world = pcfg.data.toy_world
  assert (exp.seq.max_chunks, exp.seq.noisy_chunks) == (world.num_chunks + 1, world.num_chunks)
  clips = [tw.generate_clip(s, world.num_chunks) for s in range(200)]
  texts = [tw.caption_clip(c, world.caption_every, world.wrong_rate, c.seed) for c in clips]
  tok = tokenizer.train_bpe(tokenizer.toy_world_corpus() + [t for ts in texts for t in ts if t]
                            + [pcfg.data.prompt], exp.model.vocab_size, byte_level=False)
  longest = 0
  for ts in texts:
    ex = sequence.Example(prompt=np.asarray(tok.encode(pcfg.data.prompt)),
                          chunk_texts=[np.asarray(tok.encode(t) if t else [], np.int32)
                                       for t in ts],
                          latents=np.zeros((world.num_chunks + 1, *exp.model.latent_shape),
                                           np.float32))
    longest = max(longest, sequence.layout_example(ex, exp.seq, exp.model,
                                                   "tv2tv").num_text)
  assert longest <= exp.seq.text_len
  print(f"{sweep_name}/{point}: longest text {longest} of {exp.seq.text_len} slots")


def test_bad_sweeps_name_the_point_and_field():
  cfg = toy_sweeps.get_config("smoke")
  bad = dataclasses.replace(_points(cfg)["every1"], overrides=config_lib.FrozenMapping(
      {"data.toy_world.caption_evry": 2}))
  with pytest.raises(sweep.SweepError, match="every1.*caption_evry"):
    sweep.point_config(cfg, bad)
  cfg.sweep.points = (dict(cfg.sweep.points[0], overides={}),)
  with pytest.raises(sweep.SweepError, match="overides.*overrides"):
    sweep.check_config(cfg)
  cfg = toy_sweeps.get_config("smoke")
  cfg.sweep.points = (cfg.sweep.points[0], cfg.sweep.points[0])
  with pytest.raises(sweep.SweepError, match="distinct names"):
    sweep.check_config(cfg)
  cfg = toy_sweeps.get_config("smoke")
  cfg.sweep.points = (dict(cfg.sweep.points[0], arm="v2t"),)
  with pytest.raises(sweep.SweepError, match="arm"):
    sweep.check_config(cfg)
  with pytest.raises(ValueError, match="unknown sweep"):
    toy_sweeps.get_config("densty")


def test_stage_settings_key_sports_placement_and_leave_dense_alone():
  dense = toy_study.get_config()
  tfds = preparation.stage_settings(dense)["tfds"]
  # Exactly what a dense stage marker recorded before the placement existed.
  assert tfds == {"toy_world": {"name": "study", "num_train": 2048, "num_validation": 32,
                                "num_chunks": 12, "caption_mode": "dense"}}
  sports = toy_study.get_config()
  sports.data.toy_world = {"name": "small_sports"}  # registered: placement by default
  assert preparation.stage_settings(sports)["tfds"]["caption_placement"] == "plan"
  sports.data.toy_world = {"name": "x", "num_chunks": 4, "caption_mode": "sports",
                           "caption_placement": "report"}
  assert preparation.stage_settings(sports)["tfds"]["caption_placement"] == "report"


def _fake_vae_stage(data_dir, cfg):
  os.makedirs(os.path.join(data_dir, "vae"))
  with open(os.path.join(data_dir, "vae", "params.msgpack"), "wb") as f:
    f.write(b"weights")
  preparation._mark(data_dir, "vae", preparation.stage_settings(cfg)["vae"], seconds=1.0)


def test_a_point_adopts_a_finished_vae_with_the_same_settings(tmp_path):
  a, b, c = (str(tmp_path / n) for n in "abc")
  cfg = toy_sweeps.get_config("smoke")
  _fake_vae_stage(a, cfg)
  logs = []
  assert preparation.adopt_stage(b, a, "vae", cfg, logs.append)
  assert open(os.path.join(b, "vae", "params.msgpack"), "rb").read() == b"weights"
  assert preparation._done(b, "vae", preparation.stage_settings(cfg)["vae"]) is not None
  assert "copied from" in logs[0]
  assert not preparation.adopt_stage(b, a, "vae", cfg)  # already there
  other = toy_sweeps.get_config("smoke")
  other.data.vae.train.num_steps = 7
  assert not preparation.adopt_stage(c, a, "vae", other)  # another VAE: trained, not copied
  assert not os.path.exists(c)
  os.makedirs(os.path.join(c, "vae"))  # a half-built VAE is left alone
  assert not preparation.adopt_stage(c, a, "vae", cfg)


def test_commit_files_commits_that_file_alone(tmp_path, monkeypatch):
  for k, v in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@example.com"),
               ("GIT_COMMITTER_NAME", "t"), ("GIT_COMMITTER_EMAIL", "t@example.com")):
    monkeypatch.setenv(k, v)
  git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,
                                  text=True).stdout
  git("init", "-q")
  (tmp_path / "other.txt").write_text("staged, not the sweep's")
  git("add", "other.txt")
  (tmp_path / "res").mkdir()
  record = tmp_path / "res" / "p_s0.json"
  record.write_text("{}")
  logs = []
  assert sweep.commit_files([str(record)], "Sweep x: record p_s0", logs.append)
  assert git("log", "--format=%s") == "Sweep x: record p_s0\n"
  assert git("show", "--name-only", "--format=").split() == ["res/p_s0.json"]
  assert "A  other.txt" in git("status", "--short")  # still staged, uncommitted
  assert not sweep.commit_files([str(record)], "nothing changed", logs.append)
  assert "not committed" in logs[-1]


def _fake_record(point, seed, x, both, valid, arm="tv2tv"):
  n = len(both)
  iv = {"clips": {"both": both, "movement": both, "chance_both": [0.1] * n,
                  "chance_movement": [0.2] * n, "kept_own": [0.0] * n, "fire": [1.0] * n},
        "ceiling": {"both": {"mean": 0.9}}}
  free = {"clips": {"valid": valid, "consistent": [1.0] * n},
          "ceiling": {"valid": {"mean": 0.8}}}
  conds = {"free": free}
  if arm != "t2v":
    conds.update({"intervene_1s": iv, "intervene_3s": json.loads(json.dumps(iv))})
    conds["intervene_3s"]["clips"]["both"] = [1.0] * n
    conds["intervene_3s"]["clips"]["movement"] = [1.0] * n
  return {"sweep": "fake", "point": point, "x": x, "arm": arm, "seed": seed,
          "train": {"step": [1], "text_ce": [1.0], "video_mse": [0.5]},
          "train_seconds": 10.0, "conditions": conds}


def test_report_pools_conditions_per_clip_and_plots(tmp_path):
  points = [{"name": "a", "x": 1.0, "arm": "tv2tv", "overrides": {}},
            {"name": "b", "x": 0.25, "arm": "tv2tv", "overrides": {}},
            {"name": "t", "x": None, "arm": "t2v", "overrides": {}},
            {"name": "never_run", "x": 0.5, "arm": "tv2tv", "overrides": {}}]
  for seed in (0, 1):
    for rec in (_fake_record("a", seed, 1.0, [0.0, 1.0], [0.5, 0.5]),
                _fake_record("b", seed, 0.25, [0.0, 0.0], [1.0, 0.0]),
                _fake_record("t", seed, None, [0.0, 0.0], [1.0, 1.0], arm="t2v")):
      (tmp_path / f"{rec['point']}_s{seed}.json").write_text(json.dumps(rec))
  (tmp_path / "other_s0.json").write_text(json.dumps(dict(_fake_record("a", 0, 1, [1.0],
                                                                       [1.0]), sweep="x")))
  cfg = config_lib.sweep_config({"name": "fake", "seeds": (0, 1), "points": points,
                                 "x_label": "captions per chunk", "x_log": True})
  summary = sweep_report.write_report(str(tmp_path), cfg, num_resamples=100)
  got = {p["name"]: p for p in summary["points"]}
  assert list(got) == ["a", "b", "t"] and got["a"]["seeds"] == [0, 1]
  # Per clip the mean over 1 s and 3 s: a: (0 + 1) / 2, (1 + 1) / 2 -> 0.75 overall.
  assert got["a"]["metrics"]["both"]["mean"] == pytest.approx(0.75)
  assert got["b"]["metrics"]["both"]["mean"] == pytest.approx(0.5)
  assert got["b"]["metrics"]["valid"]["mean"] == pytest.approx(0.5)
  assert got["a"]["ceiling"]["both"] == pytest.approx(0.9)
  assert got["t"]["metrics"]["both"]["seeds"] == 0 and np.isnan(got["t"]["metrics"]["both"]
                                                                ["mean"])
  assert summary["records"] == sorted(f"{p}_s{s}" for p in "abt" for s in (0, 1))
  for name in ("summary.json", "table.md", "sweep.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| a | tv2tv | 1 | 2 | 0.750" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_smoke_sweep_runs_two_points_and_resumes(tmp_path):
  """Two caption densities at test size: own data stages, one VAE (the second copied),
  training, evaluation with forced captions, a record each, the report; then a second
  call finds every record cached."""
  cfg = toy_sweeps.get_config("smoke")
  logs = []
  summary = sweep.run_sweep(cfg, str(tmp_path), log=logs.append)
  assert [p["name"] for p in summary["points"]] == ["every1", "every2"]
  assert summary["records"] == ["every1_s0", "every2_s0"]
  assert len(os.listdir(tmp_path / "data")) == 2
  assert sum("data stage vae: copied from" in line for line in logs) == 1
  results = tmp_path / "results" / "smoke"
  rec = json.loads((results / "every2_s0.json").read_text())
  assert rec["point"] == "every2" and rec["overrides"]["data.toy_world.wrong_rate"] == 0.5
  # k = 4 chunks: 0.25 s and 0.75 s are chunks 0 and 2, each the start of a caption.
  assert rec["interventions"]["chunks"] == {"intervene_0.25s": 0, "intervene_0.75s": 2}
  scores = json.loads((tmp_path / "points" / rec["run_key"] / "runs" / "tv2tv_s0" /
                       "gen_eval" / "scores.json").read_text())
  assert scores["text_format"] == {"kind": "caption", "every": 2, "placement": "plan"}
  for clip in scores["conditions"]["intervene_0.25s"]["clips"]:
    assert clip["covered"] == 2 and len(clip["per_chunk"]["both"]) == 2
  for name in ("summary.json", "table.md", "sweep.png"):
    assert (results / name).exists()
  logs.clear()
  sweep.run_sweep(cfg, str(tmp_path), log=logs.append)
  assert sum("record: cached" in line for line in logs) == 2


def test_command_line_refuses_unknown_points_before_any_work(tmp_path):
  import sys
  proc = subprocess.run([sys.executable, "-m", "tv2tv_jax.sweep",
                         "--config=experiments/toy_sweeps.py:smoke", f"--workdir={tmp_path}",
                         "--points=every1,every3", "--config.sweep.seeds=1"],
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode != 0 and "no such points ['every3']" in proc.stderr, proc.stderr[-2000:]
  assert os.listdir(tmp_path) == []


def _findings_records(following, valid_tv2tv, valid_t2v, error_points):
  """Density points every1/every8 and the error points, two seeds each, 4 clips; "both"
  per point given, chance 0.1 (so "both" - chance = following - 0.1)."""
  density, error = [], []
  for seed in (0, 1):
    for name, x in (("every1", 1.0), ("every8", 0.125)):
      density.append(dict(_fake_record(name, seed, x, [following[name]] * 4,
                                       [valid_tv2tv] * 4), sweep="density"))
    density.append(dict(_fake_record("t2v", seed, None, [0.0] * 4, [valid_t2v] * 4,
                                     arm="t2v"), sweep="density"))
    for name, (x, both) in error_points.items():
      error.append(dict(_fake_record(name, seed, x, [both] * 4, [valid_tv2tv] * 4),
                        sweep="error"))
  for r in density + error:  # the same "both" at 3 s as at 1 s
    if "intervene_3s" in r["conditions"]:
      r["conditions"]["intervene_3s"] = r["conditions"]["intervene_1s"]
  return density, error


def test_findings_name_where_following_falls_and_where_the_advantage_is_lost():
  density, error = _findings_records(
      {"every1": 0.6, "every8": 0.1}, 0.5, 0.2,
      {"wrong0": (0.0, 0.6), "wrong30": (0.3, 0.4), "wrong50": (0.5, 0.1)})
  f = sweep_report.findings(density, error, num_resamples=200)
  assert [p["point"] for p in f["density"]] == ["every1", "every8"]
  assert f["density"][0]["following"]["mean"] == pytest.approx(0.5)
  assert f["density"][0]["valid_vs_t2v"]["mean"] == pytest.approx(0.3)
  v = f["verdicts"]
  assert "above the T2V level down to every1" in v["density"] and "falls to it at every8" \
      in v["density"]
  assert "is lost at 50% wrong captions (wrong50" in v["error_following"]
  assert "keeps its advantage up to 50%" in v["error_valid"]
  table = sweep_report.format_findings(f)
  assert "| density | every1 | 1 | 2 | +0.500 [+0.500, +0.500] | +0.300" in table


def test_findings_say_when_there_is_no_advantage_to_lose():
  density, error = _findings_records({"every1": 0.05, "every8": 0.0}, 0.0, 0.2,
                                     {"wrong0": (0.0, 0.0), "wrong50": (0.5, 0.0)})
  f = sweep_report.findings(density, error, num_resamples=200)
  assert "not above the T2V level (chance) at any density" in f["verdicts"]["density"]
  assert "no advantage over T2V even with no wrong captions" in f["verdicts"]["error_valid"]
  with pytest.raises(ValueError, match="no T2V record"):
    sweep_report.findings([r for r in density if r["arm"] != "t2v"], error)


def test_findings_command_writes_json_and_markdown(tmp_path):
  density, error = _findings_records({"every1": 0.6, "every8": 0.1}, 0.5, 0.2,
                                     {"wrong0": (0.0, 0.6)})
  for sub, records in (("d", density), ("e", error)):
    (tmp_path / sub).mkdir()
    for r in records:
      (tmp_path / sub / f"{r['point']}_s{r['seed']}.json").write_text(json.dumps(r))
  sweep_report.main([f"--density={tmp_path / 'd'}", f"--error={tmp_path / 'e'}",
                     f"--out={tmp_path / 'out'}", "--resamples=50"])
  got = json.loads((tmp_path / "out" / "findings.json").read_text())
  assert [p["point"] for p in got["error"]] == ["wrong0"]
  assert "falls to it at every8" in (tmp_path / "out" / "findings.md").read_text()
