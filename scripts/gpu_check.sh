#!/usr/bin/env bash
# One call verifies everything on a GPU machine (no network needed): install the package (which
# builds the CUDA extension), run the whole test suite including GPU tests, run the benchmarks,
# and write logs + JSON to the output folder: $1, else $OUT, else ./gpu-check-out.
#   bash scripts/gpu_check.sh /tmp/out
# GPU_CHECK_PHASES (default "tests bench") picks phases, so that a call that must stay under the
# device tool's 10-minute limit can run tests and benchmarks separately; BENCH_OPS limits the
# benchmarks to some ops (space-separated names, as `python -m latentembed bench --op` takes).
# Exits non-zero if the install or any test fails (benchmarks still run after failed tests).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}
[ -d .whl ] && $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{ date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi; nvcc --version; $py -m pip list 2>/dev/null; } >"$out/env.txt" 2>&1

start=$(date +%s)
if ! LATENTEMBED_BUILD_CUDA=1 $py -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1; then
  tail -40 "$out/install.log"; echo "gpu_check: install failed"; exit 1
fi
echo "install (extension build): $(( $(date +%s) - start )) s"
# On a GPU machine a missing extension would only skip the cuda tests: make it an error here.
if ! $py -c "import latentembed._extension as e; e.load_extension()" 2>>"$out/install.log"; then
  tail -5 "$out/install.log"; echo "gpu_check: the CUDA extension does not load"; exit 1
fi
$py -m latentembed info 2>&1 | tee "$out/info.txt"

phases=${GPU_CHECK_PHASES:-tests bench}
tests_rc=0 bench_rc=0
if [[ " $phases " == *" tests "* ]]; then
  $py -m pytest tests -q -rs -p no:cacheprovider --durations=25 --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
  tests_rc=$?
  tail -40 "$out/tests.log"
fi
if [[ " $phases " == *" bench "* ]]; then
  op_args=()
  for op in ${BENCH_OPS:-}; do op_args+=(--op "$op"); done
  $py -m latentembed bench "${op_args[@]}" --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  bench_rc=${PIPESTATUS[0]}
fi
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, logs in $out"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
