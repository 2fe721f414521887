#!/usr/bin/env python3
r"""Launches TV2TV training on every worker of a Cloud TPU VM slice with `gcloud`.

Standard library only (runs on a laptop with the Google Cloud CLI; no JAX needed):

    python scripts/launch_tpu_pod.py --name=tv2tv-pod --zone=us-east5-a --project=my-proj \
        --accelerator_type=v5p-128 --create \
        --config=experiments/csgo_3b.py:6s --workdir=/mnt/shared/runs/csgo_3b \
        [--install=copy | --install=git --git_url=https://... --git_ref=main] \
        [--dry_run] [-- --config.train.num_steps=1000]

Steps, each a `gcloud compute tpus tpu-vm` command (`--dry_run` prints them, runs none):
  1. create (with --create): `tpu-vm create NAME --accelerator-type=... --version=...`.
  2. ship the code to every worker (`--worker=all`), one of
       --install=copy  (default) the working tree (git-tracked and untracked, non-ignored
                       files) as a tarball: `tpu-vm scp --worker=all`, then unpack;
       --install=git   `git fetch <git_url> <git_ref>` on each worker (the ref must be
                       pushed; a branch, tag or commit);
     then `pip install -e '.[tpu]'` (jax[tpu] with its pinned libtpu) on each worker
     (`'.[tpu,gcs]'` for a gs:// work directory).
  3. train: `tpu-vm ssh --worker=all --command=...` starts the same command on every worker:
       python3 -m tv2tv_jax.main --config=... --workdir=... --distributed [extra flags]
     under `setsid nohup` (it outlives the ssh session), output in
     <remote_dir>/logs/train-<hostname>.log on each worker. `--distributed` makes each
     process call jax.distributed.initialize(), which on Cloud TPU finds the coordinator
     and process ids from the TPU metadata.

The work directory must be one path that every worker sees (checkpoints are written by all
processes): a gs://bucket/path URI (tv2tv_jax.workdirs), or a Filestore (NFS) or gcsfuse
mount at the same path on every worker (docs/launch.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

# Our generation name -> (gcloud accelerator-type prefix, default TPU VM runtime version,
# what the number in the type counts). Runtime versions from the Cloud TPU docs
# ("TPU VM images"); override with --runtime_version.
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base", "cores"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite", "chips"),
    "v5p": ("v5p", "v2-alpha-tpuv5", "cores"),
    "v6e": ("v6e", "v2-alpha-tpuv6e", "chips"),
}
ALIASES = {"v5litepod": "v5e"}
SLICE_CHIPS_2D = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slice sizes


class LaunchError(ValueError):
  """A bad argument, with a message saying what to pass instead."""


def accelerator_type(name: str) -> tuple[str, str]:
  """`v5p-128` / `v5e-8` / `v5litepod-8` / `v4-32` / `v6e-64` -> (gcloud accelerator
  type, default runtime version). v4 and v5p count TensorCores (2 per chip, at least 8);
  v5e and v6e count chips (1, 4, 8, ..., 256)."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  gen = ALIASES.get(m.group(1), m.group(1)) if m else None
  if gen not in GENERATIONS:
    raise LaunchError(f"unknown accelerator type {name!r}; expected v4-N, v5p-N, v5e-N "
                      "(= v5litepod-N) or v6e-N, e.g. v5p-128")
  prefix, runtime, unit = GENERATIONS[gen]
  n = int(m.group(2))
  if unit == "cores" and (n < 8 or n % 8):
    raise LaunchError(f"unknown accelerator type {name!r}: {gen} counts TensorCores in "
                      "multiples of 8 (v5p-8 is one 4-chip host)")
  if unit == "chips" and n not in SLICE_CHIPS_2D:
    raise LaunchError(f"unknown accelerator type {name!r}: {gen} slices have "
                      f"{', '.join(map(str, SLICE_CHIPS_2D))} chips")
  return f"{prefix}-{n}", runtime


def _gcloud(args, verb: str, *rest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest,
          f"--zone={args.zone}", f"--project={args.project}"]


def _ssh_all(args, remote: str) -> list[str]:
  return _gcloud(args, "ssh", args.name, "--worker=all", f"--command={remote}")


def remote_install(args) -> str:
  """The shell command each worker runs to get the code and install it with the tpu extra."""
  d = shlex.quote(args.remote_dir)
  if args.install == "git":
    get = (f"(test -d {d}/.git || git clone --quiet {shlex.quote(args.git_url)} {d}) && "
           f"git -C {d} fetch --quiet {shlex.quote(args.git_url)} {shlex.quote(args.git_ref)}"
           f" && git -C {d} checkout --quiet --detach FETCH_HEAD")
  else:
    # A fresh copy each time: files deleted locally must not linger on the workers.
    get = (f"rm -rf {d} && mkdir -p {d} && tar -xzf {shlex.quote(args.remote_tarball)} "
           f"-C {d}")
  extras = "tpu,gcs" if args.workdir.startswith("gs://") else "tpu"
  return (f"set -e; {get} && cd {d} && python3 -m pip install --quiet --upgrade pip && "
          f"python3 -m pip install --quiet -e '.[{extras}]'")


def remote_train(args) -> str:
  """The shell command each worker runs to start training in the background."""
  d = shlex.quote(args.remote_dir)
  cmd = ["python3", "-m", "tv2tv_jax.main", f"--config={args.config}",
         f"--workdir={args.workdir}", "--distributed", *args.extra]
  # $(hostname) is expanded by the worker's shell: one log file per worker.
  log = "logs/train-$(hostname).log"  # relative to the checkout (after the cd)
  # A bucket has no directories to make (and `mkdir -p gs://...` would make a local one).
  mk = "" if args.workdir.startswith("gs://") else f" {shlex.quote(args.workdir)}"
  return (f"cd {d} && mkdir -p logs{mk} && "
          f"PYTHONUNBUFFERED=1 setsid nohup {shlex.join(cmd)} > {log} 2>&1 < /dev/null & "
          f"echo started on $(hostname), log {log}")


def plan(args) -> list[list[str]]:
  """Every command to run, in order (each an argv list)."""
  accel, runtime = accelerator_type(args.accelerator_type)
  cmds = []
  if args.create:
    create = _gcloud(args, "create", args.name, f"--accelerator-type={accel}",
                     f"--version={args.runtime_version or runtime}")
    if args.spot:
      create.append("--spot")
    cmds.append(create)
  if args.install == "copy":
    cmds.append(["tar", "-czf", args.local_tarball, "-C", args.source_dir, "-T",
                 args.file_list])
    cmds.append(_gcloud(args, "scp", args.local_tarball,
                        f"{args.name}:{args.remote_tarball}", "--worker=all"))
  if args.install != "none":
    cmds.append(_ssh_all(args, remote_install(args)))
  cmds.append(_ssh_all(args, remote_train(args)))
  return cmds


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses and checks the arguments; raises LaunchError with a clear message."""
  extra = []
  if "--" in argv:  # everything after `--` goes to tv2tv_jax.main unchanged
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--name", required=True, help="TPU VM (slice) name")
  p.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"))
  p.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"))
  p.add_argument("--accelerator_type", required=True, help="v5p-128, v5e-256, v4-32, v6e-64")
  p.add_argument("--runtime_version", default=None, help="TPU VM image (default: by type)")
  p.add_argument("--create", action="store_true", help="create the TPU VM slice first")
  p.add_argument("--spot", action="store_true", help="create it as a Spot VM")
  p.add_argument("--install", choices=("copy", "git", "none"), default="copy")
  p.add_argument("--git_url", default=None)
  p.add_argument("--git_ref", default="main")
  p.add_argument("--source_dir", default=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), help="local checkout to copy (--install=copy)")
  p.add_argument("--remote_dir", default="tv2tv", help="checkout on each worker (relative "
                 "to the home directory, or absolute)")
  p.add_argument("--config", required=True, help="experiments/<file>.py:<variant>")
  p.add_argument("--workdir", required=True,
                 help="gs://bucket/path, or a path every worker sees (NFS/gcsfuse)")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  try:
    args = p.parse_args(argv)
  except SystemExit as e:
    raise LaunchError("bad arguments (see the usage above)") from e
  args.extra = extra
  if "--dry_run" in extra:  # a misplaced --dry_run must never mean "run it for real"
    raise LaunchError("--dry_run must come before `--` (what follows goes to main.py)")
  missing = [f"--{k}" for k in ("zone", "project") if not getattr(args, k)]
  if missing:
    raise LaunchError(f"missing {' and '.join(missing)} (or set CLOUDSDK_COMPUTE_ZONE / "
                      "CLOUDSDK_CORE_PROJECT)")
  accelerator_type(args.accelerator_type)  # fails early on an unknown type
  if args.install == "git" and not args.git_url:
    raise LaunchError("--install=git needs --git_url (a URL the workers can clone)")
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", args.workdir)
  if scheme and scheme.group(1) != "gs":
    raise LaunchError(f"--workdir {args.workdir!r}: only gs:// URIs or a filesystem path "
                      "shared by all workers (NFS, gcsfuse mount) are supported (docs/launch.md)")
  if not re.fullmatch(r"[\w./-]+\.py(:[\w,.-]+)?", args.config):
    raise LaunchError(f"--config {args.config!r}: expected experiments/<file>.py[:variant]")
  args.local_tarball = os.path.join(tempfile.gettempdir(), f"tv2tv-{args.name}.tgz")
  args.file_list = os.path.join(tempfile.gettempdir(), f"tv2tv-{args.name}.files")
  args.remote_tarball = "tv2tv-src.tgz"
  return args


def write_file_list(args) -> int:
  """The files --install=copy ships: git-tracked plus untracked, non-ignored ones."""
  out = subprocess.run(["git", "-C", args.source_dir, "ls-files", "--cached", "--others",
                        "--exclude-standard"], check=True, capture_output=True, text=True)
  files = [f for f in out.stdout.splitlines()
           if os.path.exists(os.path.join(args.source_dir, f))]
  with open(args.file_list, "w") as fh:
    fh.write("\n".join(files) + "\n")
  return len(files)


def main(argv: list[str]) -> int:
  try:
    args = parse_args(argv)
    cmds = plan(args)
  except LaunchError as e:
    print(f"launch_tpu_pod: error: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0
  if args.install == "copy":
    print(f"# shipping {write_file_list(args)} files from {args.source_dir}")
  for cmd in cmds:
    print("+", shlex.join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc:
      print(f"launch_tpu_pod: error: exit status {rc} from: {shlex.join(cmd[:6])} ...",
            file=sys.stderr)
      return rc
  print(f"# started. Logs: gcloud compute tpus tpu-vm ssh {args.name} --zone={args.zone} "
        f"--project={args.project} --worker=0 --command='tail -f "
        f"{args.remote_dir}/logs/train-*.log'")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
