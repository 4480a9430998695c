// Probe (bench/NOTES.md "Next"): a grouped GEMM of our own on Hopper — TMA loads into 128-byte
// swizzled shared memory, WGMMA from shared memory, a producer warp group and two consumer warp
// groups over a ring of stages with mbarriers, persistent CTAs walking a tile list that tiles
// each group's rows by BM (64 or 128). The routed experts' forward: out[rows of g] =
// x[rows of g] · w[g]ᵀ, x: [M, K] bf16 rows grouped by expert, w: [E, N, K] bf16 (both K-major:
// WGMMA's plain layout), out: [M, N] bf16, fp32 accumulation.
//
// Status: run on an H200 (bench/NOTES.md 44): correct; 128 × 256 tiles within ±9 % of ATen's
// grouped GEMM. It checks itself against a plain CUDA-core kernel and prints its time beside the
// FLOP rate; compare with `python3 scripts/probe_fine_tiles.py` (ATen's _grouped_mm on the same
// shapes) in the same call.
//
// Build and run on a GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90a -I. -o /tmp/wgmma scripts/probe_wgmma_grouped.cu -lcuda && /tmp/wgmma
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "models/kernels/sm90_wgmma.cuh"
#include "scripts/probe_common.cuh"

namespace {

using namespace moetrain::kernels::sm90;
using probe::compare_kernel;
using probe::fill_normal;

constexpr int BK = 64;  // 64 bf16 = 128 bytes: one swizzle row
// Tiles: BM = 64 rows per consumer warp group (1 or 2 of them) beside one producer warp group;
// BN = 128 or 256 columns (64 or 128 fp32 accumulators a consumer thread).

// Shared-memory descriptor: K-major operand, 128-byte swizzle, 8-row core groups of 1024 bytes.
__device__ __forceinline__ uint64_t smem_desc(const void* p) { return smem_desc_sw128(p, 16, 1024); }

template <int BN>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[BN / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BN == 128) wgmma_m64n128k16<0, 0>(d, da, db, scale_d);
  else wgmma_m64n256k16<0, 0>(d, da, db, scale_d);
}

struct Tile {
  int group, row0, row_end, col0;
};

// tile_starts[g]: index of group g's first tile; tiles of a group: m-tiles × (N / BN), n fastest.
__device__ __forceinline__ Tile tile_at(int t, const int* tile_starts, const int* offs, int groups, int n_tiles, int bm,
                                       int bn) {
  int lo = 0, hi = groups - 1;  // the last g with tile_starts[g] <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_starts[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int local = t - tile_starts[lo];
  const int start = lo == 0 ? 0 : offs[lo - 1];
  return Tile{lo, start + (local / n_tiles) * bm, offs[lo], (local % n_tiles) * bn};
}

template <int BM, int BN, int STAGES>
__global__ void __launch_bounds__(128 * (1 + BM / 64), 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap map_x, const __grid_constant__ CUtensorMap map_w,
                        const int* __restrict__ offs, const int* __restrict__ tile_starts, int groups, int total_tiles,
                        int N, int K, __nv_bfloat16* __restrict__ out) {
  constexpr int kConsumers = BM / 64;  // consumer warp groups, 64 rows each (WGMMA's m64)
  static_assert(BM % 64 == 0 && kConsumers >= 1 && kConsumers <= 2, "BM: 64 or 128");
  static_assert(BN == 128 || BN == 256, "BN: 128 or 256");
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // 1024-byte alignment for the 128-byte swizzle atoms (8 rows of 128 bytes)
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem);                         // [STAGES][BM][BK]
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(smem + STAGES * BM * BK * 2);  // [STAGES][BN][BK]
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * (BM + BN) * BK * 2);   // [STAGES]
  uint64_t* empty = full + STAGES;                                                    // [STAGES]

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int n_tiles = N / BN, k_iters = K / BK;
  if (wg == 0) {  // producer: one thread issues every load
    if (tid_in_wg == 0) {
      int it = 0;
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const Tile tile = tile_at(t, tile_starts, offs, groups, n_tiles, BM, BN);
        const int w_row = tile.group * N + tile.col0;
        for (int k = 0; k < k_iters; ++k, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);  // a fresh barrier passes parity 1 at once
          mbar_expect_tx(&full[s], (BM + BN) * BK * 2);    // out-of-bounds rows are zero-filled and counted
          tma_load_2d(sA + s * BM * BK, &map_x, &full[s], k * BK, tile.row0);
          tma_load_2d(sB + s * BN * BK, &map_w, &full[s], k * BK, w_row);
        }
      }
    }
    return;
  }

  // consumers: warp group c owns rows [64c, 64c + 64) of each tile. One WGMMA group stays in
  // flight: a stage is released once the group after it has been issued and it has completed.
  const int c = wg - 1, warp = tid_in_wg / 32, lane = tid_in_wg % 32;
  float acc[BN / 2];
  int it = 0;
  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const Tile tile = tile_at(t, tile_starts, offs, groups, n_tiles, BM, BN);
    int prev = -1;
    for (int k = 0; k < k_iters; ++k, ++it) {
      const int s = it % STAGES;
      mbar_wait(&full[s], (it / STAGES) & 1);
      const __nv_bfloat16* a = sA + s * BM * BK + c * 64 * BK;
      const __nv_bfloat16* b = sB + s * BN * BK;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)  // 16 bf16 = 32 bytes along the swizzled row
        wgmma_m64k16<BN>(acc, smem_desc(a + kk * 16), smem_desc(b + kk * 16), (k > 0 || kk > 0) ? 1 : 0);
      wgmma_commit_release_previous(empty, prev, s, tid_in_wg == 0);
    }
    wgmma_drain_release(empty, prev, tid_in_wg == 0);
    // epilogue: fragment i of m64nN: row 16·warp + lane/4 + 8·((i/2)%2), col 8·(i/4) + 2·(lane%4) + i%2
    const int row_base = tile.row0 + c * 64 + warp * 16 + lane / 4;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int col = tile.col0 + 8 * j + 2 * (lane % 4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row_base + 8 * h;
        if (row < tile.row_end) {
          *reinterpret_cast<__nv_bfloat162*>(out + static_cast<int64_t>(row) * N + col) =
              __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
        }
      }
    }
  }
}

// The twin: one thread an output, fp32 accumulation.
__global__ void grouped_gemm_reference(const __nv_bfloat16* x, const __nv_bfloat16* w, const int* offs, int groups, int M,
                                       int N, int K, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(M) * N) return;
  const int row = static_cast<int>(i / N), col = static_cast<int>(i % N);
  int g = 0;
  while (g < groups && offs[g] <= row) ++g;
  float s = 0.f;
  for (int k = 0; k < K; ++k)
    s += __bfloat162float(x[static_cast<int64_t>(row) * K + k]) * __bfloat162float(w[(static_cast<int64_t>(g) * N + col) * K + k]);
  out[i] = s;
}

CUtensorMap make_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};
  const cuuint32_t box[2] = {BK, box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims,
                                            strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", static_cast<int>(r));
    std::exit(1);
  }
  return map;
}

// One problem: grouped inputs, offsets and the reference output, shared by every tile config.
struct Problem {
  int E, N, K, M;
  bool skew;
  std::vector<int> counts, offs;
  __nv_bfloat16 *x = nullptr, *w = nullptr, *out = nullptr;
  float* ref = nullptr;
  int* d_offs = nullptr;
};

Problem make_problem(int E, int N, int K, bool skew) {
  Problem p{E, N, K, 16384 * 6, skew, std::vector<int>(E), std::vector<int>(E)};
  std::mt19937 rng(E * 7 + N + K + skew);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<double> share(E);
  for (auto& v : share)  // balanced: a fresh router's spread; skewed: a few experts take most rows
    v = skew ? std::pow(uni(rng), 8.0) + 1e-3 : std::max(1e-3, 1 + normal(rng) * 2.0 / std::sqrt(double(p.M) / E));
  double total = 0;
  for (double v : share) total += v;
  int sum = 0;
  for (int g = 0; g < E; ++g) sum += p.counts[g] = static_cast<int>(share[g] / total * p.M);
  p.counts[0] += p.M - sum;
  for (int g = 0, run = 0; g < E; ++g) p.offs[g] = run += p.counts[g];

  const int64_t nx = static_cast<int64_t>(p.M) * K, nw = static_cast<int64_t>(E) * N * K;
  CHECK(cudaMalloc(&p.x, nx * 2));
  CHECK(cudaMalloc(&p.w, nw * 2));
  CHECK(cudaMalloc(&p.out, static_cast<size_t>(p.M) * N * 2));
  CHECK(cudaMalloc(&p.ref, static_cast<size_t>(p.M) * N * 4));
  CHECK(cudaMalloc(&p.d_offs, E * 4));
  fill_normal<<<4096, 256>>>(p.x, nx, 1000 + E + K + skew, 1.f);
  fill_normal<<<4096, 256>>>(p.w, nw, 2000 + E + K + skew, 0.05f);
  CHECK(cudaMemcpy(p.d_offs, p.offs.data(), E * 4, cudaMemcpyHostToDevice));
  grouped_gemm_reference<<<static_cast<unsigned>((static_cast<int64_t>(p.M) * N + 255) / 256), 256>>>(
      p.x, p.w, p.d_offs, E, p.M, N, K, p.ref);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  return p;
}

void free_problem(Problem& p) {
  for (void* q : {static_cast<void*>(p.x), static_cast<void*>(p.w), static_cast<void*>(p.out),
                  static_cast<void*>(p.ref), static_cast<void*>(p.d_offs)})
    CHECK(cudaFree(q));
}

template <int BM, int BN, int STAGES>
void run_config(Problem& p, int sms) {
  std::vector<int> tile_starts(p.E);
  int tiles = 0;
  for (int g = 0; g < p.E; ++g) {
    tile_starts[g] = tiles;
    tiles += (p.counts[g] + BM - 1) / BM * (p.N / BN);
  }
  int* d_starts;
  double* d_sums;
  CHECK(cudaMalloc(&d_starts, p.E * 4));
  CHECK(cudaMalloc(&d_sums, 3 * sizeof(double)));
  CHECK(cudaMemcpy(d_starts, tile_starts.data(), p.E * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_sums, 0, 3 * sizeof(double)));
  CHECK(cudaMemset(p.out, 0xFF, static_cast<size_t>(p.M) * p.N * 2));  // poison: NaN in bf16

  const CUtensorMap map_x = make_map(p.x, p.M, p.K, BM), map_w = make_map(p.w, static_cast<uint64_t>(p.E) * p.N, p.K, BN);
  const size_t smem = STAGES * (BM + BN) * BK * 2 + 2 * STAGES * 8 + 1024;
  auto kernel = grouped_gemm_kernel<BM, BN, STAGES>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  auto launch = [&] {
    kernel<<<std::min(sms, tiles), 128 * (1 + BM / 64), smem>>>(map_x, map_w, p.d_offs, d_starts, p.E, tiles, p.N, p.K,
                                                                 p.out);
  };
  launch();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  compare_kernel<<<1024, 256>>>(p.out, p.ref, static_cast<int64_t>(p.M) * p.N, d_sums);
  double sums[3];
  CHECK(cudaMemcpy(sums, d_sums, sizeof(sums), cudaMemcpyDeviceToHost));

  const double med = probe::median_ms(launch), tflops = 2.0 * p.M * p.N * p.K / (med * 1e-3) / 1e12;
  std::printf("%4d %5s %5d %5d %4d %4d %2d %9.3f %8.1f %9.2e %8.0f\n", p.E, p.skew ? "skew" : "bal", p.N, p.K, BM, BN,
              STAGES, med, tflops, std::sqrt(sums[0] / sums[1]), sums[2]);
  CHECK(cudaFree(d_starts));
  CHECK(cudaFree(d_sums));
}

}  // namespace

int main() {
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::printf("%4s %5s %5s %5s %4s %4s %2s %9s %8s %9s %8s\n", "E", "rows", "N", "K", "BM", "BN", "S", "ms", "TFLOP/s",
              "rel err", "non-fin");
  for (int E : {64, 256})
    for (bool skew : {false, true})
      for (int K : {1024, 512}) {  // w13 forward [M, D=1024] -> [M, 2I=1024]; w2 forward [M, I=512] -> [M, D=1024]
        Problem p = make_problem(E, 1024, K, skew);
        run_config<128, 128, 5>(p, sms);
        run_config<128, 256, 4>(p, sms);
        run_config<64, 128, 6>(p, sms);
        run_config<64, 256, 4>(p, sms);
        free_problem(p);
      }
  return 0;
}
