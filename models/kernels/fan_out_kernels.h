// defines: launch_sum3 — the raw CUDA launcher of a three-way elementwise sum (no torch headers).
// Called only from models/kernels/fan_out.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// out[i] = a[i] + b[i] (+ c[i] when c is not null) over n contiguous elements of `dtype`
// (0 = fp32, 1 = bf16), fp32 math and one rounding. out may be a or b. Returns a cudaError_t
// as int (0 = success).
int launch_sum3(const void* a, const void* b, const void* c, void* out, int64_t n, int dtype, void* stream);

}  // namespace moetrain::kernels
