#!/usr/bin/env bash
REAL_OUT=$OUT
export OUT=/tmp/o; mkdir -p $OUT
PHASES="cuda bench profile scaling" PROFILE_ROWS=45 bash scripts/gpu_check.sh 2>&1 | tail -90
cp $OUT/bench.json $OUT/bench.log $OUT/profile.log $OUT/moe-layer-scaling.log $OUT/ctest-cuda.log $OUT/step-experts-64.log $OUT/step-experts-256.log $REAL_OUT/ 2>/dev/null
