// Probe (bench/NOTES.md 62, "Next"): the experts' swapped-operand grouped GEMM with ping-pong
// consumers, against the production kernel (models/kernels/grouped_gemm_kernels.cu, included
// here) on bench-1b's four forward / input-gradient shapes. Entry 62 measured the production
// epilogue at a third of the kernel: both consumer warp groups convert and store their halves of
// one tile while the tensor pipe idles.
//
// Here each consumer warp group owns whole tiles of 128 features × ≤ 128 rows (two 64-feature
// MMA blocks, 128 accumulator registers) and the two take a CTA's tiles in turn; the producer
// loads the tiles' stages in that order, so one warp group's K loop runs while the other converts
// and stores its previous tile. The cost: the operands' L2 → shared traffic a FLOP is 4/3 of the
// production kernel's (128-row token tiles instead of 256) — unless two CTAs of a cluster share
// each token tile (kCluster = 2: CTA r of the pair takes feature tile 2p + r of the same rows and
// multicasts half of the rows' boxes to both), which brings it back to the production kernel's.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. -o /tmp/pingpong \
//     scripts/probe_wgmma_pingpong.cu models/kernels/sm90_host.cu && /tmp/pingpong COUNTS_DIR
// COUNTS_DIR: the counts scripts/probe_fine_tiles.py writes (counts-E-{bal,skew}.txt). Rows past
// the last offset are not zeroed here (the probe's offsets end at the last row).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "models/kernels/grouped_gemm_kernels.cu"
#include "scripts/probe_common.cuh"
#include "scripts/probe_pingpong.cuh"

namespace moetrain::kernels {
namespace {
namespace pingpong {

using namespace sm90;

#ifndef PINGPONG_STAGES
#define PINGPONG_STAGES 4
#endif
constexpr int kM = 128, kN = 128, kK = 64, kStagesPP = PINGPONG_STAGES, kThreadsPP = 384;
constexpr int kGroupsMax = 512;
constexpr int kStageA = kM * kK * 2, kStageB = kN * kK * 2;  // 16 KB each
constexpr int kOutBox = kN * 64 * 2;                          // [128 rows × 64 features] bf16
constexpr size_t kSmem = size_t{kStagesPP} * (kStageA + kStageB) + 2 * 2 * size_t{kOutBox} +
                         (2 * kStagesPP + 2) * sizeof(uint64_t) + 1024;
static_assert(kStagesPP >= 2, "a stage is released only after the next one's MMAs are issued");
static_assert(kSmem + (2 * kGroupsMax + 1) * sizeof(int) <= 232448, "shared memory: dynamic + the tile list");

struct ShapePP {
  int rows, groups, n_out, k, f_tiles;
};
struct TilePP {
  int group, row0, rows, f0;
};

__device__ __forceinline__ TilePP tile_of(int t, const ShapePP& s, const int* tile_start, const int* row_end) {
  int lo = 0, hi = s.groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int local = t - tile_start[lo], start = lo == 0 ? 0 : row_end[lo - 1];
  const int row0 = start + (local / s.f_tiles) * kN;
  return TilePP{lo, row0, min(kN, row_end[lo] - row0), (local % s.f_tiles) * kM};
}

// One M block's fp32 tile (64 features × NI ≤ 128 rows) into its [rows × 64] swizzled box buffer.
template <int NI>
__device__ __forceinline__ void to_smem(const float (&acc)[128], __nv_bfloat16* buf, int tid_in_wg) {
  const int warp = tid_in_wg / 32, lane = tid_in_wg % 32, m = lane / 8;
  const uint32_t base = smem_u32(buf) + (lane % 8) * 128 + (((2 * warp + m % 2) ^ (lane % 8)) * 16) + (m / 2) * 1024;
#pragma unroll
  for (int j = 0; j < NI / 8; j += 2)
    stmatrix_x4_trans(base + j * 1024, pack_bf16(acc[4 * j], acc[4 * j + 1]), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]),
                      pack_bf16(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
}

// One tile: its K loop (stage iterations it0 …), then its output.
template <int NI, int kTransA, int kCluster>
__device__ __forceinline__ void consume(float (&lo)[128], float (&hi)[128], const TilePP& tile, int it0,
                                        const ShapePP& shape, const __nv_bfloat16* sA, const __nv_bfloat16* sB,
                                        uint64_t* full, uint64_t* empty, uint64_t* order, __nv_bfloat16* sOut,
                                        const CUtensorMap& map_out16, const CUtensorMap& map_out64,
                                        __nv_bfloat16* out, int wg, int tid_in_wg) {
  const int k_iters = shape.k / kK;
  int prev = -1;
  for (int k = 0; k < k_iters; ++k) {
    const int it = it0 + k, s = it % kStagesPP;
    mbar_wait(&full[s], (it / kStagesPP) & 1);
    const __nv_bfloat16* a = sA + s * kM * kK;  // K-major: 128 feature rows; MN-major: 2 boxes of 64 features
    const __nv_bfloat16* b = sB + s * kN * kK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      const uint64_t db = smem_desc_sw128(b + kk * 16, 16, 1024);
      const uint64_t da0 = kTransA ? smem_desc_sw128(a + kk * 16 * 64, 64 * kK * 2, 1024) : smem_desc_sw128(a + kk * 16, 16, 1024);
      const uint64_t da1 = kTransA ? smem_desc_sw128(a + 64 * kK + kk * 16 * 64, 64 * kK * 2, 1024)
                                   : smem_desc_sw128(a + 64 * kK + kk * 16, 16, 1024);
      const int scale = (k > 0 || kk > 0) ? 1 : 0;
      wgmma_m64k16<NI, kTransA, 0>(lo, da0, db, scale);
      wgmma_m64k16<NI, kTransA, 0>(hi, da1, db, scale);
    }
    wgmma_commit();
    wgmma_wait<1>();  // the stage before this one is done
    if (prev >= 0 && tid_in_wg == 0) probe::pingpong::release_stage<kCluster>(empty, prev);
    prev = s;
  }
  // Every full wait of this tile has passed: the other warp group's K loop may start (its waits
  // cannot meet a stage phase from before this tile's).
  if (tid_in_wg == 0) mbar_arrive(&order[1 - wg]);
  wgmma_wait<0>();
  if (prev >= 0 && tid_in_wg == 0) probe::pingpong::release_stage<kCluster>(empty, prev);

  __nv_bfloat16* buf0 = sOut;
  __nv_bfloat16* buf1 = sOut + kN * 64;
  if (tid_in_wg == 0) bulk_wait_read<0>();  // this warp group's previous stores have read the buffers
  named_barrier(1 + wg, 128);
  to_smem<NI>(lo, buf0, tid_in_wg);
  to_smem<NI>(hi, buf1, tid_in_wg);
  fence_proxy_async_smem();
  named_barrier(1 + wg, 128);
  const int boxed = tile.rows / 16 * 16;
  if (tid_in_wg == 0) {
    for (int half = 0; half < 2; ++half) {
      const __nv_bfloat16* buf = half ? buf1 : buf0;
      int r = 0;
      for (; r + 64 <= boxed; r += 64) tma_store_2d(&map_out64, buf + r * 64, tile.f0 + 64 * half, tile.row0 + r);
      for (; r < boxed; r += 16) tma_store_2d(&map_out16, buf + r * 64, tile.f0 + 64 * half, tile.row0 + r);
    }
    bulk_commit();
  }
  for (int i = tid_in_wg; i < (tile.rows - boxed) * 16; i += 128) {
    const int t = boxed + i / 16, half = (i / 8) % 2, q = i % 8;
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(half ? buf1 : buf0);
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(tile.row0 + t) * shape.n_out + tile.f0 + 64 * half + 8 * q) =
        *reinterpret_cast<const uint4*>(bytes + t * 128 + ((q ^ (t % 8)) * 16));
  }
}

template <int kTransA, int kCluster>
__global__ void __launch_bounds__(kThreadsPP, 1)
    pingpong_kernel(const __grid_constant__ CUtensorMap map_w, const __grid_constant__ CUtensorMap map_x64,
                    const __grid_constant__ CUtensorMap map_x128, const __grid_constant__ CUtensorMap map_out16,
                    const __grid_constant__ CUtensorMap map_out64, const int* __restrict__ offs, ShapePP shape,
                    __nv_bfloat16* __restrict__ out) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ int s_tile_start[kGroupsMax + 1], s_row_end[kGroupsMax];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(smem + kStagesPP * kStageA);
  unsigned char* out_buffers = smem + kStagesPP * (kStageA + kStageB);  // [warp group][2 halves][128 rows][64]
  uint64_t* full = reinterpret_cast<uint64_t*>(out_buffers + 2 * 2 * kOutBox);
  uint64_t* empty = full + kStagesPP;
  uint64_t* order = empty + kStagesPP;  // [warp group]: its turn to run a K loop

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128, lane = threadIdx.x % 32;
  if (threadIdx.x < 32) {
    warp_tile_list(offs, shape.groups, shape.rows, kN, shape.f_tiles, lane, s_tile_start, s_row_end);
  } else if (threadIdx.x == 32) {
    probe::pingpong::init_ring(full, empty, order, kStagesPP, kCluster);
  }
  __syncthreads();
  if (kCluster > 1) cluster_sync();  // the peer's barriers are initialized before any multicast
  const int total_tiles = s_tile_start[shape.groups], k_iters = shape.k / kK;
  // Work units: tiles, or with a cluster pairs of tiles 2u, 2u + 1 — the same rows, feature tiles
  // 2p and 2p + 1 (f_tiles is even) — CTA r of the pair taking tile 2u + r.
  const int rank = kCluster > 1 ? static_cast<int>(cluster_rank()) : 0;
  const int unit0 = static_cast<int>(blockIdx.x) / kCluster, units_step = static_cast<int>(gridDim.x) / kCluster;
  const int total_units = total_tiles / kCluster;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid_in_wg == 0) {
      int it = 0;
      for (int u = unit0; u < total_units; u += units_step) {
        const TilePP tile = tile_of(u * kCluster + rank, shape, s_tile_start, s_row_end);
        const int x_boxes = (tile.rows + 63) / 64;
        for (int k = 0; k < k_iters; ++k, ++it) {
          const int s = it % kStagesPP;
          mbar_wait(&empty[s], ((it / kStagesPP) & 1) ^ 1);  // free in every CTA of the cluster
          mbar_expect_tx(&full[s], (kM + x_boxes * 64) * kK * 2);
          __nv_bfloat16* a = sA + s * kM * kK;
          if (kTransA) {
            tma_load_2d(a, &map_w, &full[s], tile.f0, tile.group * shape.k + k * kK);
            tma_load_2d(a + 64 * kK, &map_w, &full[s], tile.f0 + 64, tile.group * shape.k + k * kK);
          } else {
            tma_load_2d(a, &map_w, &full[s], k * kK, tile.group * shape.n_out + tile.f0);
          }
          __nv_bfloat16* b = sB + s * kN * kK;
          if (kCluster > 1) {  // box i of the rows from CTA i % 2, into both
            for (int i = rank; i < x_boxes; i += kCluster)
              tma_load_2d_multicast(b + i * 64 * kK, &map_x64, &full[s], k * kK, tile.row0 + 64 * i,
                                    static_cast<uint16_t>((1u << kCluster) - 1));
          } else if (tile.rows == kN) {
            tma_load_2d(b, &map_x128, &full[s], k * kK, tile.row0);
          } else {
            for (int i = 0; i < x_boxes; ++i) tma_load_2d(b + i * 64 * kK, &map_x64, &full[s], k * kK, tile.row0 + 64 * i);
          }
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int c = wg - 1;  // takes the CTA's units c, c + 2, …
    __nv_bfloat16* sOut = reinterpret_cast<__nv_bfloat16*>(out_buffers + c * 2 * kOutBox);
    float lo[128], hi[128];
    int j = c;
    for (int u = unit0 + c * units_step, turn = 0; u < total_units; u += 2 * units_step, j += 2, ++turn) {
      const TilePP tile = tile_of(u * kCluster + rank, shape, s_tile_start, s_row_end);
      probe::pingpong::await_turn(order, c, turn);
      switch ((tile.rows + 15) / 16) {
#define PINGPONG_CASE(n)                                                                                        \
    case n:                                                                                                       \
      consume<16 * n, kTransA, kCluster>(lo, hi, tile, j * k_iters, shape, sA, sB, full, empty, order, sOut,     \
                                         map_out16, map_out64, out, c, tid_in_wg);                                \
      break;
        PINGPONG_CASE(1) PINGPONG_CASE(2) PINGPONG_CASE(3) PINGPONG_CASE(4)
        PINGPONG_CASE(5) PINGPONG_CASE(6) PINGPONG_CASE(7) PINGPONG_CASE(8)
#undef PINGPONG_CASE
      }
    }
    if (tid_in_wg == 0) bulk_wait_read<0>();
  }
  // No CTA leaves while its peer may still multicast into it or arrive on its barriers.
  __syncwarp();
  if (kCluster > 1) cluster_sync();
}

int launch(const void* x, const void* w, const int* offs, void* out, int64_t rows, int groups, int64_t n_out,
           int64_t k, bool w_transposed, int cluster) {
  if (groups > kGroupsMax || n_out % kM != 0 || k % kK != 0 || (cluster != 1 && cluster != 2) ||
      (n_out / kM) % cluster != 0)
    return int(cudaErrorInvalidValue);
  CUtensorMap map_w, map_x64, map_x128, map_out16, map_out64;
  const bool mapped = (w_transposed ? make_tma_map_bf16(&map_w, w, groups * k, n_out, 64)
                                    : make_tma_map_bf16(&map_w, w, groups * n_out, k, kM)) &&
                      make_tma_map_bf16(&map_x64, x, rows, k, 64) && make_tma_map_bf16(&map_x128, x, rows, k, kN) &&
                      make_tma_map_bf16(&map_out16, out, rows, n_out, 16) &&
                      make_tma_map_bf16(&map_out64, out, rows, n_out, 64);
  if (!mapped) return int(cudaErrorInvalidValue);
  const ShapePP shape{int(rows), groups, int(n_out), int(k), int(n_out / kM)};
  auto kernel = cluster == 2 ? (w_transposed ? pingpong_kernel<1, 2> : pingpong_kernel<0, 2>)
                             : (w_transposed ? pingpong_kernel<1, 1> : pingpong_kernel<0, 1>);
  int sms = 0;
  const int ready = prepare_sm90_kernel(reinterpret_cast<const void*>(kernel), kSmem, &sms);
  if (ready != 0) return ready;
  return probe::pingpong::launch_clustered(kernel, cluster, sms, kThreadsPP, kSmem, map_w, map_x64, map_x128, map_out16,
                                           map_out64, offs, shape, static_cast<__nv_bfloat16*>(out));
}

}  // namespace pingpong
}  // namespace
}  // namespace moetrain::kernels

namespace {

constexpr int kRows = 16384 * 6;

void run_case(const char* name, int E, const char* kind, const std::vector<int>& counts, int N, int K, bool trans_w) {
  const std::vector<int> offs = probe::end_offsets(counts, kRows);
  const int64_t nx = int64_t{kRows} * K, nw = int64_t{E} * N * K, no = int64_t{kRows} * N;
  probe::DeviceBuffers buffers;
  __nv_bfloat16 *x = buffers.alloc<__nv_bfloat16>(nx), *w = buffers.alloc<__nv_bfloat16>(nw),
                *out = buffers.alloc<__nv_bfloat16>(no);
  float* ref = buffers.alloc<float>(no);
  int* d_offs = buffers.alloc<int>(E);
  double* d_sums = buffers.alloc<double>(3);
  probe::fill_normal<<<4096, 256>>>(x, nx, 1000 + E + K, 1.f);
  probe::fill_normal<<<4096, 256>>>(w, nw, 2000 + E + K, 0.05f);
  CHECK(cudaMemcpy(d_offs, offs.data(), E * 4, cudaMemcpyHostToDevice));
  probe::grouped_gemm_reference<<<static_cast<unsigned>((no + 255) / 256), 256>>>(x, w, d_offs, E, kRows, N, K, trans_w,
                                                                                   ref);
  CHECK(cudaGetLastError());
  probe::Checked r[3];
  for (int v = 0; v < 3; ++v)
    r[v] = probe::check_and_time(
        [&] {
          CHECK(static_cast<cudaError_t>(
              v == 0 ? moetrain::kernels::launch_grouped_gemm(x, w, d_offs, out, kRows, E, N, K, trans_w, nullptr)
                     : moetrain::kernels::pingpong::launch(x, w, d_offs, out, kRows, E, N, K, trans_w, v)));
        },
        out, ref, no, d_sums);
  probe::pingpong::print_row(E, kind, name, r);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  if (!moetrain::kernels::grouped_gemm_supported(0)) {
    std::fprintf(stderr, "needs an sm_90a GPU\n");
    return 1;
  }
  probe::pingpong::print_header();
  constexpr int D = 1024, I = 512;
  for (int E : {64, 256})
    for (const char* kind : {"bal", "skew"}) {
      const std::vector<int> counts =
          probe::read_counts(dir + "/counts-" + std::to_string(E) + "-" + kind + ".txt", E, kRows);
      run_case("fwd w13", E, kind, counts, 2 * I, D, false);
      run_case("fwd w2", E, kind, counts, D, I, false);
      run_case("dgrad w2", E, kind, counts, I, D, true);
      run_case("dgrad w13", E, kind, counts, D, 2 * I, true);
    }
  return 0;
}
