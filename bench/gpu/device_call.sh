#!/usr/bin/env bash
# One call of the GPU matrix on an offline GPU machine (the device tool, or any GPU server).
#
#   bash bench/gpu/device_call.sh [BUDGET_SECONDS] [extra run_matrix.py args...]
#
# Run from the repository root. Needs the wheels from bench/gpu/prepare_wheels.py in .whl/
# (WHEELS=dir to use another folder). Idempotent, so call it again to go on where it stopped:
#   1. installs .whl/*.whl into /tmp/site (once per machine) and this checkout's qplan over it;
#   2. seeds /tmp/qplan-reports from reports/gpu/ of this checkout (earlier calls' results, so a
#      fresh machine resumes instead of re-running finished cells);
#   3. runs run_matrix.py with --budget-seconds BUDGET_SECONDS (default 540: one device-tool
#      command may run 600 s) and --out-root /tmp/qplan-reports;
#   4. if $OUT is set (the device tool), packs /tmp/qplan-reports without the adapters (an 8B
#      r=16 adapter is ~170 MB) into $OUT/gpu-runs.tgz, plus $OUT/matrix.md and $OUT/run.log.
set -uo pipefail
BUDGET=${1:-540}
shift || true
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
REPORTS=${REPORTS:-/tmp/qplan-reports}
PY=${PYTHON:-python3}
T0=$(date +%s)

if [ ! -f "$SITE/.qplan-wheels-installed" ]; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
      || { echo "wheel install failed" >&2; exit 2; }
    touch "$SITE/.qplan-wheels-installed"
  else
    echo "no wheels in $WHEELS: assuming bitsandbytes/unsloth/trl/datasets are installed" >&2
  fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# this checkout's qplan, over whatever wheel was carried (a stale wheel would run old code)
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$SITE" . >/dev/null 2>&1 || echo "note: could not build qplan from this checkout; using the wheel's" >&2

mkdir -p "$REPORTS"
if [ -d reports/gpu ]; then cp -rn reports/gpu/. "$REPORTS"/ 2>/dev/null || true; fi

SPENT=$(( $(date +%s) - T0 ))
export PYTHONUNBUFFERED=1
$PY bench/gpu/run_matrix.py --budget-seconds $(( BUDGET - SPENT - 25 )) --out-root "$REPORTS" \
  --env-cache "$SITE/.qplan-env.json" "$@" 2>&1 \
  | tee "${OUT:-/tmp}/run.log" | grep --line-buffered -E '^\[matrix\]|Error|error:' 
RC=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu-runs.tgz" --exclude='*/adapter' -C "$REPORTS" . && ls -la "$OUT/gpu-runs.tgz"
  for f in "$REPORTS"/*/matrix.md; do [ -f "$f" ] && cp "$f" "$OUT/matrix.md"; done
fi
exit $RC
