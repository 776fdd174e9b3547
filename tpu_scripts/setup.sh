#!/usr/bin/env bash
# Set up the environment on every worker: clone the repository, make a venv, install the project with
# jax's TPU extra, and (with --bucket) mount a GCS bucket with gcsfuse at MOUNT_DIR for run outputs
# and checkpoints that every worker sees and that outlive the VM.
#   tpu_scripts/setup.sh --name my-tpu --repo https://github.com/you/g2rpo-jax [--bucket my-bucket] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
no_own_flags
[ -n "${REPO_URL}" ] || die "set the repository to clone: --repo URL (or REPO_URL)"
remote="set -e; sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv git"
remote+="; if [ -d $(printf %q "${REMOTE_DIR}") ]; then git -C $(printf %q "${REMOTE_DIR}") fetch -q origin"
remote+=" && git -C $(printf %q "${REMOTE_DIR}") checkout -q $(printf %q "${REPO_BRANCH}")"
remote+=" && git -C $(printf %q "${REMOTE_DIR}") pull -q; else git clone -q -b $(printf %q "${REPO_BRANCH}")"
remote+=" $(printf %q "${REPO_URL}") $(printf %q "${REMOTE_DIR}"); fi"
remote+="; cd $(printf %q "${REMOTE_DIR}") && python3 -m venv .venv && . .venv/bin/activate"
remote+=" && pip install -q -r requirements.txt -e . && pip install -q $(printf %q "${JAX_TPU_SPEC}")"
remote+=" && python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
if [ -n "${GCS_BUCKET}" ]; then
  remote+="; sudo mkdir -p $(printf %q "${MOUNT_DIR}") && sudo chown \$USER $(printf %q "${MOUNT_DIR}")"
  remote+=" && (mountpoint -q $(printf %q "${MOUNT_DIR}") || gcsfuse --implicit-dirs"
  remote+=" $(printf %q "${GCS_BUCKET}") $(printf %q "${MOUNT_DIR}"))"
fi
on_workers "${remote}"
