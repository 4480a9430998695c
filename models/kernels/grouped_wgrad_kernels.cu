// The routed experts' weight gradient on Hopper (grouped_wgrad_kernels.h): TMA loads into
// 128-byte-swizzled stages, one producer warp group and two consumer warp groups (64 output rows
// each) over a ring of stages with mbarriers, persistent CTAs over a tile list built on the device
// from the expert offsets — so a CUDA graph can capture it and no count goes to the host.
//
// Work item (tile): one expert's chunk of at most `chunk` rows × a 128 × 256 output tile. Its
// K loop runs over the chunk's rows 64 at a time; both operands are [rows, features] in memory,
// i.e. MN-major for the MMA (dw's rows come from dy's columns, its columns from x's). A chunk
// ending inside a 64-row step zeroes the rows past its end in its dy tile before the MMA reads it
// (the rows belong to the next expert or are TMA's zero fill), and in its x tile, so an Inf in the
// next expert's rows stays out of this expert's gradient (as ATen's grouped GEMM keeps them apart).
#include "models/kernels/grouped_wgrad_kernels.h"

#include <algorithm>

#include "models/kernels/group_spans.cuh"
#include "models/kernels/sm90_host.h"
#include "models/kernels/sm90_wgmma.cuh"

// The plain sm_90 pass compiles the kernel's body away (see grouped_wgrad_kernel), leaving its
// helpers unreferenced there.
#pragma nv_diag_suppress 177

namespace moetrain::kernels {

namespace {

using namespace sm90;

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 3, kConsumers = kBM / 64;
constexpr int kThreads = 128 * (1 + kConsumers);
constexpr int kMaxGroups = 512;
constexpr int kStageBytes = (kBM + kBN) * kBK * 2;
constexpr int kBoxBytes = 64 * kBK * 2;        // one TMA box: 64 features × 64 rows of bf16 (8 KB)
constexpr int kEpilogueBytes = 64 * kBN * 2;  // a consumer's 64 × 256 bf16 output, as 4 boxes
constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageBytes + kConsumers * kEpilogueBytes +
                              2 * kStages * sizeof(uint64_t) + 1024;

struct Shape {
  int rows, groups, chunk, tiles_m, tiles_n, dy_cols, x_cols;
};

// The workspace: the scheduler's next-tile counter and the per-(split expert, 64-row half tile)
// arrival counters (zeroed by the launcher before every launch), then the fp32 partial tiles of
// split experts' chunks (each written before it is read).
struct Workspace {
  int* scheduler;  // [1]
  int* counters;   // [slots, tiles_m·2, tiles_n]
  float* partial;  // [slots, dy_cols, x_cols]
};

struct Tile {
  int group, chunks, chunk, tile_m, tile_n, row0, row_end, iters, slot_base;
};

// Tile t of the list: `order` lists the groups in list order, `tile_start` their first tiles.
__device__ __forceinline__ Tile tile_at(int t, const Shape& s, const int* tile_start, const int* order,
                                        const int* row_end, const int* slot_base) {
  int lo = 0, hi = s.groups - 1;  // the last position whose first tile is ≤ t (each has ≥ 1 tile)
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int per_chunk = s.tiles_m * s.tiles_n, local = t - tile_start[lo], within = local % per_chunk;
  const int group = order[lo];
  const int start = group == 0 ? 0 : row_end[group - 1], end = row_end[group], rows = end - start;
  Tile tile;
  tile.group = group;
  tile.chunks = rows > s.chunk ? (rows + s.chunk - 1) / s.chunk : 1;
  tile.chunk = local / per_chunk;
  tile.tile_m = within / s.tiles_n;
  tile.tile_n = within % s.tiles_n;
  tile.row0 = start + tile.chunk * s.chunk;
  tile.row_end = min(end, tile.row0 + s.chunk);
  tile.iters = (tile.row_end - tile.row0 + kBK - 1) / kBK;
  tile.slot_base = slot_base[group];
  return tile;
}

__global__ void __launch_bounds__(kThreads, 1)
    grouped_wgrad_kernel(const __grid_constant__ CUtensorMap map_dy, const __grid_constant__ CUtensorMap map_x,
                         const __grid_constant__ CUtensorMap map_dw, const int* __restrict__ offs, Shape shape,
                         Workspace ws) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the build also passes plain sm_90, which has no wgmma
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ int s_tile_start[kMaxGroups + 1], s_order[kMaxGroups], s_row_end[kMaxGroups], s_slot_base[kMaxGroups];
  __shared__ int s_last[kConsumers], s_stage_tile[kStages];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  __nv_bfloat16* sA = reinterpret_cast<__nv_bfloat16*>(smem);                          // [stage][BM/64][BK rows][64]
  __nv_bfloat16* sB = reinterpret_cast<__nv_bfloat16*>(smem + kStages * kBM * kBK * 2);  // [stage][BN/64][BK rows][64]
  unsigned char* epilogue = smem + kStages * kStageBytes;  // [consumer][BN/64 boxes][64 rows][128 bytes]
  uint64_t* full = reinterpret_cast<uint64_t*>(epilogue + kConsumers * kEpilogueBytes);
  uint64_t* empty = full + kStages;

  const int wg = threadIdx.x / 128, tid_in_wg = threadIdx.x % 128, warp = tid_in_wg / 32, lane = threadIdx.x % 32;
  const int per_chunk = shape.tiles_m * shape.tiles_n;
  // The tile list: the split groups first (their chunks are the longest tiles; the blocks take
  // tiles from a shared counter, so the long ones start first and the short ones fill in), then
  // the rest, each group in index order. A group owns chunks(g) · per_chunk consecutive tiles; a
  // split group's chunks own consecutive workspace slots. One warp scans the groups twice, 32 at
  // a time: first the split ones, then the others (the offsets clamped into [0, rows]:
  // group_spans.cuh).
  if (threadIdx.x < 32) {
    int tiles_before = 0, slots_before = 0, placed = 0;
    for (int pass = 0; pass < 2; ++pass) {
      int end_before = 0;
      for (int base = 0; base < shape.groups; base += 32) {
        const int g = base + lane;
        const auto [start, end] = warp_group_span(offs, shape.groups, shape.rows, base, lane, end_before);
        int chunks = 0;
        if (g < shape.groups) {
          const int rows = end - start;
          chunks = rows > shape.chunk ? (rows + shape.chunk - 1) / shape.chunk : 1;
        }
        const bool mine = g < shape.groups && (chunks > 1) == (pass == 0);
        const int tiles = mine ? chunks * per_chunk : 0, split = mine && chunks > 1 ? chunks : 0;
        int tiles_incl = tiles, split_incl = split, count_incl = mine ? 1 : 0;
        for (int d = 1; d < 32; d *= 2) {
          const int a = __shfl_up_sync(0xffffffffu, tiles_incl, d), b = __shfl_up_sync(0xffffffffu, split_incl, d),
                    n = __shfl_up_sync(0xffffffffu, count_incl, d);
          if (lane >= d) {
            tiles_incl += a;
            split_incl += b;
            count_incl += n;
          }
        }
        if (mine) {
          const int pos = placed + count_incl - 1;
          s_order[pos] = g;
          s_tile_start[pos] = tiles_before + tiles_incl - tiles;
          s_row_end[g] = end;
          s_slot_base[g] = split ? slots_before + split_incl - split : -1;
        }
        tiles_before += __shfl_sync(0xffffffffu, tiles_incl, 31);
        slots_before += __shfl_sync(0xffffffffu, split_incl, 31);
        placed += __shfl_sync(0xffffffffu, count_incl, 31);
      }
    }
    if (lane == 0) s_tile_start[shape.groups] = tiles_before;
  } else if (threadIdx.x == 32) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int total_tiles = s_tile_start[shape.groups];

  if (wg == 0) {  // producer: one thread takes tiles from the shared counter and issues every load
    if (tid_in_wg == 0) {
      for (int it = 0;;) {
        const int t = min(atomicAdd(ws.scheduler, 1), total_tiles);  // total_tiles: no more work
        const Tile tile = t < total_tiles ? tile_at(t, shape, s_tile_start, s_order, s_row_end, s_slot_base) : Tile{};
        // Each tile takes ≥ 1 stage: its index travels with the first (a tile without rows, and
        // the end, pass a stage without loads).
        for (int k = 0; k < max(tile.iters, 1); ++k, ++it) {
          const int s = it % kStages, row = tile.row0 + k * kBK;
          mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);  // a fresh barrier passes parity 1 at once
          if (k == 0) s_stage_tile[s] = t;                  // published by the arrive below
          if (tile.iters == 0) {
            mbar_arrive(&full[s]);
            continue;
          }
          mbar_expect_tx(&full[s], kStageBytes);
          for (int b = 0; b < kBM / 64; ++b)
            tma_load_2d(sA + s * kBM * kBK + b * 64 * kBK, &map_dy, &full[s], tile.tile_m * kBM + b * 64, row);
          for (int b = 0; b < kBN / 64; ++b)
            tma_load_2d(sB + s * kBN * kBK + b * 64 * kBK, &map_x, &full[s], tile.tile_n * kBN + b * 64, row);
        }
        if (t == total_tiles) break;
      }
    }
    return;
  }

  // Consumers: warp group c owns output rows [64c, 64c + 64) of each tile, i.e. dy's TMA box c.
  const int c = wg - 1;
  float acc[kBN / 2];
  for (int it = 0;;) {
    mbar_wait(&full[it % kStages], (it / kStages) & 1);  // the tile's first stage carries its index
    const int t = s_stage_tile[it % kStages];
    if (t >= total_tiles) break;
    const Tile tile = tile_at(t, shape, s_tile_start, s_order, s_row_end, s_slot_base);
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.f;
    int prev = -1;
    if (tile.iters == 0) {  // an expert without rows: release the empty stage, write zeros
      named_barrier(1 + c, 128);  // every warp has read the stage's tile index before it is reused
      if (tid_in_wg == 0) mbar_arrive(&empty[it % kStages]);
      ++it;
    }
    for (int k = 0; k < tile.iters; ++k, ++it) {
      const int s = it % kStages;
      if (k > 0) mbar_wait(&full[s], (it / kStages) & 1);
      __nv_bfloat16* a = sA + s * kBM * kBK + c * 64 * kBK;
      const __nv_bfloat16* b = sB + s * kBN * kBK;
      const int valid = tile.row_end - (tile.row0 + k * kBK);
      if (valid < kBK) {
        // Rows past the chunk (the next expert's, or TMA's zero fill) are zeroed in both operands,
        // so an Inf there cannot reach this expert as 0 · Inf: this warp group's dy box, and half
        // of the x boxes that both warp groups read (hence the barrier over both).
        const int tail = (kBK - valid) * 8;  // 16-byte pieces past the chunk in one box
        for (int i = tid_in_wg; i < tail * (1 + kBN / 64 / kConsumers); i += 128) {
          const int box = i / tail, piece = i % tail;
          unsigned char* bytes = box == 0 ? reinterpret_cast<unsigned char*>(a)
                                          : reinterpret_cast<unsigned char*>(sB + s * kBN * kBK +
                                                                             (c * (kBN / 64 / kConsumers) + box - 1) * 64 * kBK);
          *reinterpret_cast<uint4*>(bytes + (valid + piece / 8) * 128 + (piece % 8) * 16) = make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async_smem();
        named_barrier(1 + kConsumers, 128 * kConsumers);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBK / 16; ++kk)  // 16 rows = 2048 bytes further into both tiles
        wgmma_m64n256k16<1, 1>(acc, smem_desc_sw128(a + kk * 16 * 64, kBoxBytes, 1024),
                               smem_desc_sw128(b + kk * 16 * 64, kBoxBytes, 1024), 1);
      wgmma_commit_release_previous(empty, prev, s, tid_in_wg == 0);
    }
    wgmma_drain_release(empty, prev, tid_in_wg == 0);

    // Epilogue: fragment i → row 16·warp + lane/4 + 8·((i/2)%2), column 8·(i/4) + 2·(lane%4) + i%2.
    if (tile.chunks > 1) {
      // A split expert: this chunk's fp32 partial to its slot; the last chunk to arrive at this
      // half tile sums every chunk's partial in chunk order (the same sum whichever arrives last).
      const int64_t plane = static_cast<int64_t>(shape.dy_cols) * shape.x_cols;
      const int row = tile.tile_m * kBM + c * 64 + warp * 16 + lane / 4, col = tile.tile_n * kBN + 2 * (lane % 4);
      auto partial = [&](int chunk) {
        return ws.partial + (tile.slot_base + chunk) * plane + static_cast<int64_t>(row) * shape.x_cols + col;
      };
      float* mine = partial(tile.chunk);
#pragma unroll
      for (int i = 0; i < kBN / 2; i += 2)
        __stcg(reinterpret_cast<float2*>(mine + 8 * ((i / 2) % 2) * shape.x_cols + 8 * (i / 4)),
               make_float2(acc[i], acc[i + 1]));
      __threadfence();
      named_barrier(1 + c, 128);
      if (tid_in_wg == 0) {
        int* counter = ws.counters + (static_cast<int64_t>(tile.slot_base) * shape.tiles_m * kConsumers +
                                      tile.tile_m * kConsumers + c) * shape.tiles_n + tile.tile_n;
        s_last[c] = atomicAdd(counter, 1) == tile.chunks - 1;
      }
      named_barrier(1 + c, 128);
      if (!s_last[c]) continue;
      __threadfence();
#pragma unroll
      for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.f;
      for (int q = 0; q < tile.chunks; ++q) {
        const float* p = partial(q);
#pragma unroll
        for (int i = 0; i < kBN / 2; i += 2) {  // 64 independent loads in flight
          const float2 v = __ldcg(reinterpret_cast<const float2*>(p + 8 * ((i / 2) % 2) * shape.x_cols + 8 * (i / 4)));
          acc[i] += v.x;
          acc[i + 1] += v.y;
        }
      }
    }
    // bf16 through shared memory (the 128-byte swizzle of the TMA boxes: 16-byte chunk q of row r
    // sits at q ^ (r % 8), so a warp's 8 rows hit distinct banks) and out by TMA stores that run
    // on while this warp group starts its next tile.
    unsigned char* out = epilogue + c * kEpilogueBytes;
    if (tid_in_wg == 0) bulk_wait_read<0>();  // the previous tile's stores have read the buffer
    named_barrier(1 + c, 128);
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + lane / 4 + 8 * h;
        *reinterpret_cast<__nv_bfloat162*>(out + (j / 8) * kBoxBytes + r * 128 + (((j % 8) ^ (r % 8)) * 16) +
                                           4 * (lane % 4)) = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      }
    fence_proxy_async_smem();
    named_barrier(1 + c, 128);
    if (tid_in_wg == 0) {
      const int row = tile.group * shape.dy_cols + tile.tile_m * kBM + c * 64;
      for (int b = 0; b < kBN / 64; ++b) tma_store_2d(&map_dw, out + b * kBoxBytes, tile.tile_n * kBN + b * 64, row);
      bulk_commit();
    }
  }
  if (tid_in_wg == 0) bulk_wait<0>();  // the last stores are done before the block's memory goes
#else
  __trap();  // the plain sm_90 build: grouped_wgrad_supported() keeps launches away from it
#endif
}

// Partial slots for split experts and the chunk length: the workspace holds ≤ 256 MB of fp32
// partials; a chunk is ≥ twice the mean rows of an expert and long enough that the split experts'
// chunks fit (each split expert has > chunk rows, so their chunks number < 2 · rows / chunk ≤
// slots). Where two slots do not fit (very wide experts) nothing is split.
struct Plan {
  int64_t slots, chunk, header_ints;  // header: the scheduler and the counters, padded to 16 bytes
};
Plan plan_for(int64_t rows, int groups, int64_t dy_cols, int64_t x_cols) {
  const int64_t slot_bytes = dy_cols * x_cols * 4;
  const int64_t half = std::min<int64_t>(64, (int64_t{256} << 20) / (2 * slot_bytes));
  Plan plan{0, std::max<int64_t>(kBK, (rows + kBK - 1) / kBK * kBK), 0};
  if (half >= 1) {
    const int64_t mean = (rows + groups - 1) / std::max(groups, 1);
    const int64_t chunk = std::max<int64_t>(2 * mean, (rows + half - 1) / half);
    plan.slots = 2 * half;
    plan.chunk = std::max<int64_t>(kBK, (chunk + kBK - 1) / kBK * kBK);
  }
  const int64_t counters = plan.slots * (dy_cols / kBM) * kConsumers * (x_cols / kBN);
  plan.header_ints = (1 + counters + 3) / 4 * 4;
  return plan;
}

}  // namespace

bool grouped_wgrad_supported(int device) { return sm90a_supported(device); }

size_t grouped_wgrad_workspace_bytes(int64_t rows, int groups, int64_t dy_cols, int64_t x_cols) {
  const Plan plan = plan_for(rows, groups, dy_cols, x_cols);
  return static_cast<size_t>(plan.header_ints * 4 + plan.slots * dy_cols * x_cols * 4);
}

int launch_grouped_wgrad(const void* dy, const void* x, const int* offs, void* dw, int64_t rows, int groups,
                         int64_t dy_cols, int64_t x_cols, void* workspace, void* stream) {
  if (groups < 1 || groups > kMaxGroups || dy_cols % kBM != 0 || x_cols % kBN != 0 || rows < 1 ||
      rows > (int64_t{1} << 31) - 1)
    return static_cast<int>(cudaErrorInvalidValue);
  CUtensorMap map_dy, map_x, map_dw;
  if (!make_tma_map_bf16(&map_dy, dy, rows, dy_cols, kBK) || !make_tma_map_bf16(&map_x, x, rows, x_cols, kBK) ||
      !make_tma_map_bf16(&map_dw, dw, groups * dy_cols, x_cols, kBK))
    return static_cast<int>(cudaErrorInvalidValue);
  const Plan plan = plan_for(rows, groups, dy_cols, x_cols);
  const Shape shape{static_cast<int>(rows),         groups,
                    static_cast<int>(plan.chunk),   static_cast<int>(dy_cols / kBM),
                    static_cast<int>(x_cols / kBN), static_cast<int>(dy_cols),
                    static_cast<int>(x_cols)};
  int* header = static_cast<int*>(workspace);
  Workspace ws{header, header + 1, reinterpret_cast<float*>(header + plan.header_ints)};
  // The counters start from zero every launch (a memset node under graph capture).
  const cudaError_t zeroed =
      cudaMemsetAsync(header, 0, static_cast<size_t>(plan.header_ints) * 4, static_cast<cudaStream_t>(stream));
  if (zeroed != cudaSuccess) return static_cast<int>(zeroed);
  int sms = 0;
  const int ready = prepare_sm90_kernel(reinterpret_cast<const void*>(grouped_wgrad_kernel), kSmemBytes, &sms);
  if (ready != 0) return ready;
  grouped_wgrad_kernel<<<sms, kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(
      map_dy, map_x, map_dw, offs, shape, ws);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
