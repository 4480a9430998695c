// defines: warp_group_span — how the grouped Hopper GEMMs (grouped_wgrad_kernels.cu,
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

}  // namespace moetrain::kernels
