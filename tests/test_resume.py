"""Exact resume after kill -9, and a 2-process run matching the single-process one.

Both start real training processes, so they live in the `slow` tier (CI runs it)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # device counts come from --cpu_devices
  return env


def _cmd(workdir, steps, *extra):
  return [sys.executable, "-m", "tv2tv_jax.main", "--config=experiments/toy_world.py:tiny",
          f"--workdir={workdir}", f"--config.train.num_steps={steps}",
          "--config.train.log_every=1", "--config.train.save_every=2", *extra]


def _losses(workdir, name="metrics.jsonl"):
  """step -> list of logged losses (a step logged twice appears twice)."""
  out = {}
  path = os.path.join(workdir, name)
  for line in open(path) if os.path.exists(path) else []:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:  # a line torn by the kill (set aside on resume)
      continue
    if "loss" in r:
      out.setdefault(r["step"], []).append(r["loss"])
  return out


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = []
  for line in open(path):
    try:
      steps.append(json.loads(line)["step"])
    except json.JSONDecodeError:  # being written right now
      pass
  return max(steps, default=0)


def test_kill_nine_then_resume_is_bit_exact(tmp_path):
  steps = 16
  ref = tmp_path / "uninterrupted"
  subprocess.run(_cmd(ref, steps, "--cpu_devices=1"), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=900)
  expected = _losses(ref)
  assert sorted(expected) == list(range(1, steps + 1))

  work = tmp_path / "killed"
  kill_at = sorted(random.Random(0).sample(range(3, steps - 1), 3))
  for target in kill_at:
    proc = subprocess.Popen(_cmd(work, steps, "--cpu_devices=1"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while _logged_steps(work) < target and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  done = subprocess.run(_cmd(work, steps, "--cpu_devices=1"), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  got = _losses(work)
  # One record per step: those of steps a resume ran again were set aside.
  assert sorted(got) == list(range(1, steps + 1))
  assert all(len(v) == 1 for v in got.values())
  rerun = _losses(work, "metrics.superseded.jsonl")
  assert rerun, "no step was ever re-run after a kill"
  # Every logged loss, before and after each resume, equals the uninterrupted run's.
  for step, values in [*got.items(), *rerun.items()]:
    assert all(v == expected[step][0] for v in values), (step, values, expected[step])
  # Each kill left the work directory's lock behind; the next start took it over (its
  # process was gone) and the last one released it.
  assert not os.path.exists(os.path.join(work, "LOCK"))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  steps = 6
  single = tmp_path / "single"
  subprocess.run(_cmd(single, steps, "--cpu_devices=8"), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=900)
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(
      _cmd(multi, steps, "--cpu_devices=4", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for step in a:
    assert b[step][0] == pytest.approx(a[step][0], rel=1e-5), step
  evals = lambda d: [json.loads(l) for l in open(d / "metrics.jsonl") if "eval/text_ce" in l]
  assert evals(multi)[-1]["eval/video_mse"] == pytest.approx(
      evals(single)[-1]["eval/video_mse"], rel=1e-5)
