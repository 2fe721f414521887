"""The generation evaluation (tv2tv_jax/generation_eval.py): scripted models through the
protocol, and the command end to end on a tiny trained run.

Scripted models render real toy-world clips (`ToyWorldGenerator`), so every score has a
known answer: a model that copies the inserted action follows every intervention, one
that plays the world's policy and ignores the text follows at chance.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import caption_scores as caps
from data_pipelines import clip_scores as cs
from data_pipelines import oracle
from data_pipelines import toy_world as tw
from tv2tv_jax import generation_eval as ge

CHUNKS = 6  # times 1 s, 3 s scale to chunks 1 and 5


def _clips(n, k=CHUNKS, first=ge.FIRST_HELD_OUT_SEED):
  return [tw.generate_clip(s, k) for s in range(first, first + n)]


class IgnoringModel(ge.ToyWorldGenerator):
  """Plays the toy world's policy from the clip's state and ignores the inserted text.

  Its text says the inserted action (it was forced) but the chunk is a fresh draw of the
  policy in the true state, independent of the free run: what chance models.
  """

  def generate(self, requests):
    out = []
    for r in requests:
      if not r.interventions:
        out += super().generate([r])
        continue
      (i, text), = r.interventions.items()
      free = tw.generate_clip(r.clip_seed, r.num_chunks, self.config)
      x, y, facing = free.states[self.config.frames_per_chunk * i]
      ids = oracle.quantise(free.frames[:1])[0]
      dist = tw.policy_distribution(tw.allowed_moves(ids, x, y, facing, self.config),
                                    free.actions[i - 1] if i else None, self.config)
      rng = np.random.default_rng([r.sample_seed, i, 17])
      acts = list(dist)
      drawn = acts[rng.choice(len(acts), p=np.array([dist[a] for a in acts]))]
      clip = tw.generate_clip(r.clip_seed, r.num_chunks, self.config, forced={i: drawn})
      texts = self.text_format.texts_of(clip.actions)
      texts[i] = text
      out.append(ge.Generated(texts, clip.frames, r.num_chunks))
    return out


def test_intervention_chunks_rule():
  assert ge.intervention_chunks([1, 3], 16)["chunks"] == {"intervene_1s": 3, "intervene_3s": 11}
  plan = ge.intervention_chunks([1, 3], 3)
  assert plan["chunks"] == {"intervene_1s": 0, "intervene_3s": 2}
  assert plan["scale"] == pytest.approx(9 / 16 / 3)
  assert ge.intervention_chunks([1, 3], 8)["chunks"] == {"intervene_1s": 2, "intervene_3s": 7}
  assert ge.intervention_chunks([1, 3], CHUNKS)["chunks"] == {"intervene_1s": 1,
                                                               "intervene_3s": 5}
  assert ge.intervention_chunks([1.5], 1)["chunks"] == {"intervene_1.5s": 0}
  with pytest.raises(ge.EvalError, match="--times"):
    ge.intervention_chunks([-1], 4)


def test_copying_model_follows_every_intervention():
  clips = _clips(8)
  doc = ge.evaluate(ge.ToyWorldGenerator("tv2tv"), clips, num_resamples=200)
  assert set(doc["conditions"]) == {"free", "intervene_1s", "intervene_3s"}
  free = doc["conditions"]["free"]["summary"]
  assert free["consistent"]["mean"] == 1.0 and free["unparseable"]["mean"] == 0.0
  for key in cs.VISUAL_KEYS:
    assert free[key]["mean"] == 1.0, key
  assert free["plausibility"]["distance"]["tv_action"]["value"] == 0.0  # it *is* the truth
  for name, chunk in doc["interventions"]["chunks"].items():
    cond = doc["conditions"][name]
    s = cond["summary"]
    assert s["both"]["mean"] == s["movement"]["mean"] == s["fire"]["mean"] == 1.0
    assert s["feasible"]["mean"] == 1.0 and s["kept_own"]["mean"] == 0.0
    assert s["chance_both"]["mean"] < 0.3
    for rec, clip in zip(cond["clips"], clips):
      assert rec["chunk"] == chunk and rec["own_text"] == clip.texts[chunk]
      assert rec["inserted"] != rec["own_text"] and rec["texts"][chunk] == rec["inserted"]
      assert rec["texts"][:chunk] == clip.texts[:chunk]
    assert sum(v["n"] for v in s["by_inserted_action"].values()) == len(clips)
  assert doc["chance"]["intervene_1s"]["both"] == doc["conditions"]["intervene_1s"][
      "summary"]["chance_both"]


def test_ignoring_model_scores_chance():
  """Intervention accuracy within 3 binomial standard errors of the mean chance (a check
  of the whole protocol; test_clip_scores pins chance itself exactly)."""
  clips = _clips(40)
  chunks = ge.intervention_chunks([1, 3], CHUNKS)["chunks"]  # 80 interventions
  runs = ge.run_protocol(IgnoringModel("tv2tv"), clips, chunks, seed=0)
  hits = {"movement": [], "fire": [], "both": []}
  p = {k: [] for k in hits}
  for name in chunks:
    for r in runs[name]:
      iv = r["intervention"]
      for k, v in cs.intervention_following(r["read"], iv.chunk, iv.text).items():
        hits[k].append(v)
      for k, v in cs.chance(r["state"], tw.parse_action_text(iv.text)).items():
        p[k].append(v)
  for k in hits:
    pk = np.array(p[k])
    se = np.sqrt((pk * (1 - pk)).sum()) / len(pk)
    print(f"{k}: ignoring {np.mean(hits[k]):.3f}, chance {pk.mean():.3f} +- {3 * se:.3f}")
    assert abs(np.mean(hits[k]) - pk.mean()) <= 3 * se + 1e-9, k
  assert np.mean(hits["both"]) < 0.5  # far below the copying model's 1.0


def test_t2v_has_no_text_path():
  clips = _clips(4, k=3)
  doc = ge.evaluate(ge.ToyWorldGenerator("t2v"), clips, num_resamples=100)
  assert list(doc["conditions"]) == ["free"] and doc["chance"] == {}
  assert "skipped" in doc["interventions"]
  free = doc["conditions"]["free"]
  assert "consistent" not in free["summary"] and "consistent" not in free["clips"][0]
  assert free["clips"][0]["texts"] == ["", "", ""]
  assert free["summary"]["plausibility"]["distance"]["tv_movement"]["value"] == 0.0


def test_ceiling_fits_tolerances_and_they_apply_everywhere():
  """A damaged 'reconstruction' ceiling loosens the tolerances the model is scored with."""
  clips = _clips(3, k=3)

  def damage(frames_list):
    out = [f.copy() for f in frames_list]
    for f in out:
      f[1:, 20:22, 40] = (128, 0, 128)  # 2 unknown px on every frame
    return out

  doc = ge.evaluate(ge.ToyWorldGenerator("tv2tv"), clips, num_resamples=100,
                    ceiling=ge.ToyWorldGenerator("tv2tv", reconstruct=damage))
  assert doc["tolerances"]["max_unknown"] == 2 and doc["tolerances"]["ceiling_valid"] == 1.0
  assert doc["conditions"]["free"]["summary"]["valid"]["mean"] == 1.0
  assert set(doc["ceiling"]) == set(doc["conditions"])
  strict = ge.evaluate(ge.ToyWorldGenerator("tv2tv", reconstruct=damage), clips,
                       num_resamples=100)
  assert strict["conditions"]["free"]["summary"]["valid"]["mean"] == 0.0


def test_bad_generator_output_names_the_row():
  class Short(ge.ToyWorldGenerator):
    def generate(self, requests):
      return [(t, f[:-1]) for t, f, _ in super().generate(requests)]

  with pytest.raises(ge.EvalError, match=r"generator output \[0\]"):
    ge.evaluate(Short("tv2tv"), _clips(2, k=2), num_resamples=10)


def test_held_out_seeds_never_reach_training_seeds():
  from experiments import toy_world as toy_cfg
  cfg = toy_cfg.get_config("tiny")
  assert ge.held_out_seeds(ge.FIRST_HELD_OUT_SEED, 4, cfg) == list(range(5_000_000, 5_000_004))
  with pytest.raises(ge.EvalError, match="--first_seed.*training seeds"):
    ge.held_out_seeds(1_999_999, 4, cfg)
  with pytest.raises(ge.EvalError, match="--first_seed.*validation split"):
    ge.held_out_seeds(1_000_000_000 + 3, 4, cfg)
  cfg.data.toy_world = {"name": "small"}  # a registered config: its sizes are looked up
  assert ge.trained_num_chunks(cfg) == 8
  with pytest.raises(ge.EvalError, match="validation split"):
    ge.held_out_seeds(1_000_000_000 + 63, 1, cfg)
  cfg.data.toy_world = {"num_chunks": 4, "colour": "red"}
  with pytest.raises(ge.EvalError, match="data.toy_world"):
    ge.trained_num_chunks(cfg)


def test_contact_sheet_marks_the_intervention(tmp_path):
  clips = _clips(2, k=3)
  runs = ge.run_protocol(ge.ToyWorldGenerator("tv2tv"), clips, {"intervene_1s": 1})
  path = ge.write_sheet(str(tmp_path / "s.png"), runs["intervene_1s"], clips, "test")
  img = np.asarray(Image.open(path).convert("RGB"))
  assert img.shape[1] >= 4 * 128  # first frame + 3 chunks at 2x
  assert ((img == (220, 0, 0)).all(-1)).sum() > 100  # the red frame around chunk 1


# --------------------------------------------------------------------------- sparse captions

def _caption_model(every, placement="plan", cls=ge.ToyWorldGenerator):
  return cls("tv2tv", text_format=caps.TextFormat("caption", every, placement))


@pytest.mark.parametrize("every", [1, 4, 16])
def test_copying_model_follows_every_chunk_a_forced_caption_covers(every):
  """The world as a caption model: its captions describe what it plays, and it plays
  every action of a forced caption, so each covered chunk scores 1.0 (16 chunks: 1 s,
  3 s are chunks 3, 11, planned by the captions at 0 and 8 when every = 4, both by the
  one at 0 when every = 16)."""
  clips = _clips(6, k=16)
  doc = ge.evaluate(_caption_model(every), clips, num_resamples=50)
  assert doc["text_format"] == {"kind": "caption", "every": every, "placement": "plan"}
  want = {1: {"intervene_1s": 3, "intervene_3s": 11},
          4: {"intervene_1s": 0, "intervene_3s": 8}, 16: {"intervene_1s": 0}}[every]
  assert doc["interventions"]["chunks"] == want
  assert set(doc["conditions"]) == {"free", *want}
  free = doc["conditions"]["free"]["summary"]
  assert free["consistent"]["mean"] == 1.0 and free["unparseable"]["mean"] == 0.0
  assert free["uncovered"]["mean"] == 0.0
  for key in cs.VISUAL_KEYS:
    assert free[key]["mean"] == 1.0, key
  for name, chunk in want.items():
    s = doc["conditions"][name]["summary"]
    assert s["both"]["mean"] == s["movement"]["mean"] == s["fire"]["mean"] == 1.0
    assert s["feasible"]["mean"] == 1.0
    for rec, clip in zip(doc["conditions"][name]["clips"], clips):
      truth = tw.caption_clip(clip, every, 0.0, clip.seed)
      assert rec["chunk"] == chunk and rec["covered"] == min(every, 16 - chunk)
      assert rec["per_chunk"]["both"] == [1.0] * rec["covered"]
      assert tw.parse_summary(rec["inserted"]) == [tw.parse_action_text(a) for a in rec["plan"]]
      assert rec["own_text"] == truth[chunk] and rec["inserted"] != rec["own_text"]
      assert rec["plan"][0] != clip.texts[chunk]  # differs from what the model planned
      assert rec["texts"][:chunk] == truth[:chunk] and rec["texts"][chunk] == rec["inserted"]
      # kept_own: covered chunks that read as in the free run (the first never does).
      assert rec["per_chunk"]["kept_own"][0] == 0.0
      assert 0.0 <= rec["chance_both"] < 1.0
  if every == 16:
    assert doc["interventions"]["merged"] == {"intervene_3s": "intervene_1s"}


def test_ignoring_caption_model_scores_chance_on_every_covered_chunk():
  """A caption model that ignores the forced caption (its chunk is a fresh draw of the
  policy, later chunks the world's own) follows each covered chunk at that chunk's
  chance: within 3 binomial standard errors over the 40 x 2 x 4 covered chunks."""
  clips = _clips(40, k=16)
  model = _caption_model(4, cls=IgnoringModel)
  chunks = caps.caption_plan(ge.intervention_chunks([1, 3], 16), model.text_format)["chunks"]
  runs = ge.run_protocol(model, clips, chunks, seed=0)
  hits = {"movement": [], "fire": [], "both": []}
  p = {k: [] for k in hits}
  for name in chunks:
    for r, fr in zip(runs[name], runs["free"]):
      got = caps.plan_scores(r["intervention"], r["read"], r["states"], fr["read"])
      assert got["covered"] == 4
      for k in hits:
        hits[k] += got["per_chunk"][k]
        p[k] += got["per_chunk"][f"chance_{k}"]
  for k in hits:
    pk = np.array(p[k])
    se = np.sqrt((pk * (1 - pk)).sum()) / len(pk)
    print(f"{k}: ignoring {np.mean(hits[k]):.3f}, chance {pk.mean():.3f} +- {3 * se:.3f}")
    assert len(pk) == 320
    assert abs(np.mean(hits[k]) - pk.mean()) <= 3 * se + 1e-9, k
  assert np.mean(hits["both"]) < 0.6  # far below the copying model's 1.0


def test_report_captions_get_no_intervention():
  """Captions written after the chunks they describe can steer nothing forced now: only
  the free condition, whose true captions are consistent where they describe a chunk."""
  doc = ge.evaluate(_caption_model(4, "report"), _clips(3, k=10), num_resamples=50)
  assert list(doc["conditions"]) == ["free"] and "skipped" in doc["interventions"]
  free = doc["conditions"]["free"]["summary"]
  assert free["consistent"]["mean"] == pytest.approx(0.8)  # chunks 8, 9: no caption
  assert free["uncovered"]["mean"] == pytest.approx(0.2)


# --------------------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A 1-step `toy_world:tiny` run with a random tiny VAE and a character-level tokenizer
  where a toy-world run keeps them (as tests/test_generate.py builds its run)."""
  import jax
  from data_pipelines import tokenizer as tokenizer_lib
  from experiments import toy_world as toy_cfg
  from tv2tv_jax import trainer
  from tv2tv_jax.vae import model as vae_model, video_tokenizer
  wd = str(tmp_path_factory.mktemp("eval_run"))
  cfg = toy_cfg.get_config("tiny")
  cfg.train.num_steps = 1  # a checkpoint is all the command needs
  cfg.train.log_every = 1
  trainer.train(cfg, wd, log=lambda _: None)
  data_dir = os.path.join(wd, "toy_world_data")
  tok = tokenizer_lib.train_bpe(tokenizer_lib.toy_world_corpus(num_clips=4) + ["toy world"],
                                128, byte_level=False)
  os.makedirs(os.path.join(data_dir, "latents"))
  tok.save(os.path.join(data_dir, "tokenizer.json"))
  vcfg = vae_model.VAEConfig(frame_size=64, latent_channels=4, patch_size=8, widths=(8, 16),
                             norm_groups=4, kernel_t=2)
  video_tokenizer.save(os.path.join(data_dir, "vae"), vcfg, vae_model.init_params(vcfg,
                                                                            jax.random.key(0)))
  with open(os.path.join(data_dir, "latents", "latent_stats.json"), "w") as f:
    json.dump({"mean": [0.1, -0.1, 0.0, 0.2], "std": [1.0, 0.5, 2.0, 1.0]}, f)
  return wd


def test_command_end_to_end(workdir, tmp_path):
  out = str(tmp_path / "eval")
  paths = ge.run(workdir, out, num_clips=2, batch=2, ode_steps=1, num_resamples=50,
                 num_reference=2)
  names = {os.path.basename(p) for p in paths}
  conds = ["free", "intervene_1s", "intervene_3s"]
  assert names == {"scores.json"} | {f"{s}_{c}.png" for s in ("sheet", "ceiling_sheet")
                                     for c in conds}
  for p in paths:
    assert os.path.exists(p)
  doc = json.load(open(os.path.join(out, "scores.json")))
  assert doc["layout"] == "tv2tv" and doc["checkpoint_step"] == 1
  assert doc["num_chunks"] == 3 and doc["clip_seeds"] == [5_000_000, 5_000_001]
  assert doc["reference_clip_seeds"] == [5_000_002, 5_000_003]
  s = doc["settings"]
  assert (s["batch"], s["ode_steps"], s["cfg_scale"], s["prompt"]) == (2, 1, 2.0, "toy world")
  assert doc["interventions"]["chunks"] == {"intervene_1s": 0, "intervene_3s": 2}
  assert set(doc["tolerances"]) >= set(cs.TOLERANCE_KEYS) | {"fitted_on", "ceiling_valid"}
  assert set(doc["conditions"]) == set(doc["ceiling"]) == set(conds)
  assert set(doc["chance"]) == {"intervene_1s", "intervene_3s"}
  for name in conds:
    for who in ("conditions", "ceiling"):
      cond = doc[who][name]
      assert len(cond["clips"]) == 2
      for key in (*cs.VISUAL_KEYS, "consistent", "unparseable"):
        assert set(cond["summary"][key]) == {"mean", "lo", "hi", "n"}, (who, name, key)
      if name != "free":
        assert {"movement", "fire", "both", "chance_both", "kept_own", "by_inserted_action"} \
            <= set(cond["summary"])
        for rec in cond["clips"]:
          # The inserted action is what the model was forced to write.
          assert rec["texts"][rec["chunk"]] == rec["inserted"] != rec["own_text"]
      else:
        assert set(cond["summary"]["plausibility"]["distance"]) >= {"tv_movement", "tv_action"}
  # The model's free run and its intervened runs share the text before the intervention.
  late = doc["conditions"]["intervene_3s"]["clips"]
  for free, rec in zip(doc["conditions"]["free"]["clips"], late):
    assert rec["texts"][:2] == free["texts"][:2]


def test_command_line_flags(tmp_path):
  """The flags parse as a user types them (a bad --times is refused before any work)."""
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "tv2tv_jax.generation_eval",
                         f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}", "--times=1,soon",
                         "--num_clips=4", "--batch=2"], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0 and "--times" in proc.stderr, proc.stderr[-2000:]
  proc = subprocess.run([sys.executable, "-m", "tv2tv_jax.generation_eval", "--helpshort"],
                        capture_output=True, text=True, timeout=120)
  for flag in ("--workdir", "--out", "--num_clips", "--batch", "--checkpoint", "--cfg_scale",
               "--ode_steps", "--times", "--seed", "--first_seed", "--num_chunks"):
    assert flag in proc.stdout + proc.stderr, flag
  # Importing the module (as tests and other tools do) defines no flags.
  code = ("import tv2tv_jax.generation_eval as g; from absl import flags; "
          "assert not {'workdir', 'out', 'times', 'prompt'} & set(flags.FLAGS), list(flags.FLAGS)")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
