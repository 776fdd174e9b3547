#!/usr/bin/env bash
# Train on one machine with several local GPUs: one process that drives all the GPUs it sees, over
# the mesh given by mesh.* (default: data parallel over every GPU). For several GPU machines, run it
# once per machine with --coordinator HOST:PORT --num-hosts N --host-id I (jax.distributed).
#   tpu_scripts/launch_gpus.sh [--gpus 0,1,2,3] [--fsdp 4] [--tensor 1] [--dry-run] -- --config configs/default.yaml ...
# Settings from flags or the environment: GPUS (CUDA_VISIBLE_DEVICES), MESH_DATA, MESH_FSDP, MESH_TENSOR,
# COORDINATOR, NUM_HOSTS, HOST_ID, PYTHON (default: python), DRY_RUN=1.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "$0")/common.sh"
GPUS="${GPUS:-}"
MESH_DATA="${MESH_DATA:--1}"
MESH_FSDP="${MESH_FSDP:-1}"
MESH_TENSOR="${MESH_TENSOR:-1}"
COORDINATOR="${COORDINATOR:-}"
NUM_HOSTS="${NUM_HOSTS:-1}"
HOST_ID="${HOST_ID:-0}"
PYTHON="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) need_value "$@"; GPUS="$2"; shift 2 ;;
    --data) need_value "$@"; MESH_DATA="$2"; shift 2 ;;
    --fsdp) need_value "$@"; MESH_FSDP="$2"; shift 2 ;;
    --tensor) need_value "$@"; MESH_TENSOR="$2"; shift 2 ;;
    --coordinator) need_value "$@"; COORDINATOR="$2"; shift 2 ;;
    --num-hosts) need_value "$@"; NUM_HOSTS="$2"; shift 2 ;;
    --host-id) need_value "$@"; HOST_ID="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag '$1' for launch_gpus.sh; training arguments go after --" ;;
  esac
done
need_train_args
if [ "${NUM_HOSTS}" -gt 1 ] && [ -z "${COORDINATOR}" ]; then
  die "--num-hosts ${NUM_HOSTS} needs --coordinator HOST:PORT (process 0's address, the same on every host)"
fi
ENV_ARGS=()
if [ -n "${GPUS}" ]; then ENV_ARGS+=("CUDA_VISIBLE_DEVICES=${GPUS}"); fi
TRAIN_ARGS+=("mesh.data=${MESH_DATA}" "mesh.fsdp=${MESH_FSDP}" "mesh.tensor=${MESH_TENSOR}")
if [ "${NUM_HOSTS}" -gt 1 ]; then
  TRAIN_ARGS+=(mesh.distributed=on "mesh.coordinator_address=${COORDINATOR}" "mesh.num_processes=${NUM_HOSTS}"
               "mesh.process_id=${HOST_ID}")
else
  TRAIN_ARGS+=(mesh.distributed=off)
fi
run env ${ENV_ARGS[@]+"${ENV_ARGS[@]}"} "${PYTHON}" -m g2rpo_jax.train "${TRAIN_ARGS[@]}"
