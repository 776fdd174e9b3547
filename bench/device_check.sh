#!/usr/bin/env bash
# The device check: one command on a GPU machine or a TPU VM, under 8 minutes, one JSON report.
# Installs the project into .venv-device with jax's extra for the accelerator it finds (jax[cuda12]
# when nvidia-smi lists a GPU, jax[tpu] when /dev/accel* or /dev/vfio exist; JAX_EXTRA overrides),
# runs the test suite on the device (3-minute limit), the W2 benchmark (bench/grpo_step.py), and a
# Qwen3-0.6B-shaped G²RPO-A step at a paper-like batch (bench/device_step.py: random init, no
# downloads; XLA's predicted memory against the measured peak), and writes DIR/device_check.json.
#
#   bash bench/device_check.sh [--out DIR] [--cpu] [--dry-run]
#
#   --out DIR   where the report and logs go (default bench/.cache/device-check)
#   --cpu       the dry form on this machine's CPU: no install, tiny shapes, W1, two test files
#   --dry-run   print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=bench/.cache/device-check
MODE=auto
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ -n "${2:-}" ] || { echo "error: --out needs a value" >&2; exit 2; }; OUT_DIR=$2; shift 2 ;;
    --cpu) MODE=cpu; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "error: unknown flag '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$MODE" = cpu ]; then
  PLATFORM=cpu
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PLATFORM=cuda
elif compgen -G "/dev/accel*" >/dev/null || [ -d /dev/vfio ]; then
  PLATFORM=tpu
else
  PLATFORM=cpu
fi
case "$PLATFORM" in
  cuda) EXTRA="${JAX_EXTRA:-jax[cuda12]>=0.7,<0.13}" ;;
  tpu) EXTRA="${JAX_EXTRA:-jax[tpu]>=0.7,<0.13}" ;;
  *) EXTRA="" ;;
esac

exec 3>&2  # the commands are printed here even where a stage's stderr goes to its log
run() {  # print the command; run it unless --dry-run
  echo "+ $*" >&3
  [ "$DRY" = 1 ] || "$@"
}

mkdir -p "$OUT_DIR"  # also for --dry-run: the stages' logs are redirected there
if [ "$MODE" = cpu ]; then
  PY="${PYTHON:-python}"
  TESTS=(tests/test_model.py tests/test_guidance.py)
  W=(--workload W1 --warmup 1 --steps 1)
  STEP=(--tiny --prompts 2 --generations 4 --prompt-len 8 --guidance-len 8 --new-tokens 8 --accumulation 2)
else
  PY=.venv-device/bin/python
  run python3 -m venv .venv-device
  if [ -n "$EXTRA" ]; then
    run "$PY" -m pip install -q -r requirements.txt -r requirements-test.txt -e . "$EXTRA"
  else
    run "$PY" -m pip install -q -r requirements.txt -r requirements-test.txt -e .
  fi
  TESTS=(tests)
  W=(--workload W2 --warmup 1 --steps 2)
  STEP=()
fi
export JAX_PLATFORMS="$PLATFORM"

# Each stage may fail or time out without stopping the others: the report says which did.
set +e
run timeout 180 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml "$OUT_DIR/tests.xml" \
  > "$OUT_DIR/tests.log" 2>&1
TESTS_RC=$?
run timeout 150 "$PY" bench/grpo_step.py "${W[@]}" > "$OUT_DIR/workload.json" 2> "$OUT_DIR/workload.log"
BENCH_RC=$?
run timeout 240 "$PY" bench/device_step.py "${STEP[@]}" --out "$OUT_DIR/step.json" > "$OUT_DIR/step.log" 2>&1
STEP_RC=$?
set -e

run "$PY" - "$OUT_DIR" "$PLATFORM" "$TESTS_RC" "$BENCH_RC" "$STEP_RC" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, platform, tests_rc, bench_rc, step_rc = Path(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])

def read_json(path):
    try:
        lines = path.read_text().strip().splitlines()
        return json.loads("\n".join(lines)) if path.suffix == ".json" and lines and lines[0] == "{" else json.loads(lines[-1])
    except (OSError, ValueError, IndexError):
        return None

tests = {"exit_code": tests_rc}
try:
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
except (OSError, ET.ParseError):
    tests["note"] = "no junit report (timed out or did not start): see tests.log"
report = {"platform": platform, "tests": tests,
          "workload": {"exit_code": bench_rc, "result": read_json(out / "workload.json")},
          "step": {"exit_code": step_rc, "result": read_json(out / "step.json")}}
(out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
