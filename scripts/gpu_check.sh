#!/usr/bin/env bash
# scripts/gpu_check.sh — one call on a GPU machine: build (CUDA on, warnings as errors), run
# the test suite without the corpus-bound `slow` label (cuda + parity included), then the
# benchmark beside transformers and a one-step profile. Logs and JSON go to ${OUT:-.}/.
# Usage: bash scripts/gpu_check.sh [BENCH_CONFIG]   (default configs/bench-1b.yaml)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT}
BUILD=${MOETRAIN_BUILD_DIR:-$ROOT/build-gpu}
CONFIG=${1:-$ROOT/configs/bench-1b.yaml}
export NCCL_NVLS_ENABLE=0
nvidia-smi -L
t0=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils;print(torch.utils.cmake_prefix_path)')" \
    -DMOETRAIN_PYTHON="$(command -v python3)" -DMOETRAIN_CUDA=ON -DMOETRAIN_WERROR=ON >"$OUT/configure.log" 2>&1 \
    || { tail -30 "$OUT/configure.log"; exit 1; }
fi
ninja -C "$BUILD" -k 0 >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
t1=$(date +%s)
ctest --test-dir "$BUILD" -j "$(nproc)" -LE slow --output-on-failure >"$OUT/ctest.log" 2>&1
grep -E "tests passed|\*\*\*Failed|Failed  " "$OUT/ctest.log" | head -20
t2=$(date +%s)
python3 "$ROOT/scripts/bench_vs_hf.py" "$CONFIG" --moetrain "$BUILD/app/moetrain" --steps 12 --warmup 3 \
  --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"
"$BUILD/app/moetrain" bench "$CONFIG" --steps 2 --warmup 2 --profile 1 >"$OUT/profile.log" 2>&1 || tail -20 "$OUT/profile.log"
t3=$(date +%s)
echo "== build $((t1 - t0)) s, tests $((t2 - t1)) s, bench $((t3 - t2)) s"
grep -A12 "^profile of" "$OUT/profile.log" | cut -c1-150
tail -6 "$OUT/bench.log"
