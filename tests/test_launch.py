"""scripts/launch_tpu_pod.py: the dry run prints the right gcloud commands, quoting survives
a shell round trip, and bad arguments fail with a clear message. Runs the script as a
subprocess (as a user would); nothing is executed, no gcloud needed."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "launch_tpu_pod.py")
BASE = ["--name=tv2tv-pod", "--zone=us-east5-a", "--project=my-proj",
        "--config=experiments/csgo_3b.py:6s", "--workdir=/mnt/shared/runs/csgo 3b"]


def launch(*args, env_extra=None):
  env = {k: v for k, v in os.environ.items()
         if k not in ("CLOUDSDK_COMPUTE_ZONE", "CLOUDSDK_CORE_PROJECT")}
  # No gcloud (nor tar) on PATH: a dry run that executed anything would fail loudly.
  env["PATH"] = os.path.join(ROOT, "tests", "golden")
  env.update(env_extra or {})
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        env=env, timeout=60)


def dry_run(*args):
  proc = launch("--dry_run", *args)  # before any `--` (what follows goes to main.py)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def flag(cmd, name):
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def test_create_copy_install_train():
  cmds = dry_run(*BASE, "--accelerator_type=v5p-128", "--create", "--spot", "--",
                 "--config.train.num_steps=1000", "--config.train.log_every=10")
  assert [c[:5] for c in cmds] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create"],
      ["tar", "-czf", cmds[1][2], "-C", ROOT],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
  create, _, scp, install, train = cmds
  assert create[5] == "tv2tv-pod" and "--spot" in create
  assert flag(create, "accelerator-type") == "v5p-128"
  assert flag(create, "version") == "v2-alpha-tpuv5"
  for c in (create, scp, install, train):
    assert flag(c, "zone") == "us-east5-a" and flag(c, "project") == "my-proj"
  assert "--worker=all" in scp and scp[6] == "tv2tv-pod:tv2tv-src.tgz"
  for c in (install, train):
    assert c[5] == "tv2tv-pod" and "--worker=all" in c
  assert "pip install --quiet -e '.[tpu]'" in flag(install, "command")
  assert "tar -xzf tv2tv-src.tgz" in flag(install, "command")

  # The remote command is itself shell: split it again and find the training argv.
  remote = shlex.split(flag(train, "command"))
  start = remote.index("python3")
  argv = remote[start:remote.index(">", start)]
  assert argv == ["python3", "-m", "tv2tv_jax.main", "--config=experiments/csgo_3b.py:6s",
                  "--workdir=/mnt/shared/runs/csgo 3b", "--distributed",
                  "--config.train.num_steps=1000", "--config.train.log_every=10"]
  assert remote[:2] == ["cd", "tv2tv"] and "setsid" in remote and "nohup" in remote
  assert "logs/train-$(hostname).log" in flag(train, "command")  # one log per worker


def test_git_install_and_v5e_type():
  cmds = dry_run(*BASE, "--accelerator_type=v5e-256", "--install=git",
                 "--git_url=https://example.com/org/tv2tv jax.git", "--git_ref=v1.2")
  assert len(cmds) == 2  # no create, no copy: install + train
  install = shlex.split(flag(cmds[0], "command"))
  assert "https://example.com/org/tv2tv jax.git" in install  # quoted URL is one word
  assert install[install.index("fetch") + 3] == "v1.2"
  assert "--distributed" in shlex.split(flag(cmds[1], "command"))
  create = dry_run(*BASE, "--accelerator_type=v5e-256", "--install=none", "--create")[0]
  assert flag(create, "accelerator-type") == "v5litepod-256"
  assert flag(create, "version") == "v2-alpha-tpuv5-lite"


def test_gcs_workdir():
  """A gs:// work directory: the `gcs` extra is installed and no local directory is made."""
  install, train = dry_run(*BASE[:-1], "--workdir=gs://bucket/runs/csgo",
                           "--accelerator_type=v5p-8", "--install=git",
                           "--git_url=https://example.com/tv2tv.git")
  assert "pip install --quiet -e '.[tpu,gcs]'" in flag(install, "command")
  remote = shlex.split(flag(train, "command"))
  assert remote[:6] == ["cd", "tv2tv", "&&", "mkdir", "-p", "logs"] and remote[6] == "&&"
  assert "--workdir=gs://bucket/runs/csgo" in remote


@pytest.mark.parametrize("args,message", [
    (["--accelerator_type=v3-8"], "unknown accelerator type 'v3-8'"),
    (["--accelerator_type=v5p-12"], "multiples of 8"),
    (["--accelerator_type=v6e-12"], "unknown accelerator type 'v6e-12'"),
    (["--accelerator_type=v5p-8", "--workdir=s3://bucket/run"], "only gs:// URIs"),
    (["--accelerator_type=v5p-8", "--install=git"], "--git_url"),
    (["--accelerator_type=v5p-8", "--", "--dry_run"], "must come before"),
])
def test_bad_arguments(args, message):
  proc = launch("--dry_run", *BASE, *args)
  assert proc.returncode == 2 and proc.stdout == ""
  assert message in proc.stderr


@pytest.mark.parametrize("drop,message", [
    ("--zone", "missing --zone"), ("--project", "missing --project")])
def test_missing_zone_or_project(drop, message):
  args = [a for a in BASE if not a.startswith(drop)] + ["--accelerator_type=v4-32"]
  proc = launch("--dry_run", *args)
  assert proc.returncode == 2 and message in proc.stderr
  # gcloud's own environment variables stand in for the flags.
  proc = launch("--dry_run", *args, env_extra={"CLOUDSDK_COMPUTE_ZONE": "z",
                                              "CLOUDSDK_CORE_PROJECT": "p"})
  assert proc.returncode == 0, proc.stderr
