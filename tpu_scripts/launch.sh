#!/usr/bin/env bash
# Launch the same training command on every worker (one process per host, jax.distributed finds the
# others by itself on a TPU VM). Arguments after `--` go to `python -m g2rpo_jax.train`.
#   tpu_scripts/launch.sh --name my-tpu [--resume] [--dry-run] -- --config configs/default.yaml \
#       train.output_dir=/mnt/g2rpo/runs/r1 checkpoint.every_steps=50
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
RESUME=0
for arg in ${REST[@]+"${REST[@]}"}; do
  case "$arg" in
    --resume) RESUME=1 ;;
    *) die "unknown flag '$arg' for launch.sh; training arguments go after --" ;;
  esac
done
need_train_args
# Overrides go last (after --config), so these two join the user's: every process joins one run.
TRAIN_ARGS+=(mesh.distributed=on)
if [ "${RESUME}" = 1 ]; then TRAIN_ARGS+=(train.resume=auto); fi
train="$(printf '%q ' python -m g2rpo_jax.train "${TRAIN_ARGS[@]}")"
# nohup + background: the run survives the ssh session; its output goes to LOG_FILE on each worker.
remote="cd $(printf %q "${REMOTE_DIR}") && . .venv/bin/activate && (nohup ${train% } > $(printf %q "${LOG_FILE}") 2>&1 &)"
on_workers "${remote}"
