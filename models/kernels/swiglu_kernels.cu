// Fused SwiGLU: one pass over gate/up instead of ATen's three (silu, mul, and the
// saved intermediate). Math in fp32 whatever the storage type.
#include "models/kernels/swiglu_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

template <class T>
__global__ void swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                                      int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g = to_float(gate[i]);
    float s = 1.0f / (1.0f + __expf(-g));
    out[i] = from_float<T>(g * s * to_float(up[i]));
  }
}

// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))); d/du = g·σ(g)
template <class T>
__global__ void swiglu_backward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                                       const T* __restrict__ grad_out, T* __restrict__ grad_gate,
                                       T* __restrict__ grad_up, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float g = to_float(gate[i]), u = to_float(up[i]), go = to_float(grad_out[i]);
    float s = 1.0f / (1.0f + __expf(-g));
    grad_gate[i] = from_float<T>(go * u * s * (1.0f + g * (1.0f - s)));
    grad_up[i] = from_float<T>(go * g * s);
  }
}

}  // namespace

int launch_swiglu_forward(const void* gate, const void* up, void* out, int64_t n, int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) {
    swiglu_forward_kernel<float><<<grid_for(n, kBlock), kBlock, 0, s>>>(
        static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<float*>(out), n);
  } else {
    swiglu_forward_kernel<__nv_bfloat16><<<grid_for(n, kBlock), kBlock, 0, s>>>(
        static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up),
        static_cast<__nv_bfloat16*>(out), n);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_swiglu_backward(const void* gate, const void* up, const void* grad_out, void* grad_gate, void* grad_up,
                           int64_t n, int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) {
    swiglu_backward_kernel<float><<<grid_for(n, kBlock), kBlock, 0, s>>>(
        static_cast<const float*>(gate), static_cast<const float*>(up), static_cast<const float*>(grad_out),
        static_cast<float*>(grad_gate), static_cast<float*>(grad_up), n);
  } else {
    swiglu_backward_kernel<__nv_bfloat16><<<grid_for(n, kBlock), kBlock, 0, s>>>(
        static_cast<const __nv_bfloat16*>(gate), static_cast<const __nv_bfloat16*>(up),
        static_cast<const __nv_bfloat16*>(grad_out), static_cast<__nv_bfloat16*>(grad_gate),
        static_cast<__nv_bfloat16*>(grad_up), n);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
