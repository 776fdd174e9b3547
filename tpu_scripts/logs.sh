#!/usr/bin/env bash
# Stream the training log of one worker (default 0, where process 0 logs metrics).
#   tpu_scripts/logs.sh --name my-tpu [--worker 1] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
WORKER=0
set -- ${REST[@]+"${REST[@]}"}
while [ $# -gt 0 ]; do
  case "$1" in
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    *) die "unknown flag '$1' for logs.sh" ;;
  esac
done
on_workers "tail -n 100 -F $(printf %q "${REMOTE_DIR}/${LOG_FILE}")"
