// Fused SwiGLU: one pass over gate ‖ up instead of ATen's three (silu, mul, and the
// saved intermediate). Math in fp32 whatever the storage type.
#include "models/kernels/swiglu_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))); d/du = g·σ(g)
__device__ __forceinline__ void silu_mul_grad(float g, float u, float go, float& dg, float& du) {
  const float s = 1.0f / (1.0f + __expf(-g));
  dg = go * u * s * (1.0f + g * (1.0f - s));
  du = go * g * s;
}

// Packed: gu [rows, 2·cols] holds the gate in columns [0, cols) and the up projection in
// [cols, 2·cols) of each row (one GEMM against [w1; w3]); out / grad_out [rows, cols];
// grad_gu like gu. Work item i covers four columns (vec) or one; Index is 32-bit whenever
// the item count fits, so the row split costs no 64-bit division (cf. the RoPE kernels).
template <class T, class Index>
__global__ void swiglu_packed_forward_kernel(const T* __restrict__ gu, T* __restrict__ out, Index rows, Index cols,
                                             bool vec) {
  const Index w = vec ? 4 : 1, per_row = cols / w, items = rows * per_row;
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = i / per_row, c = (i - r * per_row) * w;
    const T* g = gu + static_cast<int64_t>(r) * 2 * cols + c;
    T* o = out + static_cast<int64_t>(r) * cols + c;
    if (vec) {
      const Float4 gv = load4(g), uv = load4(g + cols);
      Float4 ov;
      for (int j = 0; j < 4; ++j) ov.v[j] = silu_mul(gv.v[j], uv.v[j]);
      store4(o, ov);
    } else {
      *o = from_float<T>(silu_mul(to_float(g[0]), to_float(g[cols])));
    }
  }
}

template <class T, class Index>
__global__ void swiglu_packed_backward_kernel(const T* __restrict__ gu, const T* __restrict__ grad_out,
                                              T* __restrict__ grad_gu, Index rows, Index cols, bool vec) {
  const Index w = vec ? 4 : 1, per_row = cols / w, items = rows * per_row;
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = i / per_row, c = (i - r * per_row) * w;
    const int64_t in = static_cast<int64_t>(r) * 2 * cols + c, o = static_cast<int64_t>(r) * cols + c;
    if (vec) {
      const Float4 gv = load4(gu + in), uv = load4(gu + in + cols), go = load4(grad_out + o);
      Float4 dg, du;
      for (int j = 0; j < 4; ++j) silu_mul_grad(gv.v[j], uv.v[j], go.v[j], dg.v[j], du.v[j]);
      store4(grad_gu + in, dg);
      store4(grad_gu + in + cols, du);
    } else {
      float dg, du;
      silu_mul_grad(to_float(gu[in]), to_float(gu[in + cols]), to_float(grad_out[o]), dg, du);
      grad_gu[in] = from_float<T>(dg);
      grad_gu[in + cols] = from_float<T>(du);
    }
  }
}

}  // namespace

namespace {

// Runs f(Index{}) with a 32-bit index type when `items` fits, else 64-bit.
template <class F>
void with_index_type(int64_t items, F&& f) {
  if (items < (int64_t{1} << 31)) {
    f(uint32_t{});
  } else {
    f(uint64_t{});
  }
}

}  // namespace

int launch_swiglu_packed_forward(const void* gu, void* out, int64_t rows, int64_t cols, int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = cols % 4 == 0 && aligned16(gu, out);
  const int64_t items = rows * (vec ? cols / 4 : cols);
  with_index_type(items, [&](auto index) {
    using Index = decltype(index);
    if (dtype == 0) {
      swiglu_packed_forward_kernel<float, Index><<<grid_for(items, kBlock), kBlock, 0, s>>>(
          static_cast<const float*>(gu), static_cast<float*>(out), rows, cols, vec);
    } else {
      swiglu_packed_forward_kernel<__nv_bfloat16, Index><<<grid_for(items, kBlock), kBlock, 0, s>>>(
          static_cast<const __nv_bfloat16*>(gu), static_cast<__nv_bfloat16*>(out), rows, cols, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

int launch_swiglu_packed_backward(const void* gu, const void* grad_out, void* grad_gu, int64_t rows, int64_t cols,
                                  int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = cols % 4 == 0 && aligned16(gu, grad_out, grad_gu);
  const int64_t items = rows * (vec ? cols / 4 : cols);
  with_index_type(items, [&](auto index) {
    using Index = decltype(index);
    if (dtype == 0) {
      swiglu_packed_backward_kernel<float, Index><<<grid_for(items, kBlock), kBlock, 0, s>>>(
          static_cast<const float*>(gu), static_cast<const float*>(grad_out), static_cast<float*>(grad_gu), rows,
          cols, vec);
    } else {
      swiglu_packed_backward_kernel<__nv_bfloat16, Index><<<grid_for(items, kBlock), kBlock, 0, s>>>(
          static_cast<const __nv_bfloat16*>(gu), static_cast<const __nv_bfloat16*>(grad_out),
          static_cast<__nv_bfloat16*>(grad_gu), rows, cols, vec);
    }
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
