// defines: launch_rms_norm_forward, launch_rms_norm_backward — raw CUDA launchers of
// the fused RMSNorm (no torch headers, so nvcc compiles them quickly). Called only from
// models/kernels/rms_norm_fused.cpp.
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// x: [rows, dim] (x_dtype; row r at x + r·x_stride, x_stride ≥ dim), weight: [dim] fp32,
// out: [rows, dim] (out_dtype, contiguous), rstd: [rows] fp32.
// out = weight · round_x(x · rstd), rstd = 1 / sqrt(mean(x²) + eps).
// delta (nullable, x_dtype): the residual add first — h = round_x(x + delta) is written to
// sum_out [rows, dim] (x_dtype) and normalized in place of x.
// dtype codes: 0 = float32, 1 = bfloat16. Returns a cudaError_t as int (0 = success).
int launch_rms_norm_forward(const void* x, int64_t x_stride, const void* delta, void* sum_out, const float* weight,
                            void* out, float* rstd, int64_t rows, int64_t dim, float eps, int x_dtype, int out_dtype,
                            void* stream);
// grad_out: [rows, dim] (out_dtype) -> grad_x [rows, dim] (x_dtype, contiguous) and partial
// weight gradients dweight_partial: [partial_rows, dim] fp32, of which the first
// *partial_rows_written rows are written (sum those over rows); allocate
// rms_norm_backward_partials(rows) rows. grad_residual (nullable, x_dtype): added to
// grad_x in fp32 before its one rounding (the gradient h receives from its other uses).
int launch_rms_norm_backward(const void* x, int64_t x_stride, const float* weight, const float* rstd,
                             const void* grad_out, const void* grad_residual, void* grad_x, float* dweight_partial,
                             int64_t* partial_rows_written, int64_t rows, int64_t dim, int x_dtype, int out_dtype,
                             void* stream);
int64_t rms_norm_backward_partials(int64_t rows);
// out[c] = Σ_r in[r, c] for in: [rows, dim] fp32 contiguous (the backward's weight-gradient
// partials), out: [dim] fp32; the order of the additions is fixed (deterministic).
int launch_column_sum(const float* in, int64_t rows, int64_t dim, float* out, void* stream);

}  // namespace moetrain::kernels
