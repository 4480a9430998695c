#!/usr/bin/env bash
export OUT=${OUT:-/tmp/out}
PHASES="cuda profile scaling" TRACE=1 PROFILE_ROWS=70 bash scripts/gpu_check.sh 2>&1 | tail -150
