#!/usr/bin/env bash
# Resume after preemption: when the TPU VM is PREEMPTED (or gone), delete it, create it again, set it
# up and launch the training command with --resume, which continues from the newest checkpoint in
# train.output_dir (keep it on the --bucket mount so it outlives the VM). With --watch SECONDS it
# checks again every SECONDS until the run's summary.json exists.
#   tpu_scripts/resume.sh --name my-tpu --repo URL --bucket B [--spot] [--watch 300] [--dry-run] -- TRAIN ARGS
set -euo pipefail
here="$(dirname "$0")"
# shellcheck source-path=SCRIPTDIR source=common.sh
. "${here}/common.sh"
parse_common "$@"
WATCH=0
SPOT=()
set -- ${REST[@]+"${REST[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --spot) SPOT=(--spot); shift ;;
    --watch) need_value "$@"; WATCH="$2"; shift 2 ;;
    --watch=*) WATCH="${1#--watch=}"; shift ;;
    *) die "unknown flag '$1' for resume.sh; training arguments go after --" ;;
  esac
done
need_train_args
common=(--name "${TPU_NAME}" --zone "${TPU_ZONE}" --accelerator "${TPU_ACCELERATOR}" --version "${TPU_RUNTIME}"
        --branch "${REPO_BRANCH}" --dir "${REMOTE_DIR}")
if [ -n "${TPU_PROJECT}" ]; then common+=(--project "${TPU_PROJECT}"); fi
if [ -n "${REPO_URL}" ]; then common+=(--repo "${REPO_URL}"); fi
if [ -n "${GCS_BUCKET}" ]; then common+=(--bucket "${GCS_BUCKET}"); fi
if [ "${DRY_RUN}" = 1 ]; then common+=(--dry-run); fi

recover() {
  local state
  if [ "${DRY_RUN}" = 1 ]; then state=PREEMPTED; else state="$(tpu_state)"; fi
  echo "TPU ${TPU_NAME}: ${state}"
  case "${state}" in
    READY) return 0 ;;
    NOT_FOUND) ;;
    *) "${here}/delete.sh" "${common[@]}" ;;
  esac
  "${here}/create.sh" "${common[@]}" ${SPOT[@]+"${SPOT[@]}"}
  "${here}/setup.sh" "${common[@]}"
  "${here}/launch.sh" "${common[@]}" --resume -- "${TRAIN_ARGS[@]}"
}

recover
while [ "${WATCH}" -gt 0 ] && [ "${DRY_RUN}" != 1 ]; do
  sleep "${WATCH}"
  recover
done
