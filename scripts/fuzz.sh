#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS] — builds the libFuzzer harness over the torch-free
# safetensors header parser with clang (ASan + UBSan) and runs it for a fixed
# time on a copy of the committed seed corpus. Exit non-zero on any crash,
# sanitizer report or leak. CTest runs it (label fuzz) where clang++ exists.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECONDS_BUDGET=${1:-60}
OUT=${MOETRAIN_FUZZ_DIR:-${TMPDIR:-/tmp}/moetrain-fuzz-$$}
mkdir -p "$OUT/corpus"
cp "$ROOT"/tests/fuzz/corpus_safetensors/* "$OUT/corpus/"
CXX=${FUZZ_CXX:-clang++}
"$CXX" -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$ROOT" "$ROOT/tests/fuzz/fuzz_safetensors_header.cpp" "$ROOT/io/safetensors_header.cpp" \
  -o "$OUT/fuzz_safetensors_header"
cd "$OUT"
./fuzz_safetensors_header -max_total_time="$SECONDS_BUDGET" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict="$ROOT/tests/fuzz/safetensors.dict" -print_final_stats=1 corpus 2>&1 | tail -15
status=${PIPESTATUS[0]}
cd / && rm -rf "$OUT"
exit "$status"
