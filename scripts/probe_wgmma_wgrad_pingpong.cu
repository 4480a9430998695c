// Probe (bench/NOTES.md 62, "Next"): the routed experts' weight gradient with ping-pong consumers,
// against the production kernel (models/kernels/grouped_wgrad_kernels.cu, included here) on
// bench-1b's shapes — w13: dw [E, 1024, 1024] = dguᵀ · x, w2: dw [E, 1024, 512] = dyᵀ · h over
// 98,304 rows. Entry 62: at 256 experts (≈ 384 rows an expert, 6 k-steps a tile) the production
// kernel's epilogue is 14 % of it and the zeroing of a tile's partial last step, with its barrier
// over both consumer warp groups, 6 %; its tensor pipe is busy 50 % of the time against 75 % at
// 64 experts — the gradient's growth is the layer's largest.
//
// Here each consumer warp group owns whole 128 × 128 output tiles (two 64-row MMA blocks, 128
// accumulator registers) and the two take a CTA's tiles in turn, so one converts and stores while
// the other multiplies, and a partial step is zeroed by its own warp group alone. No expert is
// split into chunks (the production kernel splits experts over ≥ 2× the mean rows; the skewed
// counts show what that costs). Operand traffic a FLOP: 4/3 of the production kernel's — or, with
// a 2-CTA cluster whose CTAs take adjacent x column tiles of the same dy rows and multicast the dy
// boxes, the production kernel's.
//
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -I. -o /tmp/wgrad_pp \
//     scripts/probe_wgmma_wgrad_pingpong.cu models/kernels/sm90_host.cu && /tmp/wgrad_pp COUNTS_DIR
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "models/kernels/grouped_wgrad_kernels.cu"
#include "models/kernels/sm90_wgmma_n.cuh"
#include "scripts/probe_common.cuh"
#include "scripts/probe_pingpong.cuh"

namespace moetrain::kernels {
namespace {
namespace wgrad_pp {

using namespace sm90;

#ifndef WGRAD_PP_STAGES
#define WGRAD_PP_STAGES 4
#endif
constexpr int kT = 128, kR = 64, kStagesW = WGRAD_PP_STAGES, kThreadsW = 384, kGroupsMax = 512;
constexpr int kBox = 64 * kR * 2;               // one load box: 64 features × 64 rows (8 KB)
constexpr int kStageW = 4 * kBox;               // dy: 2 boxes, x: 2 boxes
constexpr int kStoreBox = 64 * 64 * 2;          // one store box: 64 × 64 bf16
constexpr int kOutW = 4 * kStoreBox;            // a warp group's 128 × 128 tile as 4 store boxes
constexpr size_t kSmemW = size_t{kStagesW} * kStageW + 2 * size_t{kOutW} + (2 * kStagesW + 2) * sizeof(uint64_t) + 1024;
static_assert(kStagesW >= 2, "a stage is released only after the next one's MMAs are issued");
static_assert(kSmemW + kGroupsMax * sizeof(int) <= 232448, "shared memory: dynamic + the experts' ends");

struct ShapeW {
  int rows, groups, dy_cols, x_cols, tiles_m, tiles_n;
};
struct TileW {
  int group, tile_m, tile_n, row0, row_end, iters;
};

__device__ __forceinline__ TileW tile_at_w(int t, const ShapeW& s, const int* row_end) {
  const int per = s.tiles_m * s.tiles_n, g = t / per, local = t % per;
  const int start = g == 0 ? 0 : row_end[g - 1], end = row_end[g];
  return TileW{g, local / s.tiles_n, local % s.tiles_n, start, end, (end - start + kR - 1) / kR};
}

template <int kTransA, int kTransB>
__device__ __forceinline__ void mma_step(float (&lo)[128], float (&hi)[128], const __nv_bfloat16* a,
                                         const __nv_bfloat16* b) {
#pragma unroll
  for (int kk = 0; kk < kR / 16; ++kk) {  // 16 rows = 2048 bytes further into each box
    const uint64_t db = smem_desc_sw128(b + kk * 16 * 64, kBox, 1024);
    wgmma_m64k16<128, kTransA, kTransB>(lo, smem_desc_sw128(a + kk * 16 * 64, kBox, 1024), db, 1);
    wgmma_m64k16<128, kTransA, kTransB>(hi, smem_desc_sw128(a + 64 * kR + kk * 16 * 64, kBox, 1024), db, 1);
  }
}

// Fragment i of lane l, warp w: dw row 16w + l/4 + 8·((i/2)%2), column 8·(i/4) + 2·(l%4) + i%2.
__device__ __forceinline__ void to_smem(const float (&acc)[128], unsigned char* out, int warp, int lane) {
#pragma unroll
  for (int j = 0; j < kT / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + lane / 4 + 8 * h;
      *reinterpret_cast<__nv_bfloat162*>(out + (j / 8) * kStoreBox + r * 128 + (((j % 8) ^ (r % 8)) * 16) + 4 * (lane % 4)) =
          __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
}

template <int kCluster>
__global__ void __launch_bounds__(kThreadsW, 1)
    wgrad_pp_kernel(const __grid_constant__ CUtensorMap map_dy, const __grid_constant__ CUtensorMap map_x,
                    const __grid_constant__ CUtensorMap map_dw, const int* __restrict__ offs, ShapeW shape) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ int s_row_end[kGroupsMax];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  unsigned char* stages = smem;                          // [stage][dy box 0, dy box 1, x box 0, x box 1]
  unsigned char* out_buffers = smem + kStagesW * kStageW;  // [warp group][M block][2 store boxes]
  uint64_t* full = reinterpret_cast<uint64_t*>(out_buffers + 2 * kOutW);
  uint64_t* empty = full + kStagesW;
  uint64_t* order = empty + kStagesW;  // [warp group]: its turn to run a K loop

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128, warp = tid_in_wg / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < 32) {
    int end_before = 0;
    for (int base = 0; base < shape.groups; base += 32) {
      const auto span = warp_group_span(offs, shape.groups, shape.rows, base, lane, end_before);
      if (base + lane < shape.groups) s_row_end[base + lane] = span.end;
    }
  } else if (threadIdx.x == 32) {
    probe::pingpong::init_ring(full, empty, order, kStagesW, kCluster);
  }
  __syncthreads();
  if (kCluster > 1) cluster_sync();  // the peer's barriers are initialized before any multicast
  const int total_tiles = shape.groups * shape.tiles_m * shape.tiles_n;
  // Work units: tiles, or with a cluster pairs of tiles 2u, 2u + 1 — the same expert and dy
  // columns, x column tiles 2p and 2p + 1 (tiles_n is even) — CTA r of the pair taking tile 2u + r
  // and multicasting dy box r of each stage to both.
  const int rank = kCluster > 1 ? static_cast<int>(cluster_rank()) : 0;
  const int unit0 = static_cast<int>(blockIdx.x) / kCluster, units_step = static_cast<int>(gridDim.x) / kCluster;
  const int total_units = total_tiles / kCluster;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid_in_wg == 0) {
      int it = 0;
      for (int u = unit0; u < total_units; u += units_step) {
        const TileW tile = tile_at_w(u * kCluster + rank, shape, s_row_end);
        for (int k = 0; k < tile.iters; ++k, ++it) {
          const int s = it % kStagesW, row = tile.row0 + k * kR;
          mbar_wait(&empty[s], ((it / kStagesW) & 1) ^ 1);  // free in every CTA of the cluster
          mbar_expect_tx(&full[s], kStageW);
          unsigned char* st = stages + s * kStageW;
          if (kCluster > 1) {
            tma_load_2d_multicast(st + rank * kBox, &map_dy, &full[s], tile.tile_m * kT + rank * 64, row,
                                  static_cast<uint16_t>((1u << kCluster) - 1));
          } else {
            for (int b = 0; b < 2; ++b) tma_load_2d(st + b * kBox, &map_dy, &full[s], tile.tile_m * kT + b * 64, row);
          }
          for (int b = 0; b < 2; ++b) tma_load_2d(st + (2 + b) * kBox, &map_x, &full[s], tile.tile_n * kT + b * 64, row);
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int c = wg - 1;  // takes the CTA's tiles c, c + 2, …
    unsigned char* out = out_buffers + c * kOutW;
    float lo[128], hi[128];
    int it = 0;  // the CTA's stage iterations before this warp group's next tile
    for (int j = 0, u = unit0; u < total_units; ++j, u += units_step) {
      const TileW tile = tile_at_w(u * kCluster + rank, shape, s_row_end);
      if (j % 2 != c) {  // the other warp group's tile: its stages come first in the ring
        it += tile.iters;
        continue;
      }
      probe::pingpong::await_turn(order, c, j / 2);
#pragma unroll
      for (int i = 0; i < 64; ++i) lo[i] = hi[i] = 0.f;
      int prev = -1;
      for (int k = 0; k < tile.iters; ++k, ++it) {
        const int s = it % kStagesW;
        mbar_wait(&full[s], (it / kStagesW) & 1);
        unsigned char* st = stages + s * kStageW;
        const int valid = tile.row_end - (tile.row0 + k * kR);
        if (valid < kR) {
          // Rows past the expert (the next expert's, or TMA's zero fill) are zeroed in all four
          // boxes, so an Inf there cannot reach this expert as 0 · Inf; only this warp group reads
          // the stage, so only it waits.
          const int tail = (kR - valid) * 8;  // 16-byte pieces past the expert in one box
          for (int i = tid_in_wg; i < 4 * tail; i += 128)
            *reinterpret_cast<uint4*>(st + (i / tail) * kBox + (valid + (i % tail) / 8) * 128 + (i % 8) * 16) =
                make_uint4(0, 0, 0, 0);
          fence_proxy_async_smem();
          named_barrier(1 + c, 128);
        }
        wgmma_fence();
        mma_step<1, 1>(lo, hi, reinterpret_cast<const __nv_bfloat16*>(st),
                       reinterpret_cast<const __nv_bfloat16*>(st + 2 * kBox));
        wgmma_commit();
        wgmma_wait<1>();
        if (prev >= 0 && tid_in_wg == 0) probe::pingpong::release_stage<kCluster>(empty, prev);
        prev = s;
      }
      if (tid_in_wg == 0) mbar_arrive(&order[1 - c]);  // every full wait of this tile has passed
      wgmma_wait<0>();
      if (prev >= 0 && tid_in_wg == 0) probe::pingpong::release_stage<kCluster>(empty, prev);
      if (tid_in_wg == 0) bulk_wait_read<0>();  // this warp group's previous stores have read the buffer
      named_barrier(1 + c, 128);
      to_smem(lo, out, warp, lane);
      to_smem(hi, out + 2 * kStoreBox, warp, lane);
      fence_proxy_async_smem();
      named_barrier(1 + c, 128);
      if (tid_in_wg == 0) {
        for (int mb = 0; mb < 2; ++mb)
          for (int b = 0; b < 2; ++b)
            tma_store_2d(&map_dw, out + (2 * mb + b) * kStoreBox, tile.tile_n * kT + b * 64,
                         tile.group * shape.dy_cols + tile.tile_m * kT + mb * 64);
        bulk_commit();
      }
    }
    if (tid_in_wg == 0) bulk_wait<0>();
  }
  // No CTA leaves while its peer may still multicast into it or arrive on its barriers.
  __syncwarp();
  if (kCluster > 1) cluster_sync();
}

int launch(const void* dy, const void* x, const int* offs, void* dw, int64_t rows, int groups, int64_t dy_cols,
           int64_t x_cols, int cluster) {
  if (groups > kGroupsMax || dy_cols % kT != 0 || x_cols % kT != 0 || (cluster != 1 && cluster != 2) ||
      (x_cols / kT) % cluster != 0)
    return int(cudaErrorInvalidValue);
  CUtensorMap map_dy, map_x, map_dw;
  if (!make_tma_map_bf16(&map_dy, dy, rows, dy_cols, kR) || !make_tma_map_bf16(&map_x, x, rows, x_cols, kR) ||
      !make_tma_map_bf16(&map_dw, dw, groups * dy_cols, x_cols, 64))
    return int(cudaErrorInvalidValue);
  const ShapeW shape{int(rows), groups, int(dy_cols), int(x_cols), int(dy_cols / kT), int(x_cols / kT)};
  auto kernel = cluster == 2 ? wgrad_pp_kernel<2> : wgrad_pp_kernel<1>;
  int sms = 0;
  const int ready = prepare_sm90_kernel(reinterpret_cast<const void*>(kernel), kSmemW, &sms);
  if (ready != 0) return ready;
  return probe::pingpong::launch_clustered(kernel, cluster, sms, kThreadsW, kSmemW, map_dy, map_x, map_dw, offs, shape);
}

}  // namespace wgrad_pp
}  // namespace
}  // namespace moetrain::kernels

namespace {

constexpr int kRows = 16384 * 6;

void run_case(int groups, const char* kind, const char* name, int n, int k, const std::string& dir) {
  const std::vector<int> counts =
      probe::read_counts(dir + "/counts-" + std::to_string(groups) + "-" + kind + ".txt", groups, kRows);
  const std::vector<int> offs = probe::end_offsets(counts, kRows);
  const int64_t n_out = static_cast<int64_t>(groups) * n * k;
  const size_t ws_bytes = moetrain::kernels::grouped_wgrad_workspace_bytes(kRows, groups, n, k);
  probe::DeviceBuffers buffers;
  __nv_bfloat16 *dy = buffers.alloc<__nv_bfloat16>(static_cast<size_t>(kRows) * n),
                *x = buffers.alloc<__nv_bfloat16>(static_cast<size_t>(kRows) * k),
                *dw = buffers.alloc<__nv_bfloat16>(n_out);
  float* ref = buffers.alloc<float>(n_out);
  int* d_offs = buffers.alloc<int>(groups);
  void* ws = buffers.alloc<unsigned char>(ws_bytes);
  double* sums = buffers.alloc<double>(3);
  CHECK(cudaMemcpy(d_offs, offs.data(), groups * 4, cudaMemcpyHostToDevice));
  probe::fill_normal<<<4096, 256>>>(dy, static_cast<int64_t>(kRows) * n, 11 + groups + n, 1.f);
  probe::fill_normal<<<4096, 256>>>(x, static_cast<int64_t>(kRows) * k, 23 + groups + k, 1.f);
  probe::grouped_wgrad_reference<<<static_cast<unsigned>((n_out + 255) / 256), 256>>>(dy, x, d_offs, groups, n, k,
                                                                                       ref);
  probe::Checked r[3];
  for (int v = 0; v < 3; ++v)
    r[v] = probe::check_and_time(
        [&] {
          CHECK(static_cast<cudaError_t>(
              v == 0 ? moetrain::kernels::launch_grouped_wgrad(dy, x, d_offs, dw, kRows, groups, n, k, ws, nullptr)
                     : moetrain::kernels::wgrad_pp::launch(dy, x, d_offs, dw, kRows, groups, n, k, v)));
        },
        dw, ref, n_out, sums);
  probe::pingpong::print_row(groups, kind, name, r);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "/tmp";
  if (!moetrain::kernels::grouped_wgrad_supported(0)) {
    std::fprintf(stderr, "grouped_wgrad: not supported on this device\n");
    return 1;
  }
  probe::pingpong::print_header();
  for (int groups : {64, 256})
    for (const char* kind : {"bal", "skew"}) {
      run_case(groups, kind, "wgrad w13", 1024, 1024, dir);
      run_case(groups, kind, "wgrad w2", 1024, 512, dir);
    }
  return 0;
}
