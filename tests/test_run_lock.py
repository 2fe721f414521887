"""One writer per work directory (`tv2tv_jax.run_lock`): a second writer is refused naming
the holder, a stale lock (dead process, or a stopped heartbeat on another host) is taken
over, locally and on gs:// (generation preconditions, against an in-memory stand-in)."""

import json
import os
import subprocess
import sys
import time

import pytest

from experiments import toy_world
from tv2tv_jax import run_lock, trainer


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
  if request.param == "gs":
    request.getfixturevalue("fake_gcs")
    return "gs://bucket/run"
  return str(tmp_path)


def _write_holder(workdir, **holder):
  record = dict(owner="x", host="elsewhere", pid=1, started=0.0, heartbeat=time.time())
  record.update(holder)
  lock = run_lock.WorkdirLock(workdir)
  assert lock._store.create(json.dumps(record).encode()) is not None


def test_a_second_writer_is_refused_naming_the_holder(workdir):
  first = run_lock.WorkdirLock(workdir).acquire()
  with pytest.raises(run_lock.WorkdirLockedError,
                     match=rf"in use by process {os.getpid()} on {first.host}"):
    run_lock.WorkdirLock(workdir).acquire()
  first.heartbeat(force=True)  # still the holder
  first.release()
  with run_lock.WorkdirLock(workdir) as second:  # released: free again
    assert second._token is not None


def test_a_dead_process_on_this_host_leaves_a_stale_lock_that_is_taken_over(workdir):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  _write_holder(workdir, host=run_lock.WorkdirLock(workdir).host, pid=gone.pid)
  lines = []
  run_lock.WorkdirLock(workdir, log=lines.append).acquire()
  assert lines == [f"took over the stale lock of {run_lock.WorkdirLock(workdir).workdir}: "
                   f"process {gone.pid} on this host ({run_lock.WorkdirLock(workdir).host}) "
                   f"is gone"]


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stopped(workdir):
  _write_holder(workdir, heartbeat=time.time() - 10)
  with pytest.raises(run_lock.WorkdirLockedError, match="on elsewhere"):
    run_lock.WorkdirLock(workdir).acquire()
  run_lock.WorkdirLock(workdir)._store.delete(run_lock.WorkdirLock(workdir)._store.read()[1])
  _write_holder(workdir, heartbeat=time.time() - run_lock.STALE_AFTER_S - 5)
  lines = []
  run_lock.WorkdirLock(workdir, log=lines.append).acquire()
  assert "heartbeat is" in lines[0] and "old" in lines[0]


def test_a_holder_whose_lock_was_taken_stops_at_its_next_heartbeat(workdir, monkeypatch):
  first = run_lock.WorkdirLock(workdir).acquire()
  # Seen from another host, the first holder's heartbeat stopped long ago.
  monkeypatch.setattr(run_lock, "STALE_AFTER_S", -1.0)
  other = run_lock.WorkdirLock(workdir, log=lambda _: None)
  other.host = "elsewhere"
  other.acquire()
  with pytest.raises(run_lock.WorkdirLockedError, match="taken by another process"):
    first.heartbeat(force=True)
  first.release()  # no longer the holder: leaves the other's lock alone
  assert json.loads(other._store.read()[0])["owner"] == other.owner


def test_training_refuses_a_locked_workdir_before_writing_anything(tmp_path):
  cfg = toy_world.get_config("tiny")
  cfg.train.num_steps = 1
  with run_lock.WorkdirLock(tmp_path):
    with pytest.raises(run_lock.WorkdirLockedError, match="in use by process"):
      trainer.train(cfg, str(tmp_path), log=lambda _: None)
  assert sorted(os.listdir(tmp_path)) == ["LOCK.guard"]  # no config.json, no checkpoints
  trainer.train(cfg, str(tmp_path), log=lambda _: None)  # the lock is released after a run
  assert not (tmp_path / "LOCK").exists()


@pytest.mark.slow  # two training processes: the slow tier (CI runs it)
def test_two_concurrent_starts_one_is_refused_and_the_run_is_intact(tmp_path):
  """Two `tv2tv_jax.main` starts on one work directory, the second while the first
  trains: the second exits with the lock error, the first finishes, and metrics.jsonl
  holds one loss per step."""
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "tv2tv_jax.main", "--config=experiments/toy_world.py:tiny",
         f"--workdir={wd}", "--config.train.num_steps=40", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.save_every=10"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (wd / "LOCK").exists() and time.time() < deadline:
    time.sleep(0.2)
  second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0, out[-3000:]
  assert second.returncode != 0
  assert "is in use by process" in second.stdout + second.stderr
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "step_time_s" in r]  # training records
  assert steps == list(range(1, 41))
  assert not (wd / "LOCK").exists()
