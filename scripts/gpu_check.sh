#!/usr/bin/env bash
# The GPU check in ONE device call of under 8 minutes (docs/gpu.md, "Running the GPU check"):
#   bash scripts/gpu_check.sh [--full] [--dry-run] [OUT]        (OUT: $OUT, else ./gpu-check-out)
# Phases, each with a time limit inside one overall budget (GPU_CHECK_BUDGET_S, default 450 s):
#   env      env.txt: date, commit, nvidia-smi, nvcc, versions, `python -m latentembed info`
#   install  install.log: `pip install -e .` building the CUDA extension for sm_90 only
#            (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16); the extension must load
#   tests    tests.log, tests.xml: tests/ops, tests/modules, tests/models (not `slow`) on the GPU;
#            the `gpu`-marked ones one at a time (large allocations), the rest in parallel
#            (pytest-xdist, GPU_CHECK_WORKERS=6); Triton autotuning off (LATENTEMBED_AUTOTUNE=first);
#            GPU_CHECK_TESTS replaces the selection
#   bench    bench.txt, bench.json: `python -m latentembed bench --quick` over the target ops in
#            order of priority (BENCH_OPS), two configurations tried per Triton kernel
#            (LATENTEMBED_AUTOTUNE=2); bench.json is rewritten after every op
# and gpu_check.json: every target of docs/gpu.md met / MISSED / not measured / not run, with the
# numbers, the phases, the test counts, the performance model and the launched kernels' registers
# and spills. It is rewritten after every phase and from the exit trap, so a failed or killed run
# still leaves what it got. A later phase runs even when an earlier one failed (tests failing
# do not stop the benchmarks), unless the install failed: nothing can run then.
# The Triton cache is TRITON_CACHE_DIR (default out/triton-cache, git-ignored): carried to a
# rerun (the device tool's `carry`), it saves the compiles; OUT/triton-cache.tgz brings it back
# when it is under 15 MiB. At most 8 files are left in OUT (the device tool's limit).
# --full: every test, every benchmark with every baseline and full autotuning: several calls'
#   worth; split it with GPU_CHECK_PHASES="install tests" / "install bench" (one call each).
# --dry-run: the control flow only, on any machine: no install, no GPU; each phase is a stub that
#   sleeps GPU_CHECK_STUB_SECONDS (default 0) and fails if named in GPU_CHECK_FAIL.
# Exit status: 0 when every phase that ran succeeded, 1 otherwise, 143 when killed.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=quick out=
for arg in "$@"; do
  case $arg in
    --full) mode=full ;;
    --dry-run) mode=dry-run ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (expected --full, --dry-run, -h)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
out=${out:-${OUT:-gpu-check-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-$([ "$mode" = full ] && echo 570 || echo 450)}
reserve=${GPU_CHECK_RESERVE_S:-20}  # kept for the final report and the cache archive
start=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/out/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
phases=${GPU_CHECK_PHASES:-env install tests bench}
if [ "$mode" = full ]; then
  bench_ops=${BENCH_OPS:-infonce_lse latent_attention_pooling masked_mean_pool multi_lora decoder latent_attention_ops}
else
  bench_ops=${BENCH_OPS:-infonce_lse latent_attention_pooling masked_mean_pool multi_lora decoder}
fi
rm -f "$out/phases.jsonl"
current="" child="" finished=0 failed=0

elapsed() { echo $(($(date +%s) - start)); }

record() { # phase status rc seconds detail
  local detail=${5//\"/\'}
  printf '{"phase": "%s", "status": "%s", "rc": %s, "seconds": %s, "detail": "%s", "at_s": %s}\n' \
    "$1" "$2" "${3:-null}" "${4:-0}" "$detail" "$(elapsed)" >>"$out/phases.jsonl"
}

report() { # write OUT/gpu_check.json from what is in OUT (never fails the script)
  $py -m latentembed.bench.report "$out" --mode "$mode" "$@" >/dev/null ||
    echo "gpu_check: could not write gpu_check.json" >&2
}

stub() { # dry-run phase body: sleep, then fail if the phase is named in GPU_CHECK_FAIL
  sleep "${GPU_CHECK_STUB_SECONDS:-0}"
  [[ " ${GPU_CHECK_FAIL:-} " != *" $1 "* ]]
}

run_phase() { # name limit_s log function: run one phase under its time limit and the budget
  local name=$1 limit=$2 log=$3 body=$4
  local left=$((budget - $(elapsed) - reserve))
  if ((left < 10)); then
    echo "gpu_check: $name not run: the ${budget} s budget is spent"
    record "$name" skipped null 0 "budget spent at $(elapsed) s"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "gpu_check: $name (limit ${limit} s, $(elapsed) s of ${budget} s used)"
  current=$name
  local t0 rc
  t0=$(date +%s)
  # The body runs in its own bash (timeout signals its whole process group at the limit), in
  # the background: `wait` lets a TERM to this script run its trap at once.
  [ "$mode" = dry-run ] && body="stub $name"
  timeout --signal=TERM --kill-after=15 "$limit" bash -c "$body" >>"$log" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  child=""
  local secs=$(($(date +%s) - t0)) status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status=failed
  record "$name" "$status" "$rc" "$secs" "$(tail -n 1 "$log" 2>/dev/null | cut -c1-200)"
  current=""
  echo "gpu_check: $name $status (rc $rc) in ${secs} s"
  report
  return $rc
}

archive_cache() { # bring the Triton cache back when it is small enough (the tool takes <= 16 MiB a file)
  [ "$mode" = dry-run ] && return
  [ -d "$TRITON_CACHE_DIR" ] || return
  tar -C "$TRITON_CACHE_DIR" -czf "$out/triton-cache.tgz" . 2>/dev/null || return
  if (($(stat -c %s "$out/triton-cache.tgz") > 15 * 1024 * 1024)); then
    rm -f "$out/triton-cache.tgz"
    echo "gpu_check: Triton cache over 15 MiB, not archived (carry out/triton-cache instead)"
  fi
}

on_exit() {
  local rc=$?
  if [ -n "$child" ]; then # a phase still running: timeout passes the TERM on to its process group
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  if ((!finished)); then
    [ -n "$current" ] && record "$current" interrupted null 0 "the call ended during this phase"
    report
    echo "gpu_check: interrupted (rc $rc) at $(elapsed) s; partial results in $out"
  fi
}
on_signal() {
  trap - TERM INT
  exit 143
}
trap on_exit EXIT
trap on_signal TERM INT

has_phase() { [[ " $phases " == *" $1 "* ]]; }
python_has() { $py -c "import $1" >/dev/null 2>&1; }
# What the phase bodies (run by `bash -c`) need.
export py out mode bench_ops
export -f stub python_has

# Wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh): installed beside the machine's packages.
if [ "$mode" != dry-run ] && [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$out/install.log" 2>&1 &&
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if has_phase env; then
  env_cmd() {
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi
    nvcc --version
    $py -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|transformers|peft|sentence-transformers|pytest|pytest-xdist|pytest-timeout|hypothesis|inf-cl|cut-cross-entropy) '
    $py -m latentembed info
  }
  export -f env_cmd
  run_phase env 60 "$out/env.txt" env_cmd || failed=1
fi

if has_phase install; then
  install_cmd() {
    LATENTEMBED_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      $py -m pip install --no-build-isolation --no-deps -e . || return 1
    # On a GPU machine a missing extension would only skip the cuda tests: an error here.
    $py -c "import latentembed._extension as e; e.load_extension(); print('extension loaded')" || return 1
    $py -m latentembed info  # the backend each op now picks, with the extension
  }
  export -f install_cmd
  if ! run_phase install 240 "$out/install.log" install_cmd; then
    failed=1
    tail -20 "$out/install.log"
    echo "gpu_check: install failed: no tests or benchmarks"
    phases=""
  fi
fi

if has_phase tests; then
  if [ "$mode" = full ]; then
    selection="tests" autotune=all
  else
    selection="tests/ops tests/modules tests/models" autotune=first
  fi
  selection=${GPU_CHECK_TESTS:-$selection}
  # One seed for every xdist worker, printed in tests.log's header: a failure can be replayed.
  export LATENTEMBED_TEST_SEED=${LATENTEMBED_TEST_SEED:-$((RANDOM * 32768 + RANDOM))}
  export selection autotune
  tests_cmd() {
    local common=(-q -rfE -p no:cacheprovider --durations=15 -m "$1")
    python_has pytest_timeout && common+=(--timeout="${GPU_CHECK_TEST_TIMEOUT:-180}")
    # shellcheck disable=SC2086  # selection is a list of paths
    LATENTEMBED_AUTOTUNE=$autotune $py -m pytest $selection "${common[@]}" "${@:2}"
  }
  tests_all() {
    local rc=0 parallel=()
    python_has xdist && parallel=(-n "${GPU_CHECK_WORKERS:-6}")
    # The kernel and module tests in parallel, the `gpu`-marked ones (NV-Embed-size blocks,
    # the 4096 x 16384 InfoNCE case, sync checks) one at a time.
    tests_cmd "not slow and not gpu" "${parallel[@]}" --junitxml="$out/tests.xml" || rc=1
    tests_cmd "gpu and not slow" --junitxml="$out/tests-gpu.xml" || rc=1
    $py - "$out/tests.xml" "$out/tests-gpu.xml" <<'EOF' || rc=1
import sys, xml.etree.ElementTree as ET
main, extra = sys.argv[1:]
try:
    tree = ET.parse(main)
except (FileNotFoundError, ET.ParseError):
    tree = ET.ElementTree(ET.Element("testsuites"))
root = tree.getroot()
try:
    for suite in ET.parse(extra).getroot().iter("testsuite"):
        root.append(suite)
except (FileNotFoundError, ET.ParseError):
    pass
tree.write(main)
EOF
    rm -f "$out/tests-gpu.xml"
    return $rc
  }
  export -f tests_cmd tests_all
  limit=240
  [ "$mode" = full ] && limit=560
  run_phase tests "$limit" "$out/tests.log" tests_all || failed=1
  tail -15 "$out/tests.log"
fi

if has_phase bench; then
  bench_cmd() {
    local args=() op
    for op in $bench_ops; do args+=(--op "$op"); done
    [ "$mode" = full ] || args+=(--quick)
    LATENTEMBED_AUTOTUNE=${BENCH_AUTOTUNE:-$([ "$mode" = full ] && echo all || echo 2)} \
      $py -m latentembed bench "${args[@]}" --json "$out/bench.json"
  }
  export -f bench_cmd
  run_phase bench 600 "$out/bench.txt" bench_cmd || failed=1
  tail -40 "$out/bench.txt"
fi

archive_cache
report --final --phases "${GPU_CHECK_PHASES:-env install tests bench}"
finished=1
rm -f "$out/phases.jsonl"  # now inside gpu_check.json (the device tool brings back 8 files)
$py -c "import json, sys; r = json.load(open(sys.argv[1])); print('gpu_check:', r['status'], '|', r['targets_met'], 'met,', r['targets_missed'], 'MISSED of', len(r['targets']), 'targets')" "$out/gpu_check.json" 2>/dev/null
echo "gpu_check: done in $(elapsed) s (budget ${budget} s), results in $out"
exit $failed
