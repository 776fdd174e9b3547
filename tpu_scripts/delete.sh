#!/usr/bin/env bash
# Delete the TPU VM (outputs on a --bucket mount survive).
#   tpu_scripts/delete.sh --name my-tpu [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
no_own_flags
tpu_flags
run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${TPU_FLAGS[@]}" --quiet
