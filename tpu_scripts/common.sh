#!/usr/bin/env bash
# Shared settings and helpers for the TPU VM scripts (sourced, not run).
# Every setting comes from a flag or, failing that, from the environment variable of the same name:
#   --name TPU_NAME  --zone TPU_ZONE  --project TPU_PROJECT  --accelerator TPU_ACCELERATOR
#   --version TPU_RUNTIME  --repo REPO_URL  --branch REPO_BRANCH  --dir REMOTE_DIR  --bucket GCS_BUCKET
#   --dry-run (DRY_RUN=1): print the exact commands instead of running them.

TPU_NAME="${TPU_NAME:-g2rpo-tpu}"
TPU_ZONE="${TPU_ZONE:-us-central2-b}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-v4-16}"
TPU_RUNTIME="${TPU_RUNTIME:-tpu-ubuntu2204-base}"
REPO_URL="${REPO_URL:-}"
REPO_BRANCH="${REPO_BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-g2rpo-jax}"
GCS_BUCKET="${GCS_BUCKET:-}"
DRY_RUN="${DRY_RUN:-0}"
# jax's own TPU extra, the same range as requirements.txt (README "Installs per platform").
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]>=0.7,<0.13}"
LOG_FILE="${LOG_FILE:-g2rpo-train.log}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/g2rpo}"
# Flags a script leaves unparsed (e.g. training overrides), in order.
REST=()

die() { echo "error: $*" >&2; exit 2; }

# Parse the common flags; anything else goes to REST for the script to read.
parse_common() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --accelerator) TPU_ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
      --version) TPU_RUNTIME="${2:?--version needs a value}"; shift 2 ;;
      --repo) REPO_URL="${2:?--repo needs a value}"; shift 2 ;;
      --branch) REPO_BRANCH="${2:?--branch needs a value}"; shift 2 ;;
      --dir) REMOTE_DIR="${2:?--dir needs a value}"; shift 2 ;;
      --bucket) GCS_BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
}

# gcloud's location flags for this TPU.
tpu_flags() {
  TPU_FLAGS=("--zone=${TPU_ZONE}")
  if [ -n "${TPU_PROJECT}" ]; then TPU_FLAGS+=("--project=${TPU_PROJECT}"); fi
}

# One word, single-quoted when it holds anything a shell would interpret.
shell_quote() {
  case "$1" in
    *[!A-Za-z0-9_./:=@%+,-]*|'') printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Print a command (quoted, so it can be pasted into a shell) and run it unless --dry-run.
run() {
  local line="+" word
  for word in "$@"; do line+=" $(shell_quote "$word")"; done
  echo "${line}"
  if [ "${DRY_RUN}" != "1" ]; then "$@"; fi
}

# Run one shell command line on every worker of the TPU VM (or one worker: WORKER=0).
on_workers() {
  tpu_flags
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker="${WORKER:-all}" --command="$1"
}

# State of the TPU VM (READY, PREEMPTED, ...; NOT_FOUND when there is none).
tpu_state() {
  tpu_flags
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${TPU_FLAGS[@]}" --format='value(state)' 2>/dev/null \
    || echo NOT_FOUND
}
