// defines: warp_group_span, warp_tile_list — how the grouped Hopper GEMMs (grouped_wgrad_kernels.cu,
// grouped_gemm_kernels.cu) read the experts' end offsets when they build their tile lists on the
// device: one warp, 32 groups at a time, each group's rows clamped into the tensor.
#pragma once

namespace moetrain::kernels {

struct GroupSpan {
  int start, end;  // rows [start, end) of one group
};

// Lane `lane` of one warp over the groups [base, base + 32): group base + lane's rows. The ends are
// offs clamped to [0, rows] and made non-decreasing (a running max, carried from call to call in
// end_before, which starts at 0), so offsets that break the contract cannot send a load or a store
// out of bounds or leave a kernel's stage ring out of step. Lanes past `groups` get empty spans.
__device__ __forceinline__ GroupSpan warp_group_span(const int* offs, int groups, int rows, int base, int lane,
                                                     int& end_before) {
  const int g = base + lane;
  int end = g < groups ? min(max(offs[g], 0), rows) : 0;
  for (int d = 1; d < 32; d *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, end, d);
    if (lane >= d) end = max(end, v);
  }
  end = max(end, end_before);
  int start = __shfl_up_sync(0xffffffffu, end, 1);
  if (lane == 0) start = end_before;
  end_before = __shfl_sync(0xffffffffu, end, 31);
  return GroupSpan{start, end};
}

// One warp builds a grouped GEMM's tile list: group g owns ceil(rows_g / row_tile) · f_tiles
// consecutive tiles from tile_start[g]; tile_start[groups] is the total and row_end[g] the group's
// clamped end row (grouped_gemm_kernels.cu, scripts/probe_wgmma_pingpong.cu).
__device__ __forceinline__ void warp_tile_list(const int* offs, int groups, int rows, int row_tile, int f_tiles,
                                               int lane, int* tile_start, int* row_end) {
  int tiles_before = 0, end_before = 0;
  for (int base = 0; base < groups; base += 32) {
    const int g = base + lane;
    const GroupSpan span = warp_group_span(offs, groups, rows, base, lane, end_before);
    const int tiles = g < groups ? (span.end - span.start + row_tile - 1) / row_tile * f_tiles : 0;
    int incl = tiles;
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (g < groups) {
      tile_start[g] = tiles_before + incl - tiles;
      row_end[g] = span.end;
    }
    tiles_before += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) tile_start[groups] = tiles_before;
}

}  // namespace moetrain::kernels
