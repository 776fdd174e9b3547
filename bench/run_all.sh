#!/usr/bin/env bash
# Ours and every peer, back to back, on W1 and W2; JSON lines appended to $OUT (one per run).
# Usage: bash bench/run_all.sh [OUT] [REPEATS]   (after bash bench/peers/setup.sh)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-bench/.cache/results.jsonl}
REPEATS=${2:-1}
PROJECT_PY=${PROJECT_PY:-/work/venv/bin/python}
V=bench/.venvs
mkdir -p "$(dirname "$OUT")"
run() {  # label, command...
    local label=$1; shift
    echo "== $label: $* (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$@" 2> "bench/.cache/$label.err" | tail -n 1 >> "$OUT" || echo "$label failed: see bench/.cache/$label.err" >&2
}
for _ in $(seq "$REPEATS"); do
    for W in W1 W2; do
        steps=3; [ "$W" = W2 ] && steps=2
        run "ours-$W" "$PROJECT_PY" bench/grpo_step.py --workload "$W" --warmup 1 --steps "$steps"
        run "tunix-$W" "$V/tunix/bin/python" bench/peers/tunix_grpo.py --workload "$W" --warmup 1 --steps "$steps"
        run "hf-$W" "$V/hf/bin/python" bench/peers/hf_generate.py --workload "$W" --warmup 1 --steps "$steps"
        trl_steps=$steps; [ "$W" = W2 ] && trl_steps=1
        run "trl-$W" "$V/trl/bin/python" bench/peers/trl_grpo.py --workload "$W" --warmup 1 --steps "$trl_steps"
    done
done
