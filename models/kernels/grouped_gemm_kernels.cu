// The routed experts' forward and input-gradient GEMMs on Hopper (grouped_gemm_kernels.h), with
// the operands swapped: outᵀ[f, t] = A[f, k] · x[t, k]ᵀ, A = w[e] (K-major, the forward) or w[e]ᵀ
// (MN-major, the input gradient). TMA loads into 128-byte-swizzled stages, one producer warp
// group and two consumer warp groups (64 output features each) over a ring of stages with
// mbarriers, persistent CTAs walking a tile list that each CTA builds from the offsets on the
// device (so a CUDA graph can capture it and no count goes to the host).
//
// Work item (tile): one expert's ≤ 256 rows × 128 output features; the K loop runs 64 at a time.
// The MMA's N is the tile's rows rounded up to 16 (wgmma takes N = 16, 32, …, 256) and the rows
// of a short last tile arrive in 64-row boxes (a whole tile in one 256-row box), so a short last
// tile of an expert costs about what its rows need. The fp32 tile leaves through shared memory:
// stmatrix.trans writes it as [rows × 64 features] bf16 per consumer in the TMA's swizzled box
// layout, and TMA stores of 64- and 16-row boxes take it out while the consumer starts its next
// tile (the last rows % 16 by plain stores). Each TMA operation has a cost of its own, so the
// boxes are as large as the tile allows; the producer warp group gives its registers to the
// consumers (setmaxnreg: 40 / 232).
// Probe and measurements: scripts/probe_wgmma_swapab.cu, bench/NOTES.md 61–62.
#include "models/kernels/grouped_gemm_kernels.h"

#include <algorithm>

#include "models/kernels/group_spans.cuh"
#include "models/kernels/sm90_host.h"
#include "models/kernels/sm90_wgmma.cuh"
#include "models/kernels/sm90_wgmma_n.cuh"

// The plain sm_90 pass compiles the kernel's body away (see grouped_gemm_kernel), leaving its
// helpers unreferenced there.
#pragma nv_diag_suppress 177

namespace moetrain::kernels {

namespace {

using namespace sm90;

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 3, kConsumers = kBM / 64;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kMaxGroups = 512;
constexpr int kStoreRows = 16;  // rows of one TMA store box
constexpr int kStageBytes = (kBM + kBN) * kBK * 2;
constexpr int kOutBytes = kBN * 64 * 2;  // a consumer's [256 rows × 64 features] bf16 output buffer
constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageBytes + size_t{kConsumers} * kOutBytes +
                              2 * kStages * sizeof(uint64_t) + 1024;

struct Shape {
  int rows, groups, n_out, k, f_tiles;
};

struct Tile {
  int group, row0, rows, f0;
};

// Tile t: the last group whose first tile is ≤ t (a group without rows owns no tile), then its
// row tile (slow) and feature tile (fast: the CTAs working at once share the rows' loads in L2).
__device__ __forceinline__ Tile tile_at(int t, const Shape& s, const int* tile_start, const int* row_end) {
  int lo = 0, hi = s.groups - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int local = t - tile_start[lo], start = lo == 0 ? 0 : row_end[lo - 1];
  const int row0 = start + (local / s.f_tiles) * kBN;
  return Tile{lo, row0, min(kBN, row_end[lo] - row0), (local % s.f_tiles) * kBM};
}

__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One tile's K loop with an NI-row MMA, then its output through shared memory to out.
template <int NI, int kTransA>
__device__ __forceinline__ void consume_tile(float (&acc)[128], const Tile& tile, const Shape& shape, int& it,
                                             const __nv_bfloat16* sA, const __nv_bfloat16* sB, uint64_t* full,
                                             uint64_t* empty, __nv_bfloat16* sOut, const CUtensorMap& map_out,
                                             const CUtensorMap& map_out_wide,
                                             __nv_bfloat16* out, int c, int tid_in_wg) {
  int prev = -1;
  const int k_iters = shape.k / kBK;
  for (int k = 0; k < k_iters; ++k, ++it) {
    const int s = it % kStages;
    mbar_wait(&full[s], (it / kStages) & 1);
    const __nv_bfloat16* a = sA + s * kBM * kBK + c * 64 * kBK;  // K-major: feature rows 64c…; MN-major: box c
    const __nv_bfloat16* b = sB + s * kBN * kBK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {  // K-major: 32 bytes along the swizzled rows; MN-major: 16 rows
      const uint64_t da = kTransA ? smem_desc_sw128(a + kk * 16 * 64, 64 * kBK * 2, 1024)
                                  : smem_desc_sw128(a + kk * 16, 16, 1024);
      wgmma_m64k16<NI, kTransA, 0>(acc, da, smem_desc_sw128(b + kk * 16, 16, 1024), (k > 0 || kk > 0) ? 1 : 0);
    }
    wgmma_commit_release_previous(empty, prev, s, tid_in_wg == 0);
  }
  wgmma_drain_release(empty, prev, tid_in_wg == 0);

  // acc[4j + 2h + e]: feature 64c + 16·warp + lane/4 + 8h, row 8j + 2·(lane%4) + e. One stmatrix
  // stores the 8 × 8 blocks (j, 0), (j, 1), (j + 1, 0), (j + 1, 1) transposed (lanes 8m…8m + 7
  // give block m's 8 row addresses), so that buffer row t holds row t's 64 features as a TMA box
  // lays them out: 128 bytes a row, 16-byte piece q at q ^ (t % 8) (the 128-byte swizzle; a
  // block's 8 rows then hit distinct banks).
  const int warp = tid_in_wg / 32, lane = tid_in_wg % 32, m = lane / 8;
  if (tid_in_wg == 0) bulk_wait_read<0>();  // the previous tile's TMA stores have read the buffer
  named_barrier(1 + c, 128);                 // and its tail rows' plain stores too
  const uint32_t base = smem_u32(sOut) + (lane % 8) * 128 + (((2 * warp + m % 2) ^ (lane % 8)) * 16) + (m / 2) * 1024;
#pragma unroll
  for (int j = 0; j < NI / 8; j += 2)
    stmatrix_x4_trans(base + j * 1024, pack_bf16(acc[4 * j], acc[4 * j + 1]), pack_bf16(acc[4 * j + 2], acc[4 * j + 3]),
                      pack_bf16(acc[4 * j + 4], acc[4 * j + 5]), pack_bf16(acc[4 * j + 6], acc[4 * j + 7]));
  fence_proxy_async_smem();  // the buffer's writes visible to the TMA unit
  named_barrier(1 + c, 128);
  // Whole 64- then 16-row boxes by TMA stores that run on while this warp group starts its next
  // tile; the last rows % 16 (their neighbours belong to the next expert's tile) by plain 16-byte stores.
  const int boxed = tile.rows / kStoreRows * kStoreRows;
  if (tid_in_wg == 0) {
    int r = 0;
    for (; r + 64 <= boxed; r += 64)  // 64-row boxes first: each TMA operation costs (NOTES.md 62)
      tma_store_2d(&map_out_wide, sOut + r * 64, tile.f0 + 64 * c, tile.row0 + r);
    for (; r < boxed; r += kStoreRows) tma_store_2d(&map_out, sOut + r * 64, tile.f0 + 64 * c, tile.row0 + r);
    bulk_commit();
  }
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(sOut);
  for (int i = tid_in_wg; i < (tile.rows - boxed) * 8; i += 128) {
    const int t = boxed + i / 8, q = i % 8;
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(tile.row0 + t) * shape.n_out + tile.f0 + 64 * c + 8 * q) =
        *reinterpret_cast<const uint4*>(bytes + t * 128 + ((q ^ (t % 8)) * 16));
  }
}

template <int kTransA>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_gemm_kernel(const __grid_constant__ CUtensorMap map_w, const __grid_constant__ CUtensorMap map_x,
                        const __grid_constant__ CUtensorMap map_x_wide, const __grid_constant__ CUtensorMap map_out,
                        const __grid_constant__ CUtensorMap map_out_wide, const int* __restrict__ offs, Shape shape,
                        __nv_bfloat16* __restrict__ out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the build also passes plain sm_90, which has no wgmma
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ int s_tile_start[kMaxGroups + 1], s_row_end[kMaxGroups];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem);  // [stage][BM][BK] (K-major) or [stage][2][BK][64]
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(smem + kStages * kBM * kBK * 2);  // [stage][BN][BK]
  unsigned char* out_buffers = smem + kStages * kStageBytes;  // [consumer][BN rows][64 features], swizzled
  uint64_t* full = reinterpret_cast<uint64_t*>(out_buffers + kConsumers * kOutBytes);
  uint64_t* empty = full + kStages;

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128, lane = threadIdx.x % 32;
  // The tile list: group g owns ceil(rows_g / 256) · f_tiles consecutive tiles (one warp scans the
  // offsets, clamped into [0, rows]: group_spans.cuh).
  if (threadIdx.x < 32) {
    warp_tile_list(offs, shape.groups, shape.rows, kBN, shape.f_tiles, lane, s_tile_start, s_row_end);
  } else if (threadIdx.x == 32) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int total_tiles = s_tile_start[shape.groups], k_iters = shape.k / kBK;

  if (wg == 0) {  // producer: one thread issues every load
    // The producer needs few registers; the consumers get them (232 each: their 128 accumulators
    // and the epilogue without spills; NOTES.md 62).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid_in_wg == 0) {
      // The stage (tile, k): the weights' 128 features × 64 k and the tile's rows in 64-row boxes
      // (≥ the MMA's rows, a multiple of 16; rows past the tensor arrive as zeros, counted), so a
      // short last tile of an expert loads what its MMA reads, not 256 rows.
      auto boxes = [&](const Tile& tile, int k, auto&& issue) {
        if (kTransA) {  // w [groups·k, n_out]: two boxes of 64 features × 64 k rows
          issue(&map_w, 0, 0, tile.f0, tile.group * shape.k + k * kBK);
          issue(&map_w, 0, 64 * kBK, tile.f0 + 64, tile.group * shape.k + k * kBK);
        } else {  // w [groups·n_out, k]: one box of 64 k × 128 feature rows
          issue(&map_w, 0, 0, k * kBK, tile.group * shape.n_out + tile.f0);
        }
        if (tile.rows == kBN) {  // a whole tile in one operation
          issue(&map_x_wide, 1, 0, k * kBK, tile.row0);
        } else {
          for (int b = 0; b < (tile.rows + 63) / 64; ++b) issue(&map_x, 1, b * 64 * kBK, k * kBK, tile.row0 + 64 * b);
        }
      };
      int it = 0;
      for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
        const Tile tile = tile_at(t, shape, s_tile_start, s_row_end);
        for (int k = 0; k < k_iters; ++k, ++it) {
          const int s = it % kStages;
          mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);  // a fresh barrier passes parity 1 at once
          mbar_expect_tx(&full[s], (kBM + (tile.rows + 63) / 64 * 64) * kBK * 2);
          boxes(tile, k, [&](const CUtensorMap* map, int is_x, int offset, int inner, int row) {
            tma_load_2d((is_x ? sB + s * kBN * kBK : sA + s * kBM * kBK) + offset, map, &full[s], inner, row);
          });
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int c = wg - 1;
  __nv_bfloat16* sOut = reinterpret_cast<__nv_bfloat16*>(out_buffers + c * kOutBytes);
  float acc[128];
  int it = 0;
  for (int t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const Tile tile = tile_at(t, shape, s_tile_start, s_row_end);
    switch ((tile.rows + 15) / 16) {
#define MOETRAIN_GROUPED_GEMM_CASE(n)                                                                            \
  case n:                                                                                                        \
    consume_tile<16 * n, kTransA>(acc, tile, shape, it, sA, sB, full, empty, sOut, map_out, map_out_wide, out, c, tid_in_wg); \
    break;
      MOETRAIN_GROUPED_GEMM_CASE(1) MOETRAIN_GROUPED_GEMM_CASE(2) MOETRAIN_GROUPED_GEMM_CASE(3)
      MOETRAIN_GROUPED_GEMM_CASE(4) MOETRAIN_GROUPED_GEMM_CASE(5) MOETRAIN_GROUPED_GEMM_CASE(6)
      MOETRAIN_GROUPED_GEMM_CASE(7) MOETRAIN_GROUPED_GEMM_CASE(8) MOETRAIN_GROUPED_GEMM_CASE(9)
      MOETRAIN_GROUPED_GEMM_CASE(10) MOETRAIN_GROUPED_GEMM_CASE(11) MOETRAIN_GROUPED_GEMM_CASE(12)
      MOETRAIN_GROUPED_GEMM_CASE(13) MOETRAIN_GROUPED_GEMM_CASE(14) MOETRAIN_GROUPED_GEMM_CASE(15)
      MOETRAIN_GROUPED_GEMM_CASE(16)
#undef MOETRAIN_GROUPED_GEMM_CASE
    }
  }
  if (tid_in_wg == 0) bulk_wait_read<0>();  // the last stores have read the buffer before the block's memory goes
  // Rows past the last group's end (none in the MoE layer, where the offsets end at rows): zeros.
  const int last_end = s_row_end[shape.groups - 1];
  const int64_t pieces = static_cast<int64_t>(shape.rows - last_end) * (shape.n_out / 8);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(128 * kConsumers) + (threadIdx.x - 128); i < pieces;
       i += static_cast<int64_t>(gridDim.x) * 128 * kConsumers)
    reinterpret_cast<uint4*>(out + static_cast<int64_t>(last_end) * shape.n_out)[i] = make_uint4(0, 0, 0, 0);
#else
  __trap();  // the plain sm_90 build: grouped_gemm_supported() keeps launches away from it
#endif
}

}  // namespace

bool grouped_gemm_supported(int device) { return sm90a_supported(device); }

int launch_grouped_gemm(const void* x, const void* w, const int* offs, void* out, int64_t rows, int groups,
                        int64_t n_out, int64_t k, bool w_transposed, void* stream) {
  if (groups < 1 || groups > kMaxGroups || n_out % kBM != 0 || n_out < kBM || k % kBK != 0 || k < kBK || rows < 1 ||
      rows > (int64_t{1} << 31) - 1 - kBN || groups * std::max(n_out, k) > (int64_t{1} << 31) - 1)
    return static_cast<int>(cudaErrorInvalidValue);
  CUtensorMap map_w, map_x, map_x_wide, map_out, map_out_wide;
  const bool mapped = (w_transposed ? make_tma_map_bf16(&map_w, w, groups * k, n_out, 64)
                                    : make_tma_map_bf16(&map_w, w, groups * n_out, k, kBM)) &&
                      make_tma_map_bf16(&map_x, x, rows, k, 64) && make_tma_map_bf16(&map_x_wide, x, rows, k, kBN) &&
                      make_tma_map_bf16(&map_out, out, rows, n_out, kStoreRows) &&
                      make_tma_map_bf16(&map_out_wide, out, rows, n_out, 64);
  if (!mapped) return static_cast<int>(cudaErrorInvalidValue);
  const Shape shape{static_cast<int>(rows), groups, static_cast<int>(n_out), static_cast<int>(k),
                    static_cast<int>(n_out / kBM)};
  auto kernel = w_transposed ? grouped_gemm_kernel<1> : grouped_gemm_kernel<0>;
  int sms = 0;
  const int ready = prepare_sm90_kernel(reinterpret_cast<const void*>(kernel), kSmemBytes, &sms);
  if (ready != 0) return ready;
  // At most (rows / 256 + groups) row tiles; a CTA an SM walks them.
  const int64_t bound = ((rows + kBN - 1) / kBN + groups) * shape.f_tiles;
  kernel<<<static_cast<unsigned>(std::min<int64_t>(sms, bound)), kThreads, kSmemBytes,
           static_cast<cudaStream_t>(stream)>>>(map_w, map_x, map_x_wide, map_out, map_out_wide, offs, shape,
                                                       static_cast<__nv_bfloat16*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
