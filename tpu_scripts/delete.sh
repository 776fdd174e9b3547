#!/usr/bin/env bash
# Delete the TPU VM (outputs on a --bucket mount survive).
#   tpu_scripts/delete.sh --name my-tpu [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
if [ ${#REST[@]} -gt 0 ]; then
  case "${REST[0]}" in
    -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
    *) die "unknown flag '${REST[0]}' for delete.sh" ;;
  esac
fi
tpu_flags
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${TPU_FLAGS[@]}" --quiet
