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
# Flags before `--` that parse_common does not know (the script's own), and everything after `--`
# (the training command's arguments), in order.
REST=()
TRAIN_ARGS=()

die() { echo "error: $*" >&2; exit 2; }

# A flag's value must follow it: need_value "$@" before reading $2.
need_value() { [ -n "${2:-}" ] || die "$1 needs a value"; }

# The calling script's header comment (its help text).
usage() { sed -n '2,/^[^#]/p' "$0" | sed '$d'; }

# Parse the common flags and -h/--help; after `--` everything is TRAIN_ARGS; anything else goes to
# REST for the script to read.
parse_common() {
  while [ $# -gt 0 ]; do
    case "$1" in
      --) shift; TRAIN_ARGS=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
      --name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
      --zone) need_value "$@"; TPU_ZONE="$2"; shift 2 ;;
      --project) need_value "$@"; TPU_PROJECT="$2"; shift 2 ;;
      --accelerator) need_value "$@"; TPU_ACCELERATOR="$2"; shift 2 ;;
      --version) need_value "$@"; TPU_RUNTIME="$2"; shift 2 ;;
      --repo) need_value "$@"; REPO_URL="$2"; shift 2 ;;
      --branch) need_value "$@"; REPO_BRANCH="$2"; shift 2 ;;
      --dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
      --bucket) need_value "$@"; GCS_BUCKET="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
}

# For a script with no flags of its own: fail on any flag parse_common left.
no_own_flags() {
  if [ ${#REST[@]} -gt 0 ]; then die "unknown flag '${REST[0]}' for $(basename "$0") (see --help)"; fi
}

# For a script that runs training: fail when no arguments came after `--`.
need_train_args() {
  [ ${#TRAIN_ARGS[@]} -gt 0 ] || die "give the training arguments after --, e.g. -- --config configs/default.yaml"
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
