#!/usr/bin/env bash
# Run on a machine that reaches the package registry, before a `scripts/gpu_check.sh --full` call
# on the GPU machine (which has no network): downloads the InfoNCE benchmark's external baselines
# into .whl/ (git-ignored); name `.whl` in the device tool's `carry` and gpu_check.sh installs
# them into /tmp/site. The quick check needs none: the GPU machine's image already has pytest,
# pytest-xdist, pytest-timeout and hypothesis (see docs/gpu.md, "Running the GPU check").
# inf-cl and cut-cross-entropy are pinned to the versions docs/gpu.md's baselines were measured
# with. Python 3.12 on manylinux x86_64, the GPU machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl inf-cl==1.2.1 cut-cross-entropy==25.1.1
ls .whl
