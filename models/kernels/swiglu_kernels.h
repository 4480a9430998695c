// defines: launch_swiglu_packed_forward, launch_swiglu_packed_backward — raw CUDA launchers of
// the fused SwiGLU activation out = silu(gate) * up (no torch headers, so nvcc
// compiles them quickly). Called only from models/kernels/swiglu.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// dtype: 0 = float32, 1 = bfloat16. Device pointers: gu [rows, 2·cols] = gate ‖ up per
// row; out, grad_out [rows, cols]; grad_gu like gu (all contiguous); row_scale, grad_scale
// [rows] fp32 (the forward's row_scale may be nullptr: none). stream is a cudaStream_t.
// Returns a cudaError_t as int (0 = success).
int launch_swiglu_packed_forward(const void* gu, const float* row_scale, void* out, int64_t rows, int64_t cols,
                                 int dtype, void* stream);
int launch_swiglu_packed_backward(const void* gu, const void* grad_out, void* grad_gu, int64_t rows, int64_t cols,
                                  int dtype, void* stream);
// The backward of out = row_scale[r] · silu(gate)·up: grad_gu and grad_scale (one warp a row).
int launch_swiglu_scaled_backward(const void* gu, const void* grad_out, const float* row_scale, void* grad_gu,
                                  float* grad_scale, int64_t rows, int64_t cols, int dtype, void* stream);

}  // namespace moetrain::kernels
