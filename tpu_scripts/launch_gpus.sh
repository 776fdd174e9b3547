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
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS="${2:?--gpus needs a value}"; shift 2 ;;
    --data) MESH_DATA="${2:?--data needs a value}"; shift 2 ;;
    --fsdp) MESH_FSDP="${2:?--fsdp needs a value}"; shift 2 ;;
    --tensor) MESH_TENSOR="${2:?--tensor needs a value}"; shift 2 ;;
    --coordinator) COORDINATOR="${2:?--coordinator needs HOST:PORT}"; shift 2 ;;
    --num-hosts) NUM_HOSTS="${2:?--num-hosts needs a value}"; shift 2 ;;
    --host-id) HOST_ID="${2:?--host-id needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown flag '$1' for launch_gpus.sh; training arguments go after --" ;;
  esac
done
[ ${#TRAIN_ARGS[@]} -gt 0 ] || die "give the training arguments after --, e.g. -- --config configs/default.yaml"
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
