#!/usr/bin/env bash
# scripts/train.sh — set up, build, and run the main job: train the default config
# (configs/tiny.yaml) on the default corpus. Extra arguments go to `moetrain train`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${MOETRAIN_BUILD_DIR:-$ROOT/build}
CONFIG=${MOETRAIN_CONFIG:-$ROOT/configs/tiny.yaml}
bash "$ROOT/scripts/setup.sh"
MOETRAIN=$BUILD_DIR/app/moetrain
if "$MOETRAIN" train --help >/dev/null 2>&1; then
  "$MOETRAIN" data prepare "$CONFIG"
  exec "$MOETRAIN" train "$CONFIG" "$@"
fi
echo "[train] 'moetrain train' is not implemented yet; the default config's counts:"
exec "$MOETRAIN" params "$CONFIG" --memory
