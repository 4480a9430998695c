// defines: launch_grouped_wgrad, grouped_wgrad_workspace_bytes, grouped_wgrad_supported — the
// routed experts' weight gradient as one Hopper kernel that splits heavy experts' rows.
//
// dw[e] = dy[rows of e]ᵀ · x[rows of e] for every expert e < groups, rows of e =
// [offs[e − 1], offs[e]) (offs[−1] = 0, cumulative, on the device). ATen's grouped GEMM gives each
// output tile one expert's whole row range, so under skewed routing the heavy experts' tiles run
// several times longer than the rest and end in a mostly idle wave (bench/NOTES.md 39–41). Here
// an expert with more than `chunk` rows is cut into chunks of `chunk` rows whose fp32 partial
// tiles go to a workspace; the last chunk to finish a tile sums the partials in chunk order
// (deterministic) and writes the bf16 result. Both operands are read as they lie (row-major
// [rows, features]): the tensor cores take them MN-major, so nothing is transposed in memory.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moetrain::kernels {

// Whether `device` can run the kernel: compute capability 9.0 and the sm_90a code is what it
// loads (one synchronizing probe launch the first time a device is asked, then a cached answer).
bool grouped_wgrad_supported(int device);

// Bytes of the workspace for these shapes. It needs no initialization (the launch zeroes its
// counters on the stream first); launches sharing one workspace must not overlap (one a stream).
size_t grouped_wgrad_workspace_bytes(int64_t rows, int groups, int64_t dy_cols, int64_t x_cols);

// dy [rows, dy_cols] bf16, x [rows, x_cols] bf16 (rows contiguous, 16-byte aligned),
// offs [groups] int32 on the device, dw [groups, dy_cols, x_cols] bf16 (every element written;
// an expert without rows gets zeros). dy_cols % 128 == 0, x_cols % 256 == 0, groups ≤ 512. Offsets
// outside [0, rows] or decreasing are clamped to a non-decreasing run inside it (no fault, no hang).
// Returns a cudaError_t value (0: launched).
int launch_grouped_wgrad(const void* dy, const void* x, const int* offs, void* dw, int64_t rows, int groups,
                         int64_t dy_cols, int64_t x_cols, void* workspace, void* stream);

}  // namespace moetrain::kernels
