"""`python -m tv2tv_jax.generate`: checkpoint -> request -> GIF / PNG / JSON (and errors).

The workdir is built cheaply: a 2-step `toy_world:tiny` training run (synthetic data, so
it has no toy-world data dir), plus a tiny random VAE whose latents are the tiny model's
(4, 4, 4) and a character-level BPE tokenizer on toy-world texts, both written where a
toy-world run keeps them (<workdir>/toy_world_data/{vae/, tokenizer.json,
latents/latent_stats.json}).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image, ImageSequence

from data_pipelines import tokenizer as tokenizer_lib
from experiments import toy_world
from tv2tv_jax import run_state, trainer, video_samples
from tv2tv_jax.sampling import outputs
from tv2tv_jax.sampling.decoding import RequestError
from tv2tv_jax.vae import model as vae_model, video_tokenizer

NUM_CHUNKS = 3


def _write_toy_world_data(data_dir):
  tok = tokenizer_lib.train_bpe(tokenizer_lib.toy_world_corpus(num_clips=4) + ["toy world"],
                                128, byte_level=False)
  os.makedirs(data_dir, exist_ok=True)
  tok.save(os.path.join(data_dir, "tokenizer.json"))
  vcfg = vae_model.VAEConfig(frame_size=64, latent_channels=4, patch_size=8, widths=(8, 16),
                             norm_groups=4, kernel_t=2)
  params = vae_model.init_params(vcfg, jax.random.key(0))
  video_tokenizer.save(os.path.join(data_dir, "vae"), vcfg, params)  # stats kept apart, as a run does
  os.makedirs(os.path.join(data_dir, "latents"))
  with open(os.path.join(data_dir, "latents", "latent_stats.json"), "w") as f:
    json.dump({"mean": [0.1, -0.1, 0.0, 0.2], "std": [1.0, 0.5, 2.0, 1.0]}, f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("gen_run"))
  cfg = toy_world.get_config("tiny")
  cfg.train.num_steps = 2
  cfg.train.log_every = 1
  trainer.train(cfg, wd, log=lambda _: None)
  _write_toy_world_data(os.path.join(wd, "toy_world_data"))
  return wd


@pytest.fixture(scope="module")
def assets(workdir):
  return run_state.load_assets(workdir)


@pytest.fixture(scope="module")
def first_run(workdir, assets, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out_a"))
  paths = video_samples.generate_to_dir(workdir, ["toy world"], {1: "left fire"}, NUM_CHUNKS,
                                   cfg_scale=2.0, ode_steps=2, seed=3, out_dir=out,
                                   assets=assets)
  return out, paths


def test_writes_gif_png_json(first_run, assets):
  out, paths = first_run
  names = sorted(os.path.basename(p) for p in paths)
  assert {"sample.gif", "sample_sheet.png", "sample.json"} <= set(names)
  gif = Image.open(os.path.join(out, "sample.gif"))
  assert gif.n_frames == 1 + 4 * NUM_CHUNKS
  assert gif.size[0] >= 256  # 64x64 frames upscaled 4x
  sheet = Image.open(os.path.join(out, "sample_sheet.png"))
  sheet.load()
  assert sheet.size[1] >= (1 + NUM_CHUNKS) * 64
  doc = json.load(open(os.path.join(out, "sample.json")))
  assert doc["seed"] == 3 and doc["checkpoint_step"] == 2 and doc["prompt"] == "toy world"
  assert doc["settings"]["cfg_scale"] == 2.0 and doc["settings"]["steps"] == 2
  chunk1 = doc["chunks"][1]
  assert chunk1["forced"] is True and chunk1["text"] == "left fire"
  assert chunk1["tokens"] == assets.text.encode("left fire").tolist()
  assert doc["chunks"][0]["forced"] is False
  # 16 fps, first frame alone, 4 frames per chunk.
  assert chunk1["frames"] == [5, 9] and chunk1["start_s"] == 5 / 16 and chunk1["end_s"] == 9 / 16
  kinds = [(e["type"], e.get("chunk")) for e in doc["events"]]
  assert kinds[:4] == [("text", None), ("video", None), ("text", 0), ("video", 0)]
  if "sample.mp4" in names:
    import av
    with av.open(os.path.join(out, "sample.mp4")) as c:
      assert sum(1 for _ in c.decode(video=0)) == 1 + 4 * NUM_CHUNKS


def test_same_seed_same_frames(workdir, assets, first_run, tmp_path):
  out_a, _ = first_run
  video_samples.generate_to_dir(workdir, ["toy world"], {1: "left fire"}, NUM_CHUNKS, 2.0, 2, 3,
                           str(tmp_path), assets=assets)

  def frames(d):
    gif = Image.open(os.path.join(d, "sample.gif"))
    out = []
    for k in range(gif.n_frames):
      gif.seek(k)
      out.append(np.asarray(gif.convert("RGB")))
    return np.stack(out)

  np.testing.assert_array_equal(frames(out_a), frames(str(tmp_path)))
  a = json.load(open(os.path.join(out_a, "sample.json")))
  b = json.load(open(os.path.join(tmp_path, "sample.json")))
  assert a["chunks"] == b["chunks"]


def test_decode_uses_stored_stats(assets):
  lat = np.zeros((1, 4, 4, 4), np.float32)  # normalised 0 = the stored mean
  frames = video_samples.decode_frames(assets, lat[0], np.zeros((1, 4, 4, 4), np.float32))
  assert frames.dtype == np.uint8 and frames.shape == (5, 64, 64, 3)
  raw = video_tokenizer.to_uint8(vae_model.decode(
      assets.video.params, np.broadcast_to(assets.video.stats.mean, (1, 2, 4, 4, 4)),
      assets.video.config))[0]
  np.testing.assert_array_equal(frames, raw)


def test_several_prompts_are_one_batch(workdir, assets, tmp_path, monkeypatch):
  """Two prompts generated together: each equals that prompt generated alone.

  Compared on what the claim is about: the transcripts exactly, and the sampled latents
  (the VAE decoder's input) within float tolerance. Not on the GIFs: palette quantisation
  turns a 1e-6 difference of the batched forward into a different palette entry, and
  which entry depends on the CPU's rounding.
  """
  latents = []
  decode = video_samples.decode_frames
  monkeypatch.setattr(video_samples, "decode_frames", lambda a, first, chunks: (
      latents.append(np.asarray(chunks, np.float32)), decode(a, first, chunks))[1])
  paths = video_samples.generate_to_dir(workdir, ["toy world", "toy"], {1: "left fire"}, 2, 2.0, 2,
                                   0, str(tmp_path / "both"), assets=assets)
  assert {os.path.basename(p) for p in paths} >= {"sample_0.json", "sample_1.json"}
  together = list(latents)
  for k, prompt in enumerate(["toy world", "toy"]):
    video_samples.generate_to_dir(workdir, [prompt], {1: "left fire"}, 2, 2.0, 2, 0,
                             str(tmp_path / prompt), assets=assets)
    both = json.load(open(tmp_path / "both" / f"sample_{k}.json"))
    alone = json.load(open(tmp_path / prompt / "sample.json"))
    assert both["prompt"] == prompt and both["settings"]["batch"] == 2
    assert both["chunks"] == alone["chunks"]
    # Latents are O(1) (normalised); the batched forward differs from the single one by
    # float32 reassociation (~1e-6 per op), amplified at most by the CFG scale (2) over
    # 2 ODE steps: 1e-4 leaves two orders of margin and still catches a mixed-up row.
    np.testing.assert_allclose(together[k], latents[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(interventions={5: "left"}), "--intervene 5"),
    (dict(interventions={0: "left \u00e9"}), "--intervene 0"),
    (dict(prompts=["toy \u00e9"]), "--prompt"),
    (dict(first_frame=np.zeros((32, 32, 3), np.uint8)), "--first_frame"),
    (dict(num_chunks=0), "--num_chunks"),
])
def test_bad_requests_name_the_field(workdir, assets, tmp_path, kwargs, needle):
  args = dict(prompts=["toy world"], interventions={}, num_chunks=2, cfg_scale=1.0,
              ode_steps=1, seed=0, out_dir=str(tmp_path))
  args.update(kwargs)
  with pytest.raises(run_state.GenerateError) as e:
    video_samples.generate_to_dir(workdir, assets=assets, **args)
  assert str(e.value).startswith(needle), str(e.value)


def test_bad_sampler_setting_names_the_field(workdir, assets, tmp_path):
  with pytest.raises(RequestError, match="top_p"):
    video_samples.generate_to_dir(workdir, ["toy world"], {}, 1, 1.0, 1, 0, str(tmp_path),
                             top_p=0.0, assets=assets)


def test_first_frame_png_and_latent(assets, tmp_path):
  frame = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
  Image.fromarray(frame).save(tmp_path / "f.png")
  from_png, _ = video_samples.first_frame_latent(assets, str(tmp_path / "f.png"), 0)
  from_arr, _ = video_samples.first_frame_latent(assets, frame, 0)
  np.testing.assert_array_equal(from_png, from_arr)
  assert from_png.shape == (4, 4, 4)
  np.save(tmp_path / "z.npy", from_arr)
  from_npy, _ = video_samples.first_frame_latent(assets, str(tmp_path / "z.npy"), 0)
  np.testing.assert_array_equal(from_npy, from_arr)


def test_missing_tokenizer_vae_and_checkpoint(workdir, tmp_path):
  wd = str(tmp_path / "run")
  shutil.copytree(workdir, wd, ignore=shutil.ignore_patterns("toy_world_data"))
  with pytest.raises(run_state.GenerateError, match="tokenizer.json.*vae"):
    run_state.load_assets(wd)
  with pytest.raises(run_state.GenerateError, match="--checkpoint"):
    run_state.load_assets(workdir, checkpoint=7)
  with pytest.raises(run_state.GenerateError, match="--workdir"):
    run_state.load_assets(str(tmp_path / "nothing"))


def test_parse_intervention():
  assert video_samples.parse_intervention("8:left fire") == (8, "left fire")
  assert video_samples.parse_intervention("0:") == (0, "")
  with pytest.raises(run_state.GenerateError, match="--intervene"):
    video_samples.parse_intervention("left fire")
  # By time: chunk i spans frames 1 + 4i .. 4 + 4i at 16 fps (frame 0 is the first frame).
  assert video_samples.parse_intervention("0s:stop") == (0, "stop")
  assert video_samples.parse_intervention("0.3125s:up") == (1, "up")  # frame 5: chunk 1's first
  assert video_samples.parse_intervention("0.3s:up") == (0, "up")  # frame 4: chunk 0's last
  assert video_samples.parse_intervention("2.5s:left fire") == (9, "left fire")  # frame 40
  for bad in ("-1s:up", "xs:up", "nans:up"):
    with pytest.raises(run_state.GenerateError, match="--intervene"):
      video_samples.parse_intervention(bad)


def test_outputs_reject_mismatched_frames():
  with pytest.raises(ValueError, match="chunk texts"):
    outputs.write_gif("unused.gif", np.zeros((6, 8, 8, 3), np.uint8), ["a"])


def test_sampled_text_stays_inside_the_tokenizer(workdir, assets, tmp_path):
  # The tiny model's vocabulary (128) is padded beyond the tokenizer's; a hot sampler
  # would draw the padding ids if the sampler did not ban them.
  assert assets.text.vocab_size < assets.run.exp.model.vocab_size
  video_samples.generate_to_dir(workdir, ["toy world"], {}, NUM_CHUNKS, 1.0, 1, 11, str(tmp_path),
                           temperature=50.0, max_text_tokens=12, assets=assets)
  doc = json.load(open(tmp_path / "sample.json"))
  sampled = [t for c in doc["chunks"] for t in c["tokens"]]
  assert sampled, "nothing was sampled"
  assert max(sampled) < assets.text.vocab_size


def test_outputs_into_a_gs_directory(workdir, assets, fake_gcs):
  """--out (or a gs:// --workdir's default samples/<seed>) in a bucket: the files are
  written locally, then copied up through epath (in-memory bucket here)."""
  paths = video_samples.generate_to_dir(workdir, ["toy world"], {}, 1, 1.0, 1, 0,
                                   "gs://bucket/run/samples/0", assets=assets)
  names = {os.path.basename(p) for p in paths}
  assert {"sample.gif", "sample.json", "sample_sheet.png"} <= names
  assert all(p.startswith("gs://bucket/run/samples/0/") for p in paths)
  doc = json.loads(fake_gcs.cat("gs://bucket/run/samples/0/sample.json"))
  assert doc["prompt"] == "toy world"
  assert fake_gcs.cat("gs://bucket/run/samples/0/sample.gif")[:6] == b"GIF89a"
  assert not os.path.exists("gs:")


def test_data_dir_of_a_gs_run_must_be_local():
  cfg = toy_world.get_config("tiny")
  with pytest.raises(run_state.workdirs.WorkdirError, match="data.data_dir"):
    run_state.data_dir_of("gs://bucket/run", cfg)
  cfg.data.data_dir = "/data/toy"
  assert run_state.data_dir_of("gs://bucket/run", cfg) == "/data/toy"


def test_cache_capacity_counts_think2v_plan_eofs():
  """Think2V closes each plan item with EOF: one cache slot per chunk more than TV2TV."""
  from experiments import toy_world
  from tv2tv_jax.config import experiment_from_config_dict
  exps = {l: experiment_from_config_dict(toy_world.get_config(f"tiny,{l}"))
          for l in ("tv2tv", "think2v")}
  cap = {l: video_samples.cache_capacity(e, 3, 5, 4, {}) for l, e in exps.items()}
  assert cap["think2v"] - cap["tv2tv"] == 5


def test_two_interventions_on_one_chunk_are_refused():
  assert video_samples.parse_interventions(["1:up", "3:left fire"]) == {1: "up", 3: "left fire"}
  # "0.3125s" is chunk 1 as well: the clash is found after the times are resolved.
  with pytest.raises(run_state.GenerateError, match=r"'1:up'.*'0\.3125s:down'.*chunk 1"):
    video_samples.parse_interventions(["1:up", "0.3125s:down"])


def test_generation_refuses_data_the_checkpoint_was_not_trained_on(workdir, monkeypatch):
  """A checkpoint records the identity of its tokenizer and VAE; generation from a data
  directory whose tokenizer.json was rebuilt is refused, naming it."""
  from data_pipelines import prepared
  data_dir = os.path.join(workdir, "toy_world_data")
  identity = prepared.data_identity(data_dir)
  assert set(identity) == {"tokenizer", "vae", "latents"}
  load = run_state.load_params

  def trained_on(ident):
    monkeypatch.setattr(run_state, "load_params",
                        lambda *a, **k: (*load(*a, **k)[:3], ident))
  trained_on(identity)
  assert run_state.load_assets(workdir).step == 2  # the same data: accepted
  trained_on(dict(identity, tokenizer="0" * 16))
  with pytest.raises(run_state.GenerateError, match=r"tokenizer: 0{16} in the checkpoint, "
                     + identity["tokenizer"]):
    run_state.load_assets(workdir)


def test_unreadable_first_frames_name_the_file(assets, tmp_path):
  np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  for name, what in [("obj.npy", ".npy array"), ("bad.png", "image")]:
    with pytest.raises(run_state.GenerateError,
                       match=rf"--first_frame: .*{name} cannot be read as an? {what}"):
      video_samples.first_frame_latent(assets, str(tmp_path / name), 0)
  nan = np.full(tuple(assets.run.exp.model.latent_shape), np.nan, np.float32)
  with pytest.raises(run_state.GenerateError, match="NaN or inf"):
    video_samples.first_frame_latent(assets, nan, 0)


def test_a_torn_config_json_is_named_not_the_checkpoint(workdir, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  text = (run / "config.json").read_text()
  (run / "config.json").write_text(text[:len(text) // 2])
  with pytest.raises(run_state.GenerateError, match=r"^--workdir: .*config\.json is not "
                     r"valid JSON \(truncated or torn"):
    run_state.load_assets(str(run))
