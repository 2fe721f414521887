"""The toy-world study command (tv2tv_jax.study) and its report (tv2tv_jax.study_report)."""

import json
import os

import numpy as np
import pytest

from experiments import toy_study
from tv2tv_jax import study, study_report
from tv2tv_jax.config import experiment_from_config_dict


def test_arms_differ_only_in_layout_and_seed(tmp_path):
  cfg = toy_study.get_config()
  a = study.arm_config(cfg, "tv2tv", 0, str(tmp_path)).to_dict()
  b = study.arm_config(cfg, "think2v", 2, str(tmp_path)).to_dict()
  assert a["seq"].pop("layout") == "tv2tv" and b["seq"].pop("layout") == "think2v"
  assert (a["train"].pop("seed"), b["train"].pop("seed")) == (0, 2)
  assert (a["data"].pop("shuffle_seed"), b["data"].pop("shuffle_seed")) == (0, 2)
  assert a == b and "study" not in a
  for arm in ("tv2tv", "t2v", "think2v"):  # every arm is a valid experiment
    experiment_from_config_dict(study.arm_config(cfg, arm, 0, str(tmp_path)))


def test_study_rows_hold_a_clip_of_every_layout():
  """The default row fits one 12-chunk clip in every layout (Think2V's plan is longest)."""
  from tv2tv_jax import sequence
  cfg = toy_study.get_config()
  k = cfg.data.toy_world.num_chunks
  for layout in ("tv2tv", "t2v", "think2v"):
    cfg.seq.layout = layout
    exp = experiment_from_config_dict(cfg)
    ex = sequence.Example(prompt=np.array([10, 11, 12]),
                          chunk_texts=[np.array([20, 21, 22])] * k,  # 3 tokens: "left fire"
                          latents=np.zeros((k + 1, *exp.model.latent_shape), np.float32))
    sequence.layout_example(ex, exp.seq, exp.model)  # raises ExampleError if it overflows


def test_study_vae_is_the_study_variant_unchanged():
  """The data stage trains `vae_toy_world.py:study` as it is (no main-job override)."""
  from data_pipelines import preparation
  from experiments import vae_toy_world
  cfg = toy_study.get_config()
  want = vae_toy_world.get_config("study")
  want.vae.latent_channels = cfg.model.latent_shape[-1]
  assert preparation.vae_config(cfg).to_dict() == want.to_dict()


@pytest.mark.parametrize("field,value,needle", [
    ("arms", ("tv2tv", "nope"), "study.arms"),
    ("seeds", (0, 0), "study.seeds"),
])
def test_bad_study_settings_name_the_field(field, value, needle):
  cfg = toy_study.get_config()
  cfg.study[field] = value
  with pytest.raises(study.StudyError, match=needle):
    study.check_config(cfg)


def test_plan_free_evaluation_needs_plan_free_training():
  cfg = toy_study.get_config()
  cfg.study.eval.uncond = "plan_free"
  with pytest.raises(study.StudyError, match="data.plan_drop_rate"):
    study.check_config(cfg)
  cfg.data.plan_drop_rate = 0.1
  study.check_config(cfg)
  cfg.study.eval.uncond = "nothing"
  with pytest.raises(study.StudyError, match="study.eval.uncond"):
    study.check_config(cfg)


def test_hierarchical_ci_covers_the_mean_and_widens_with_seed_spread():
  rng = np.random.default_rng(0)
  tight = [rng.normal(0.5, 0.1, 32) for _ in range(3)]
  spread = [rng.normal(m, 0.1, 32) for m in (0.2, 0.5, 0.8)]
  a = study_report.hierarchical_ci(tight, 500)
  b = study_report.hierarchical_ci(spread, 500)
  assert a["lo"] <= a["mean"] <= a["hi"] and b["lo"] <= b["mean"] <= b["hi"]
  assert (b["hi"] - b["lo"]) > 3 * (a["hi"] - a["lo"])
  assert a == study_report.hierarchical_ci(tight, 500)  # deterministic
  assert np.isnan(study_report.hierarchical_ci([np.array([])])["mean"])


def test_paired_difference_ci():
  a = {s: np.full(10, 0.9) for s in range(3)}
  b = {s: np.full(10, 0.4) for s in range(3)}
  d = study_report.paired_difference_ci(a, b, 200)
  assert d["mean"] == pytest.approx(0.5) and d["lo"] == pytest.approx(0.5)
  assert d["seeds"] == 3


def _fake_record(arm, seed, both):
  clips = {"both": both, "movement": both, "fire": [1.0] * len(both),
           "chance_both": [0.1] * len(both), "chance_movement": [0.2] * len(both),
           "chance_fire": [0.5] * len(both), "valid": [1.0] * len(both),
           "inserted": ["left"] * len(both)}
  cond = {"clips": clips, "summary": {}, "ceiling": {"both": {"mean": 0.95}}}
  return {"arm": arm, "seed": seed, "train": {"step": [1, 2], "text_ce": [2.0, 1.0],
                                              "video_mse": [1.0, 0.5]},
          "train_seconds": 10.0, "conditions": {"intervene_1s": cond,
                                                "free": {"clips": {"valid": [1.0]},
                                                         "summary": {}}}}


def test_report_from_records(tmp_path):
  for seed in range(2):
    for arm, both in (("tv2tv", [1.0, 1.0, 0.0]), ("think2v", [0.0, 0.0, 1.0])):
      with open(tmp_path / f"{arm}_s{seed}.json", "w") as f:
        json.dump(_fake_record(arm, seed, both), f)
  summary = study_report.write_report(str(tmp_path), num_resamples=100)
  tv = summary["arms"]["tv2tv"]["conditions"]["intervene_1s"]
  assert tv["both"]["mean"] == pytest.approx(2 / 3) and tv["ceiling"]["both"] == 0.95
  assert tv["by_inserted_action"]["left"]["n"] == 6
  diff = summary["differences"]["tv2tv-think2v/intervene_1s"]["both"]
  assert diff["mean"] == pytest.approx(1 / 3)
  for name in ("summary.json", "interventions.png", "by_action.png", "losses.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert "| tv2tv | 2 | intervene_1s | 0.667" in study_report.format_table(summary)


@pytest.mark.slow
def test_smoke_study_runs_every_stage_and_resumes(tmp_path):
  """The whole chain at test size: data, 3 arms x 1 seed, evaluation, report, the arms'
  sheet; then a second call finds everything cached."""
  cfg = toy_study.get_config("smoke")
  logs = []
  summary = study.run_study(cfg, str(tmp_path), log=logs.append)
  assert set(summary["arms"]) == {"tv2tv", "t2v", "think2v"}
  assert summary["runs"] == ["t2v_s0", "think2v_s0", "tv2tv_s0"]
  assert sorted(summary["arms"]["tv2tv"]["conditions"]) == ["free", "intervene_0.25s",
                                                            "intervene_0.75s"]
  assert list(summary["arms"]["t2v"]["conditions"]) == ["free"]
  results = tmp_path / "results"
  for name in ("tv2tv_s0.json", "summary.json", "interventions.png", "arms_sheet.png"):
    assert (results / name).exists()
  logs.clear()
  study.run_study(cfg, str(tmp_path), log=logs.append)
  assert sum("generation evaluation: cached" in line for line in logs) == 3
