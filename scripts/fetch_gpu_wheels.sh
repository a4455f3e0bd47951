#!/usr/bin/env bash
# Run on a machine that reaches the package registry, before calling scripts/gpu_check.sh on the
# GPU machine (which has no network and lacks these packages): downloads the wheels into .whl/
# (git-ignored); name `.whl` in the device tool's `carry` and gpu_check.sh installs them.
# inf-cl and cut-cross-entropy are the contrastive-loss benchmark's baselines (pinned to the
# versions docs/gpu.md's baselines were measured with).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl hypothesis sortedcontainers inf-cl==1.2.1 cut-cross-entropy==25.1.1
ls .whl
