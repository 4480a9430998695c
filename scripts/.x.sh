#!/usr/bin/env bash
export OUT=${OUT:-/tmp/out}
PHASES="cuda bench profile" SKIP_HF=1 PROFILE_ROWS=40 bash scripts/gpu_check.sh 2>&1 | tail -60
