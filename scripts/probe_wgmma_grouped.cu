// Probe (bench/NOTES.md "Next"): a grouped GEMM of our own on Hopper — TMA loads into 128-byte
// swizzled shared memory, WGMMA from shared memory, a producer warp group and two consumer warp
// groups over a ring of stages with mbarriers, persistent CTAs walking a tile list that tiles
// each group's rows by BM (64 or 128). The routed experts' forward: out[rows of g] =
// x[rows of g] · w[g]ᵀ, x: [M, K] bf16 rows grouped by expert, w: [E, N, K] bf16 (both K-major:
// WGMMA's plain layout), out: [M, N] bf16, fp32 accumulation.
//
// Status: compiled here (sm_90a, no GPU on this machine); NOT yet run on a GPU. It checks
// itself against a plain CUDA-core kernel and prints its time beside the FLOP rate; compare with
// `python3 scripts/probe_fine_tiles.py` (ATen's _grouped_mm on the same shapes) in the same call.
//
// Build and run on a GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/wgmma scripts/probe_wgmma_grouped.cu -lcuda && /tmp/wgmma
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

namespace {

constexpr int BK = 64;  // 64 bf16 = 128 bytes: one swizzle row
// Tiles: BM = 64 rows per consumer warp group (1 or 2 of them) beside one producer warp group;
// BN = 128 or 256 columns (64 or 128 fp32 accumulators a consumer thread).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int inner, int row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(inner), "r"(row)
      : "memory");
}

// Shared-memory matrix descriptor: K-major operand, 128-byte swizzle, 8-row core groups of 1024 bytes.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = smem_u32(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// d[N/2] += A(64 x 16, smem) · B(16 x N, smem), both K-major; scale_d = 0 overwrites d.
// (Operand lists generated: one "+f" per accumulator register.)
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(scale_d));
}

__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(scale_d));
}

template <int BN>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[BN / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (BN == 128) wgmma_m64n128k16(d, da, db, scale_d);
  else wgmma_m64n256k16(d, da, db, scale_d);
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
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
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
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's group is done
      if (prev >= 0 && tid_in_wg == 0) mbar_arrive(&empty[prev]);
      prev = s;
    }
    wgmma_wait<0>();
    if (prev >= 0 && tid_in_wg == 0) mbar_arrive(&empty[prev]);
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

// Random normal bf16 (Box-Muller over a counter hash): fresh data, no host round trip.
__global__ void fill_normal(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint64_t z = (static_cast<uint64_t>(i) + 1) * 0x9E3779B97F4A7C15ull ^ seed * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u1 = (static_cast<float>(z >> 40) + 1.f) / 16777217.f, u2 = static_cast<float>(z & 0xFFFFFF) / 16777216.f;
    p[i] = __float2bfloat16(scale * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
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

// ‖out − ref‖ / ‖ref‖ and the count of non-finite outputs (the output is poisoned before the run)
__global__ void compare_kernel(const __nv_bfloat16* out, const float* ref, int64_t n, double* sums) {
  double num = 0, den = 0, bad = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double o = __bfloat162float(out[i]), r = ref[i];
    if (!isfinite(o)) bad += 1;
    else num += (o - r) * (o - r);
    den += r * r;
  }
  atomicAdd(&sums[0], num);
  atomicAdd(&sums[1], den);
  atomicAdd(&sums[2], bad);
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

  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2], tflops = 2.0 * p.M * p.N * p.K / (med * 1e-3) / 1e12;
  std::printf("%4d %5s %5d %5d %4d %4d %2d %9.3f %8.1f %9.2e %8.0f\n", p.E, p.skew ? "skew" : "bal", p.N, p.K, BM, BN,
              STAGES, med, tflops, std::sqrt(sums[0] / sums[1]), sums[2]);
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
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
