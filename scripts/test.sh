#!/usr/bin/env bash
# scripts/test.sh — set up, build, and run the whole test suite (the README's test command).
# GPU tests (label cuda) run only where a GPU is visible.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${MOETRAIN_BUILD_DIR:-$ROOT/build}
bash "$ROOT/scripts/setup.sh"
t0=$(date +%s)
exclude=()
if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
  exclude=(-LE cuda)
  echo "[test] no GPU: skipping tests labelled cuda"
fi
status=0
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)" "${exclude[@]}" "$@" || status=$?
echo "phase tests: $(( $(date +%s) - t0 )) s"
exit $status
