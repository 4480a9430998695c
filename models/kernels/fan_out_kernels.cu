// A three-way sum in one pass: the gradient of a tensor read by three branches (the MoE
// layer's input: router, shared experts, routed experts) — autograd's own accumulation is two
// adds, two passes writing [N, D] each (bench/NOTES.md 52).
#include "models/kernels/fan_out_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 256;

template <class T, int W>
__global__ void sum3_kernel(const T* a, const T* b, const T* c, T* out, int64_t n, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  if (vec) {  // W elements an access; the tail (n % W) below
    const int64_t n_vec = n / W;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n_vec; i += stride) {
      auto s = load_vec<W>(a + i * W);
      const auto y = load_vec<W>(b + i * W);
      for (int j = 0; j < W; ++j) s.v[j] += y.v[j];
      if (c) {
        const auto z = load_vec<W>(c + i * W);
        for (int j = 0; j < W; ++j) s.v[j] += z.v[j];
      }
      store_vec<W>(out + i * W, s);
    }
  }
  for (int64_t i = (vec ? n / W * W : 0) + blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += stride)
    out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]) + (c ? to_float(c[i]) : 0.0f));
}

}  // namespace

int launch_sum3(const void* a, const void* b, const void* c, void* out, int64_t n, int dtype, void* stream) {
  if (n == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    constexpr int W = sizeof(T) == 2 ? 8 : 4;  // 16-byte accesses
    const bool vec = aligned16(a, b, out) && (!c || aligned16(c));
    const int blocks = grid_for((vec ? n / W : n) + 1, kThreads, 132 * 8);
    sum3_kernel<T, W><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                  static_cast<const T*>(c), static_cast<T*>(out), n, vec);
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
