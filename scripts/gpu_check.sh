#!/usr/bin/env bash
# scripts/gpu_check.sh — one call on a GPU machine: build (CUDA on, warnings as errors), then
# the phases asked for (default: tests bench profile):
#   tests    the test suite without the corpus-bound `slow` label (cuda + parity included)
#   cuda     only the tests labelled cuda (the GPU paths against their references)
#   bench    moetrain bench beside transformers (scripts/bench_vs_hf.py) -> bench.json
#   profile  a one-step Kineto profile of moetrain bench
#   scaling  expert scaling (issue 9): one MoE layer fwd+bwd at 64 and 256 experts interleaved in one
#            process (--scale-experts: 10 rounds, the ratio of medians), each E's 5-pass kernel
#            profile, and the whole step at 64 vs 256 routed experts, same top-k (the 256-expert step needs ~75 GB: an H200)
#   dist     data parallel over all visible GPUs (NCCL, 8 sequences per GPU) against one GPU: the
#            replicated optimizer with the overlapped and the after-backward gradient all-reduce,
#            ZeRO-1, expert parallel (ep_size = GPUs); CKPT=1 adds activation checkpointing on one GPU
#   curve    bf16 CUDA vs fp32 CPU loss curves of configs/tiny.yaml, 200 steps
#            (needs data_cache/linux-docs-sp4096 carried over)
#   ab       the step under each case of AB_CASES, interleaved twice; a case is one or more
#            comma-separated env assignments or config overrides `set:KEY=VALUE` (default:
#            "MOETRAIN_WGRAD_STREAM=1 MOETRAIN_WGRAD_STREAM=experts MOETRAIN_WGRAD_STREAM=0"); e.g.
#            AB_CASES="MOETRAIN_GROUPED_WGRAD=1 MOETRAIN_GROUPED_WGRAD=0" (our weight-gradient kernel
#            vs ATen's) or AB_CASES="set:train.logits_dtype=bf16 set:train.logits_dtype=fp32"
#   ncu      Nsight Compute (works on the Firecracker machines, clocks left alone) on one MoE layer
#            pass at 64 and 256 experts: the grouped-GEMM kernels' speed-of-light, memory, warp-state,
#            compute and scheduler sections (ncu-E.txt, our weight gradient on the experts' stream),
#            and the full set with stall samples per SASS instruction for the w13 forward GEMM at 64
#            experts (ncu-source.csv, its top stalls by scripts/ncu_stalls.py; NCU_SKIP picks another of the
#            pass's four launches, 4 + i)
#   probes   kernel probes without the build: scripts/probe_fine_tiles.py (ATen's grouped GEMM),
#            scripts/probe_wgmma_wgrad.cu, probe_wgmma_swapab.cu, probe_wgmma_pingpong.cu and
#            probe_wgmma_wgrad_pingpong.cu (nvcc, sm_90a) on its shapes
# TRACE=1: the profile phase also saves a gzipped Chrome trace (trace.json.gz). PROFILE_ROWS: how
# many kernels its table lists (25).
# SETS="--set train.param_dtype=bf16 ...": extra config overrides for every bench, profile,
# scaling and dist run. GRAPH=1 (default): the one-process bench, profile and scaling runs
# capture the step as a CUDA graph (train.cuda_graph; GRAPH=0: eager). CURVE_SETS: extra
# overrides of the CUDA curve run. SKIP_HF=1: the bench phase runs moetrain only. DIST_VARIANTS: the
# distributed.* settings the dist phase launches (default: the four below).
# Logs and JSON go to ${OUT:-.}/. PACK=1: they go to a scratch folder instead and leave as one
# $OUT/gpu_check.tgz beside bench.json and curve.md (for callers that take back only a few files).
# Usage: [PHASES="tests bench"] bash scripts/gpu_check.sh [BENCH_CONFIG]   (default configs/bench-1b.yaml)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT}
FINAL_OUT=$OUT
[ "${PACK:-0}" = 1 ] && OUT=$(mktemp -d)
BUILD=${MOETRAIN_BUILD_DIR:-$ROOT/build-gpu}
CONFIG=${1:-$ROOT/configs/bench-1b.yaml}
PHASES=${PHASES:-tests bench profile}
MT=$BUILD/app/moetrain
export NCCL_NVLS_ENABLE=0
read -ra SETS_ARR <<<"${SETS:-}"
ONE=()  # one-process runs only
[ "${GRAPH:-1}" = 1 ] && ONE=(--set train.cuda_graph=true)
has() { [[ " $PHASES " == *" $1 "* ]]; }
stamp() { echo "== $1 $(( $(date +%s) - t0 )) s"; }
nvidia-smi -L
t0=$(date +%s)
if [ "$PHASES" = probes ]; then :  # nothing of the build is needed
elif [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils;print(torch.utils.cmake_prefix_path)')" \
    -DMOETRAIN_PYTHON="$(command -v python3)" -DMOETRAIN_CUDA=ON -DMOETRAIN_WERROR=ON >"$OUT/configure.log" 2>&1 \
    || { tail -30 "$OUT/configure.log"; exit 1; }
fi
if [ "$PHASES" != probes ]; then
  ninja -C "$BUILD" -k 0 >"$OUT/build.log" 2>&1 || { grep -E "error|FAILED" "$OUT/build.log" | head -30; exit 1; }
  stamp build
fi
if has tests; then
  ctest --test-dir "$BUILD" -j "$(nproc)" -LE slow --output-on-failure >"$OUT/ctest.log" 2>&1
  grep -E "tests passed|\*\*\*Failed|Failed  |Not Run" "$OUT/ctest.log" | head -20
  stamp tests
fi
if has cuda; then
  ctest --test-dir "$BUILD" -L cuda --output-on-failure >"$OUT/ctest-cuda.log" 2>&1
  grep -E "tests passed|\*\*\*Failed|Failed  |Not Run" "$OUT/ctest-cuda.log" | head -20
  stamp cuda-tests
fi
if has curve; then  # CPU fp32 in the background while the GPU works
  curve() {  # NAME DEVICE DTYPE [--set KEY=VALUE ...]
    "$MT" train "$ROOT/configs/tiny.yaml" --set train.steps=200 --set logging.every=1 --set train.eval_every=1000 \
      --set train.device="$2" --set train.dtype="$3" --set logging.dir="$OUT/curve-$1" \
      --set checkpoint.dir="/tmp/curve-$1-ckpt" --set checkpoint.every=1000 "${@:4}" >"$OUT/curve-$1.log" 2>&1
  }
  curve cpu-fp32 cpu fp32 &
  curve_pid=$!
  read -ra CURVE_SETS_ARR <<<"${CURVE_SETS:-}"
  curve cuda-bf16 cuda bf16 "${CURVE_SETS_ARR[@]}" || tail -5 "$OUT/curve-cuda-bf16.log"
fi
if has bench; then
  python3 "$ROOT/scripts/bench_vs_hf.py" "$CONFIG" --moetrain "$MT" --steps 12 --warmup 3 "${SETS_ARR[@]}" "${ONE[@]}" \
    ${SKIP_HF:+--skip-hf} --out "$OUT/bench.json" >"$OUT/bench.log" 2>&1 || tail -20 "$OUT/bench.log"
  stamp bench
fi
if has profile; then
  trace=()
  [ -n "${TRACE:-}" ] && trace=(--trace /tmp/moetrain-trace.json)
  "$MT" bench "$CONFIG" --steps 2 --warmup 2 --profile 1 --profile-rows "${PROFILE_ROWS:-25}" "${trace[@]}" "${SETS_ARR[@]}" "${ONE[@]}" >"$OUT/profile.log" 2>&1 || tail -20 "$OUT/profile.log"
  [ -n "${TRACE:-}" ] && gzip -c /tmp/moetrain-trace.json >"$OUT/trace.json.gz"
  stamp profile
fi
if has scaling; then
  "$MT" bench "$CONFIG" --moe-layer --steps 400 --warmup 10 --scale-experts 256 --set model.n_routed_experts=64 \
    "${SETS_ARR[@]}" >"$OUT/moe-layer-scaling.log" 2>&1 || tail -5 "$OUT/moe-layer-scaling.log"
  for e in 64 256; do
    "$MT" bench "$CONFIG" --moe-layer --steps 50 --warmup 5 --profile 5 --set model.n_routed_experts=$e "${SETS_ARR[@]}" \
      >"$OUT/moe-layer-$e.log" 2>&1 || tail -5 "$OUT/moe-layer-$e.log"
    "$MT" bench "$CONFIG" --steps 8 --warmup 3 --set model.n_routed_experts=$e "${SETS_ARR[@]}" "${ONE[@]}" \
      >"$OUT/step-experts-$e.log" 2>&1 || tail -5 "$OUT/step-experts-$e.log"
  done
  stamp scaling
fi
if has dist; then
  n=$(nvidia-smi -L | wc -l)
  {
    "$MT" bench "$CONFIG" --steps 8 --warmup 3 "${SETS_ARR[@]}" 2>&1 | grep -E "median step|^\{"  # eager, as the ranks
    # replicated (overlapped all-reduce, then the reference after the backward), ZeRO-1, EP
    for v in ${DIST_VARIANTS:-zero_stage=0 overlap_grad_reduce=false zero_stage=1 ep_size=$n}; do
      extra=()  # ZeRO-1 shards full fp32 masters (split masters are the replicated optimizer's)
      [[ $v == zero_stage=1 ]] && extra=(--set optim.master_storage=fp32)
      "$MT" launch --nproc "$n" -- bench "$CONFIG" --steps 8 --warmup 3 --set train.global_batch=$((8 * n)) \
        --set distributed.backend=nccl --set distributed.$v "${extra[@]}" "${SETS_ARR[@]}" 2>&1 | grep -E "median step|^\{|rror"
    done
    [ -n "${CKPT:-}" ] && "$MT" bench "$CONFIG" --steps 8 --warmup 3 --set train.activation_checkpointing=full 2>&1 | grep -E "median step|^\{"
  } >"$OUT/dist.log" 2>&1
  stamp dist
fi
if has ab; then
  read -ra AB_CASES_ARR <<<"${AB_CASES:-MOETRAIN_WGRAD_STREAM=1 MOETRAIN_WGRAD_STREAM=experts MOETRAIN_WGRAD_STREAM=0}"
  for round in 1 2; do
    for case in "${AB_CASES_ARR[@]}"; do
      IFS=, read -ra items <<<"$case"
      kv=(X_AB_CASE=1) sets=()
      for item in "${items[@]}"; do
        if [[ $item == set:* ]]; then sets+=(--set "${item#set:}"); else kv+=("$item"); fi
      done
      env "${kv[@]}" "$MT" bench "$CONFIG" --steps 12 --warmup 3 "${SETS_ARR[@]}" "${ONE[@]}" "${sets[@]}" 2>&1 \
        | grep "median step" | sed "s/^/$case /"
    done
  done >"$OUT/ab.log"
  stamp ab
fi
if has ncu; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  layer_pass=("$MT" bench "$CONFIG" --moe-layer --steps 2 --warmup 1 "${SETS_ARR[@]}" --set model.n_routed_experts)
  for e in 64 256; do  # one pass's six grouped launches after the first (warm-up) pass
    MOETRAIN_WGRAD_STREAM=0 "$NCU" --clock-control none -k regex:"grouped_(gemm|wgrad)_kernel" --launch-skip 6 \
      --launch-count 6 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section ComputeWorkloadAnalysis --section SchedulerStats "${layer_pass[@]}"="$e" >"$OUT/ncu-$e.txt" 2>&1 \
      || tail -5 "$OUT/ncu-$e.txt"
  done
  "$NCU" --clock-control none -k regex:grouped_gemm_kernel --launch-skip "${NCU_SKIP:-4}" --launch-count 1 --set full \
    --import-source yes -f -o /tmp/ncu-source "${layer_pass[@]}"=64 >"$OUT/ncu-source.log" 2>&1 \
    && "$NCU" -i /tmp/ncu-source.ncu-rep --page source --print-source sass --csv >"$OUT/ncu-source.csv" 2>>"$OUT/ncu-source.log" \
    || tail -5 "$OUT/ncu-source.log"
  stamp ncu
fi
if has probes; then
  {
    # the four probes compile side by side while probe_fine_tiles.py times ATen and writes the counts
    nv=(nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I"$ROOT")
    host="$ROOT/models/kernels/sm90_host.cu"
    "${nv[@]}" -o /tmp/probe_wgrad "$ROOT/scripts/probe_wgmma_wgrad.cu" "$host" &
    "${nv[@]}" -o /tmp/probe_swapab "$ROOT/scripts/probe_wgmma_swapab.cu" "$ROOT/models/kernels/grouped_gemm_kernels.cu" "$host" &
    "${nv[@]}" -o /tmp/probe_pingpong "$ROOT/scripts/probe_wgmma_pingpong.cu" "$host" &
    "${nv[@]}" -o /tmp/probe_wgrad_pp "$ROOT/scripts/probe_wgmma_wgrad_pingpong.cu" "$host" &
    python3 "$ROOT/scripts/probe_fine_tiles.py" --counts-dir /tmp
    wait
    /tmp/probe_wgrad /tmp
    /tmp/probe_swapab /tmp
    timeout 120 /tmp/probe_pingpong /tmp  # a cluster bug would hang
    timeout 120 /tmp/probe_wgrad_pp /tmp
  } >"$OUT/probes.log" 2>&1
  stamp probes
fi
if has curve; then
  wait "$curve_pid" || tail -5 "$OUT/curve-cpu-fp32.log"
  python3 "$ROOT/scripts/compare_loss_curves.py" "$OUT/curve-cpu-fp32/metrics.jsonl" \
    "$OUT/curve-cuda-bf16/metrics.jsonl" >"$OUT/curve.md" 2>&1
  stamp curve
fi
echo "== summary"
has profile && grep -A$(( ${PROFILE_ROWS:-25} + 3 )) "^profile of" "$OUT/profile.log" | cut -c1-150
has scaling && for e in 64 256; do grep -A16 "^profile of" "$OUT/moe-layer-$e.log" | cut -c1-130; done
has scaling && grep -h -E "MoE layer|median step" "$OUT"/moe-layer-[0-9]*.log "$OUT"/moe-layer-scaling.log "$OUT"/step-experts-*.log
has curve && cat "$OUT/curve.md"
has dist && grep -E "median step|rror" "$OUT/dist.log"
has ab && cut -c1-120 "$OUT/ab.log"
has probes && cat "$OUT/probes.log"
has ncu && for e in 64 256; do
  echo "-- ncu, $e experts"
  grep -E "^  [a-z].*grouped_|Duration|L2 Cache Throughput|DRAM Throughput|Compute \(SM\) Throughput" "$OUT/ncu-$e.txt" | cut -c1-100
done
has ncu && [ -s "$OUT/ncu-source.csv" ] && python3 "$ROOT/scripts/ncu_stalls.py" "$OUT/ncu-source.csv" --top 25
has bench && tail -6 "$OUT/bench.log"
if [ "$OUT" != "$FINAL_OUT" ]; then
  for f in bench.json curve.md; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$FINAL_OUT/"; done
  tar czf "$FINAL_OUT/gpu_check.tgz" -C "$OUT" .
fi
exit 0
