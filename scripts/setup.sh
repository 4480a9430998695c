#!/usr/bin/env bash
# scripts/setup.sh — idempotent, non-interactive setup, then configure and build.
#
#   Debian 12 (as root): Debian -dev packages, then a Python virtualenv with
#   torch==2.11.0 (+ transformers==5.17.0 for the parity tests) kept OUTSIDE the
#   clone in ${XDG_CACHE_HOME:-~/.cache}/moetrain/, so a clean clone reuses it.
#   GPU node (python3 already has a CUDA torch, no network): uses that torch and
#   installs nothing.
#
# Environment: MOETRAIN_BUILD_DIR (default build), MOETRAIN_WERROR (ON in CI),
#              MOETRAIN_CUDA (AUTO|ON|OFF), MOETRAIN_SKIP_BUILD=1 (setup only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${MOETRAIN_BUILD_DIR:-$ROOT/build}
TORCH_VERSION=2.11.0
TRANSFORMERS_VERSION=5.17.0
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/moetrain
VENV=$CACHE/venv-torch$TORCH_VERSION-tf$TRANSFORMERS_VERSION
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
t0=$(date +%s)

# --- Python with torch --------------------------------------------------------------
has_torch() {  # $1: python; true when it has torch==$TORCH_VERSION (any CUDA build)
  "$1" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null
}
has_cuda_torch() {
  "$1" -c "import torch,sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null
}

PY=""
if [ -x "$VENV/bin/python" ] && has_torch "$VENV/bin/python" \
   && "$VENV/bin/python" -c "import transformers, safetensors, matplotlib" 2>/dev/null; then
  PY=$VENV/bin/python
  log "reusing $VENV"
elif command -v python3 >/dev/null && has_torch python3 && has_cuda_torch python3 && command -v nvidia-smi >/dev/null; then
  PY=$(command -v python3)
  log "GPU node: using $PY's torch $($PY -c 'import torch;print(torch.__version__)'); installing nothing"
fi

# --- Debian packages -------------------------------------------------------------------
DEBS="build-essential cmake ninja-build ccache pkg-config git python3 python3-venv python3-pip
      libyaml-cpp-dev libfmt-dev nlohmann-json3-dev libsentencepiece-dev libgtest-dev libgmock-dev
      linux-doc-6.1 clang libclang-rt-14-dev zlib1g-dev libgloo-dev"
# The larger corpus (configs/data/debian-docs.yaml) on request.
[ "${MOETRAIN_EXTRA_CORPORA:-0}" = 1 ] && DEBS="$DEBS python3.11-doc perl-doc dict-gcide"
missing=""
if command -v dpkg-query >/dev/null; then
  for p in $DEBS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
fi
if [ -n "$missing" ] && [ -n "$PY" ] && command -v nvidia-smi >/dev/null; then
  log "GPU node: not installing Debian packages ($missing ); assuming the node provides the libraries"
elif [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed: is the Debian package mirror reachable?"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null || die "apt-get install failed for:$missing"
  elif [ -n "$PY" ]; then
    log "packages not registered with dpkg ($missing); assuming this node provides them"
  else
    die "missing Debian packages:$missing (run as root, or install them)"
  fi
fi

# --- the virtualenv (only where no usable torch was found) ---------------------------------
if [ -z "$PY" ]; then
  mkdir -p "$CACHE/wheels"
  log "checking the Python package registry: pip download torch==$TORCH_VERSION"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$VENV/bin/python" -m pip download -q --no-deps -d "$CACHE/wheels" "torch==$TORCH_VERSION"; then
    die "cannot download torch==$TORCH_VERSION: the Python package registry is unreachable (check network / pip config)"
  fi
  log "installing torch==$TORCH_VERSION, transformers==$TRANSFORMERS_VERSION into $VENV (first time only)"
  "$VENV/bin/python" -m pip install -q --find-links "$CACHE/wheels" \
    "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" safetensors numpy matplotlib \
    || die "pip install into $VENV failed"
  has_torch "$VENV/bin/python" || die "torch==$TORCH_VERSION did not import from $VENV"
  PY=$VENV/bin/python
fi
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
t1=$(date +%s)
echo "phase setup: $((t1 - t0)) s"

# --- configure and build -------------------------------------------------------------------
if [ "${MOETRAIN_SKIP_BUILD:-0}" != 1 ]; then
  GEN=""
  command -v ninja >/dev/null && GEN="-G Ninja"
  # shellcheck disable=SC2086
  cmake -S "$ROOT" -B "$BUILD_DIR" $GEN -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DMOETRAIN_PYTHON="$PY" \
    -DMOETRAIN_WERROR="${MOETRAIN_WERROR:-OFF}" -DMOETRAIN_CUDA="${MOETRAIN_CUDA:-AUTO}" >/dev/null \
    || die "cmake configure failed"
  cmake --build "$BUILD_DIR" -j "$(nproc)" || die "build failed"
  t2=$(date +%s)
  echo "phase build: $((t2 - t1)) s"
fi
echo "$PY" > "$BUILD_DIR/python_path.txt" 2>/dev/null || true
