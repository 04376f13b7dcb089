#!/usr/bin/env bash
# Runs a kdjax study on a Cloud TPU VM or pod slice: creates the TPU VM (or reuses one of that
# name), copies this checkout to every worker, installs the environment with the JAX TPU wheel
# of the pinned JAX version, and runs `python -m kdjax.main` on every worker at once. JAX finds
# the other workers by itself (KDJAX_DISTRIBUTED=auto, kdjax/distributed.py); every worker
# writes its shards of the Orbax checkpoints, so the workdir must be one that all workers share:
# a gs:// path, or an absolute path on a filesystem mounted on every worker (e.g. Filestore).
# Afterwards copy the workdir to a workstation and run --config.stages=analysis there.
#
# usage: launch/tpu_pod.sh --name NAME --zone ZONE --workdir gs://BUCKET/PATH|/SHARED/PATH
#                          [--accelerator-type TYPE] [--version IMAGE] [--project PROJECT]
#                          [--spot] [--no-setup] [--dry-run] -- <kdjax.main arguments>
#
#   launch/tpu_pod.sh --name kd-v4 --zone us-central2-b --accelerator-type v4-32 \
#       --workdir gs://my-bucket/kdjax/cifar -- --config=configs/default.py --config.num_seeds=16
#
#   --accelerator-type  TPU type when the VM is created (default v4-8; v4-32 is a 4-worker pod)
#   --version           TPU VM software image when created (default tpu-ubuntu2204-base)
#   --spot              create a Spot (preemptible) TPU VM; rerun the same command to resume
#   --no-setup          skip installing the environment (a reused VM that has it)
#   --dry-run           print the gcloud commands instead of running them
# Requires the gcloud CLI, logged in, with the TPU API enabled in the project.
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "run 'launch/tpu_pod.sh --help' for the usage" >&2
  exit 2
}

name="" zone="" workdir="" project=""
accelerator="v4-8" version="tpu-ubuntu2204-base" spot=0 setup=1 dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name|--zone|--workdir|--project|--accelerator-type|--version)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --workdir) workdir="$2" ;;
        --project) project="$2" ;;
        --accelerator-type) accelerator="$2" ;;
        --version) version="$2" ;;
      esac
      shift 2 ;;
    --spot) spot=1; shift ;;
    --no-setup) setup=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (kdjax.main arguments go after --)" ;;
  esac
done
[ -n "$name" ] || die "--name is required (the TPU VM to create or reuse)"
[ -n "$zone" ] || die "--zone is required (e.g. us-central2-b)"
[[ "$workdir" == gs://?* || "$workdir" == /* ]] \
  || die "--workdir must be a gs:// path or an absolute path on a filesystem every worker mounts, got '${workdir}'"
[ $# -gt 0 ] || die "no kdjax.main arguments after -- (e.g. -- --config=configs/default.py)"
for arg in "$@"; do
  case "$arg" in
    --workdir|--workdir=*) die "give the workdir as --workdir before --, not to kdjax.main" ;;
  esac
done

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -z "$project" ] || where+=(--project "$project")

run() {  # runs a command, or prints it with --dry-run
  if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

if [ "$dry_run" -eq 0 ]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not on PATH (https://cloud.google.com/sdk)"
fi

root="$(cd "$(dirname "$0")/.." && pwd)"

# 1. The TPU VM: reuse it when it exists.
if [ "$dry_run" -eq 0 ] && "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing TPU VM $name in $zone" >&2
else
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator"
          --version "$version")
  [ "$spot" -eq 0 ] || create+=(--spot)
  run "${create[@]}"
fi

# 2. The code: this checkout's files that git tracks or does not ignore (no .venv, no runs).
archive="$(mktemp -d)/kdjax.tgz"
trap 'rm -rf "$(dirname "$archive")"' EXIT
if [ "$dry_run" -eq 0 ]; then
  git -C "$root" ls-files -z --cached --others --exclude-standard \
    | tar -C "$root" --null -T - -czf "$archive"
fi
run "${gcloud_tpu[@]}" scp "$archive" "$name:kdjax.tgz" "${where[@]}" --worker=all
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command "rm -rf ~/kdjax && mkdir -p ~/kdjax && tar -xzf ~/kdjax.tgz -C ~/kdjax"

# 3. The environment: ./kd creates .venv with the pinned versions; then the TPU wheel of the
#    same JAX version (README, "Running on GPUs and TPUs").
if [ "$setup" -eq 1 ]; then
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command \
    'python3 -c "import ensurepip" 2>/dev/null || sudo apt-get -qq install -y python3-venv; cd ~/kdjax && ./kd python -c "import jax" && version="$(./kd python -c "import jax; print(jax.__version__)")" && ./kd python -m pip install --quiet "jax[tpu]==${version}" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'
fi

# 4. The study, on every worker at once.
remote="cd ~/kdjax && KDJAX_DISTRIBUTED=auto ./kd run --workdir=$(printf '%q' "$workdir")"
for arg in "$@"; do
  remote+=" $(printf '%q' "$arg")"
done
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
