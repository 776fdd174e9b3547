#!/usr/bin/env bash
# Create a TPU VM (a single host or a pod slice).
#   tpu_scripts/create.sh --name my-tpu --zone us-central2-b --accelerator v4-16 [--spot] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
parse_common "$@"
EXTRA=()
for arg in ${REST[@]+"${REST[@]}"}; do
  case "$arg" in
    --spot) EXTRA+=(--spot) ;;
    *) die "unknown flag '$arg' for create.sh (see --help)" ;;
  esac
done
tpu_flags
run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${TPU_FLAGS[@]}" \
  --accelerator-type="${TPU_ACCELERATOR}" --version="${TPU_RUNTIME}" ${EXTRA[@]+"${EXTRA[@]}"}
