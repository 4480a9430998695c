// Probe (bench/NOTES.md 61): the routed experts' forward and input-gradient GEMMs with the operands
// swapped, for the 1.1× expert-scaling target. ATen's grouped GEMM tiles each expert's token rows
// by 128 (entry 39): at 256 experts (≈ 384 ± 41 rows each) 16 % of its tile work lies past the
// groups' ends. Here the weights are WGMMA's M side (128 output features a tile, 64 per consumer
// warp group) and the tokens its N side, which WGMMA takes in steps of 16: an expert's tokens go
// in tiles of 256 and one last tile of round_up(rest, 16), so the waste is < 16 rows an expert.
//
//   forward:        out[t, f] = Σ_k x[t, k] · w[g][f][k]    (w: [E, N, K], K-major A)
//   input gradient: out[t, f] = Σ_k x[t, k] · w[g][k][f]    (w: [E, K, N], MN-major A)
//
// computed as outᵀ[f, t] = A[f, k] · x[t, k]ᵀ: both operands by TMA into 128-byte-swizzled
// stages, one producer warp group, two consumers, persistent CTAs over a host-built tile list.
// The fp32 tile leaves through shared memory transposed by stmatrix.trans (a padded [256 tokens ×
// 128 features] buffer), then 16-byte stores of the tile's token rows.
//
// Reads the counts scripts/probe_fine_tiles.py wrote (COUNTS_DIR/counts-E-{bal,skew}.txt, where
// it times ATen's grouped GEMM on the same counts); checks against a CUDA-core fp32 twin on
// NaN-poisoned output. Build and run on a GPU machine:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. -o /tmp/swapab scripts/probe_wgmma_swapab.cu -lcuda
//   /tmp/swapab /tmp
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "models/kernels/sm90_wgmma.cuh"
#include "models/kernels/sm90_wgmma_n.cuh"
#include "scripts/probe_common.cuh"

namespace {

using namespace moetrain::kernels::sm90;
using probe::compare_kernel;
using probe::fill_normal;

constexpr int kRows = 16384 * 6;
constexpr int BM = 128, BN = 256, BK = 64, STAGES = 3;
constexpr int kOutStride = BM + 8;  // bf16 per token row of the output buffer: 272 bytes, so
                                    // stmatrix's 8 rows and the copy's 8 chunks hit distinct banks
constexpr int kStageBytes = (BM + BN) * BK * 2;
constexpr size_t kSmem = size_t{STAGES} * kStageBytes + size_t{BN} * kOutStride * 2 + 2 * STAGES * 8 + 1024;

struct Tile {
  int group, row0, rows, f0;
};

__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One tile's K loop with an NI-token MMA, then its output through shared memory to out.
template <int NI, int kTransA>
__device__ __forceinline__ void consume_tile(float (&acc)[128], const Tile& tile, int& it, int k_iters,
                                             const __nv_bfloat16* sA, const __nv_bfloat16* sB, uint64_t* full,
                                             uint64_t* empty, __nv_bfloat16* sOut, __nv_bfloat16* out, int n_out,
                                             int c, int tid_in_wg) {
  int prev = -1;
  for (int k = 0; k < k_iters; ++k, ++it) {
    const int s = it % STAGES;
    mbar_wait(&full[s], (it / STAGES) & 1);
    const __nv_bfloat16* a = sA + s * BM * BK + c * 64 * BK;  // K-major: rows 64c…; MN-major: box c
    const __nv_bfloat16* b = sB + s * BN * BK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const uint64_t da = kTransA ? smem_desc_sw128(a + kk * 16 * 64, 64 * BK * 2, 1024) : smem_desc_sw128(a + kk * 16, 16, 1024);
      wgmma_m64k16<NI, kTransA, 0>(acc, da, smem_desc_sw128(b + kk * 16, 16, 1024), (k > 0 || kk > 0) ? 1 : 0);
    }
    wgmma_commit_release_previous(empty, prev, s, tid_in_wg == 0);
  }
  wgmma_drain_release(empty, prev, tid_in_wg == 0);

  // acc[4j + 2h + e] holds feature 64c + 16·warp + lane/4 + 8h, token 8j + 2·(lane%4) + e: four
  // 8 × 8 blocks (j, h), (j, h + 1), (j + 1, h), (j + 1, h + 1) per stmatrix, stored transposed
  // so that shared row t holds token t's features.
  const int warp = tid_in_wg / 32, lane = tid_in_wg % 32, m = lane / 8;
  named_barrier(1 + c, 128);  // the previous tile's copy has read the buffer
  const uint32_t base = smem_u32(sOut) + ((lane % 8) * kOutStride + 64 * c + 16 * warp + 8 * (m % 2)) * 2;
#pragma unroll
  for (int j = 0; j < NI / 8; j += 2)
    stmatrix_x4_trans(base + (8 * (j + m / 2)) * kOutStride * 2, pack_bf16(acc[4 * j], acc[4 * j + 1]),
                      pack_bf16(acc[4 * j + 2], acc[4 * j + 3]), pack_bf16(acc[4 * j + 4], acc[4 * j + 5]),
                      pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
  named_barrier(1 + c, 128);
  for (int i = tid_in_wg; i < tile.rows * 8; i += 128) {  // this warp group's 64 features: 8 chunks a token
    const int t = i / 8, q = i % 8;
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(tile.row0 + t) * n_out + tile.f0 + 64 * c + 8 * q) =
        *reinterpret_cast<const uint4*>(sOut + t * kOutStride + 64 * c + 8 * q);
  }
}

template <int kTransA>
__global__ void __launch_bounds__(384, 1)
    swapab_kernel(const __grid_constant__ CUtensorMap map_w, const __grid_constant__ CUtensorMap map_x,
                  const int4* __restrict__ tiles, int total_tiles, int n_out, int K, __nv_bfloat16* __restrict__ out) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem);                         // [STAGES][BM][BK] or [STAGES][2][BK][64]
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(smem + STAGES * BM * BK * 2);  // [STAGES][BN][BK]
  __nv_bfloat16* sOut = reinterpret_cast<__nv_bfloat16*>(smem + STAGES * kStageBytes);  // [BN][kOutStride]
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * kStageBytes + BN * kOutStride * 2);
  uint64_t* empty = full + STAGES;

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 2);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int k_iters = K / BK;
  if (wg == 0) {
    if (tid_in_wg == 0) {
      int it = 0;
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const int4 tile = tiles[t];
        for (int k = 0; k < k_iters; ++k, ++it) {
          const int s = it % STAGES;
          mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
          mbar_expect_tx(&full[s], kStageBytes);
          __nv_bfloat16* a = sA + s * BM * BK;
          if (kTransA) {  // w [E·K, N]: two boxes of 64 features × 64 k rows
            tma_load_2d(a, &map_w, &full[s], tile.w, tile.x * K + k * BK);
            tma_load_2d(a + 64 * BK, &map_w, &full[s], tile.w + 64, tile.x * K + k * BK);
          } else {  // w [E·N, K]: one box of 64 k × 128 feature rows
            tma_load_2d(a, &map_w, &full[s], k * BK, tile.x * n_out + tile.w);
          }
          tma_load_2d(sB + s * BN * BK, &map_x, &full[s], k * BK, tile.y);
        }
      }
    }
    return;
  }
  const int c = wg - 1;
  float acc[128];
  int it = 0;
  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const int4 raw = tiles[t];
    const Tile tile{raw.x, raw.y, raw.z, raw.w};
    switch ((tile.rows + 15) / 16) {
#define CASE(n)                                                                                                    \
  case n:                                                                                                          \
    consume_tile<16 * n, kTransA>(acc, tile, it, k_iters, sA, sB, full, empty, sOut, out, n_out, c, tid_in_wg); \
    break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
      CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
#undef CASE
    }
  }
}

// The twin: out[t, f] = Σ_k x[t, k] · w(g, f, k), fp32.
__global__ void reference_kernel(const __nv_bfloat16* x, const __nv_bfloat16* w, const int* offs, int groups, int M,
                                 int N, int K, bool trans_w, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(M) * N) return;
  const int row = static_cast<int>(i / N), col = static_cast<int>(i % N);
  int g = 0;
  while (g < groups && offs[g] <= row) ++g;
  float s = 0.f;
  for (int k = 0; k < K; ++k) {
    const int64_t wi = trans_w ? (static_cast<int64_t>(g) * K + k) * N + col : (static_cast<int64_t>(g) * N + col) * K + k;
    s += __bfloat162float(x[static_cast<int64_t>(row) * K + k]) * __bfloat162float(w[wi]);
  }
  out[i] = s;
}

CUtensorMap make_map(const void* base, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};
  const cuuint32_t box[2] = {64, box_rows};
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

std::vector<int> read_counts(const std::string& path, int groups) {
  std::vector<int> counts;
  if (FILE* f = std::fopen(path.c_str(), "r")) {
    int v;
    while (std::fscanf(f, "%d", &v) == 1) counts.push_back(v);
    std::fclose(f);
  }
  if (static_cast<int>(counts.size()) != groups) {  // no file: equal counts
    counts.assign(groups, kRows / groups);
    counts[0] += kRows - kRows / groups * groups;
  }
  return counts;
}

// name, N (output features), K, w stored [E, K, N] (input gradient) or [E, N, K] (forward)
void run_case(const char* name, int E, const char* kind, const std::vector<int>& counts, int N, int K, bool trans_w,
              int sms) {
  std::vector<int> offs(E);
  for (int g = 0, run = 0; g < E; ++g) offs[g] = run += counts[g];
  std::vector<int4> tiles;
  for (int g = 0, start = 0; g < E; start = offs[g++])
    for (int r = start; r < offs[g]; r += BN)
      for (int f = 0; f < N; f += BM) tiles.push_back(make_int4(g, r, std::min(BN, offs[g] - r), f));
  const int64_t nx = int64_t{kRows} * K, nw = int64_t{E} * N * K;
  __nv_bfloat16 *x, *w, *out;
  float* ref;
  int* d_offs;
  int4* d_tiles;
  double* d_sums;
  CHECK(cudaMalloc(&x, nx * 2));
  CHECK(cudaMalloc(&w, nw * 2));
  CHECK(cudaMalloc(&out, size_t{kRows} * N * 2));
  CHECK(cudaMalloc(&ref, size_t{kRows} * N * 4));
  CHECK(cudaMalloc(&d_offs, E * 4));
  CHECK(cudaMalloc(&d_tiles, tiles.size() * sizeof(int4)));
  CHECK(cudaMalloc(&d_sums, 3 * sizeof(double)));
  fill_normal<<<4096, 256>>>(x, nx, 1000 + E + K, 1.f);
  fill_normal<<<4096, 256>>>(w, nw, 2000 + E + K, 0.05f);
  CHECK(cudaMemcpy(d_offs, offs.data(), E * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * sizeof(int4), cudaMemcpyHostToDevice));
  CHECK(cudaMemset(d_sums, 0, 3 * sizeof(double)));
  CHECK(cudaMemset(out, 0xFF, size_t{kRows} * N * 2));  // poison: NaN in bf16
  reference_kernel<<<static_cast<unsigned>((int64_t{kRows} * N + 255) / 256), 256>>>(x, w, d_offs, E, kRows, N, K,
                                                                                      trans_w, ref);
  CHECK(cudaGetLastError());

  const CUtensorMap map_w = trans_w ? make_map(w, uint64_t(E) * K, N, 64) : make_map(w, uint64_t(E) * N, K, BM);
  const CUtensorMap map_x = make_map(x, kRows, K, BN);
  auto kernel = trans_w ? swapab_kernel<1> : swapab_kernel<0>;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  const int n_tiles = static_cast<int>(tiles.size());
  auto launch = [&] { kernel<<<std::min(sms, n_tiles), 384, kSmem>>>(map_w, map_x, d_tiles, n_tiles, N, K, out); };
  launch();
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  compare_kernel<<<1024, 256>>>(out, ref, int64_t{kRows} * N, d_sums);
  double sums[3];
  CHECK(cudaMemcpy(sums, d_sums, sizeof(sums), cudaMemcpyDeviceToHost));
  const double med = probe::median_ms(launch), tflops = 2.0 * kRows * N * K / (med * 1e-3) / 1e12;
  int mma_cols = 0;
  for (const int4& t : tiles) mma_cols += (t.z + 15) / 16 * 16;
  std::printf("%4d %5s %10s %6d %9.3f %8.1f %7.3f %9.2e %8.0f\n", E, kind, name, n_tiles, med, tflops,
              double(mma_cols) / (kRows * (N / BM)), std::sqrt(sums[0] / sums[1]), sums[2]);
  for (void* p : {(void*)x, (void*)w, (void*)out, (void*)ref, (void*)d_offs, (void*)d_tiles, (void*)d_sums})
    CHECK(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::printf("swapped-operand grouped GEMM (BM %d features, BN %d tokens in steps of 16, %d stages)\n", BM, BN, STAGES);
  std::printf("%4s %5s %10s %6s %9s %8s %7s %9s %8s\n", "E", "rows", "gemm", "tiles", "ms", "TFLOP/s", "waste",
              "rel err", "non-fin");
  constexpr int D = 1024, I = 512;
  for (int E : {64, 256})
    for (const char* kind : {"bal", "skew"}) {
      const std::vector<int> counts = read_counts(dir + "/counts-" + std::to_string(E) + "-" + kind + ".txt", E);
      run_case("fwd w13", E, kind, counts, 2 * I, D, false, sms);   // x [M, D] · w13[E, 2I, D]ᵀ
      run_case("fwd w2", E, kind, counts, D, I, false, sms);        // h [M, I] · w2[E, D, I]ᵀ
      run_case("dgrad w2", E, kind, counts, I, D, true, sms);       // dy [M, D] · w2[E, D, I]
      run_case("dgrad w13", E, kind, counts, D, 2 * I, true, sms);  // dh [M, 2I] · w13[E, 2I, D]
    }
  return 0;
}
