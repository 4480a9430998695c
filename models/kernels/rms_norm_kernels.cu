// Fused RMSNorm: one warp per row, fp32 math. Forward reads x once (twice from L1/L2)
// and writes out + rstd; backward writes grad_x and the weight gradient's per-warp
// partial sums (no atomics: each warp owns one row of the partial buffer).
#include "models/kernels/rms_norm_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxBackwardWarps = 2048;  // rows of the dweight partial buffer

template <class TX, class TO>
__global__ void rms_norm_forward_kernel(const TX* __restrict__ x, const float* __restrict__ weight,
                                        TO* __restrict__ out, float* __restrict__ rstd, int64_t rows, int64_t dim,
                                        float eps) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += n_warps) {
    const TX* xr = x + r * dim;
    float ss = 0.f;
    for (int64_t c = lane; c < dim; c += 32) {
      const float v = to_float(xr[c]);
      ss += v * v;
    }
    const float inv = rsqrtf(warp_sum(ss) / static_cast<float>(dim) + eps);
    if (lane == 0) rstd[r] = inv;
    TO* orow = out + r * dim;
    for (int64_t c = lane; c < dim; c += 32) {
      // as the reference: normalize in fp32, round to x's dtype, then scale in fp32
      const float normed = to_float(from_float<TX>(to_float(xr[c]) * inv));
      orow[c] = from_float<TO>(weight[c] * normed);
    }
  }
}

// xhat = x·r, dn = g·w: dx = r·(dn − xhat·mean(dn·xhat)); dw += g·round_x(xhat)
template <class TX, class TO>
__global__ void rms_norm_backward_kernel(const TX* __restrict__ x, const float* __restrict__ weight,
                                         const float* __restrict__ rstd, const TO* __restrict__ grad_out,
                                         TX* __restrict__ grad_x, float* __restrict__ dweight_partial, int64_t rows,
                                         int64_t dim) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  float* dw = dweight_partial + warp * dim;
  for (int64_t c = lane; c < dim; c += 32) dw[c] = 0.f;
  for (int64_t r = warp; r < rows; r += n_warps) {
    const TX* xr = x + r * dim;
    const TO* gr = grad_out + r * dim;
    const float inv = rstd[r];
    float dot = 0.f;
    for (int64_t c = lane; c < dim; c += 32) {
      const float xhat = to_float(xr[c]) * inv;
      const float g = to_float(gr[c]);
      dot += g * weight[c] * xhat;
      dw[c] += g * to_float(from_float<TX>(xhat));
    }
    const float mean_dot = warp_sum(dot) / static_cast<float>(dim);
    TX* dxr = grad_x + r * dim;
    for (int64_t c = lane; c < dim; c += 32) {
      const float xhat = to_float(xr[c]) * inv;
      dxr[c] = from_float<TX>(inv * (to_float(gr[c]) * weight[c] - xhat * mean_dot));
    }
  }
}

}  // namespace

int64_t rms_norm_backward_partials(int64_t rows) {
  const int64_t blocks = grid_for(rows, kWarpsPerBlock, kMaxBackwardWarps / kWarpsPerBlock);
  return blocks * kWarpsPerBlock;
}

int launch_rms_norm_forward(const void* x, const float* weight, void* out, float* rstd, int64_t rows, int64_t dim,
                            float eps, int x_dtype, int out_dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = grid_for(rows, kWarpsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
    MOETRAIN_DISPATCH_DTYPE(out_dtype, TO, {
      rms_norm_forward_kernel<TX, TO><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const TX*>(x), weight, static_cast<TO*>(out), rstd, rows, dim, eps);
    })
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_rms_norm_backward(const void* x, const float* weight, const float* rstd, const void* grad_out,
                             void* grad_x, float* dweight_partial, int64_t rows, int64_t dim, int x_dtype,
                             int out_dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = static_cast<int>(rms_norm_backward_partials(rows) / kWarpsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
    MOETRAIN_DISPATCH_DTYPE(out_dtype, TO, {
      rms_norm_backward_kernel<TX, TO><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const TX*>(x), weight, rstd, static_cast<const TO*>(grad_out), static_cast<TX*>(grad_x),
          dweight_partial, rows, dim);
    })
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
