// Fused SwiGLU: one pass over gate ‖ up instead of ATen's three (silu, mul, and the
// saved intermediate). Math in fp32 whatever the storage type.
#include "models/kernels/swiglu_kernels.h"

#include <type_traits>

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

// σ(g) with the approximate reciprocal (one MUFU.RCP): an IEEE division compiles to a dozen
// instructions with a slow path, and the routed backward runs on the few SMs the weight-gradient
// GEMM beside it leaves free, where instructions, not bytes, bound it (bench/NOTES.md 59). For
// g < −87.34 (ln 2^126) the denominator passes 2^126 and the quotient is 0, σ's limit.
__device__ __forceinline__ float sigmoid(float g) { return __fdividef(1.0f, 1.0f + __expf(-g)); }

__device__ __forceinline__ float silu_mul(float g, float u) { return g * sigmoid(g) * u; }

// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))); d/du = g·σ(g); s = σ(g)
__device__ __forceinline__ void silu_mul_grad(float g, float u, float s, float go, float& dg, float& du) {
  dg = go * u * s * (1.0f + g * (1.0f - s));
  du = go * g * s;
}

// Packed: gu [rows, 2·cols] holds the gate in columns [0, cols) and the up projection in
// [cols, 2·cols) of each row (one GEMM against [w1; w3]); out / grad_out [rows, cols];
// grad_gu like gu. Work item i covers W columns: 8 of bf16 (16-byte accesses; the backward
// ran at ≈ 2.6 TB/s with 8-byte ones, bench/NOTES.md 53), 4, or 1. Index is 32-bit whenever
// the item count fits, so the row split costs no 64-bit division (cf. the RoPE kernels).
// row_scale (nullptr: none): out[r] = row_scale[r] · silu(g)·u, scaled in fp32 before the one rounding.
template <class T, class Index, int W>
__global__ void swiglu_packed_forward_kernel(const T* __restrict__ gu, const float* __restrict__ row_scale,
                                             T* __restrict__ out, Index rows, Index cols) {
  const Index per_row = cols / W, items = rows * per_row;
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = i / per_row, c = (i - r * per_row) * W;
    const T* g = gu + static_cast<int64_t>(r) * 2 * cols + c;
    T* o = out + static_cast<int64_t>(r) * cols + c;
    const float s = row_scale ? row_scale[r] : 1.0f;
    if constexpr (W > 1) {
      const auto gv = load_vec<W>(g), uv = load_vec<W>(g + cols);
      auto ov = gv;
      for (int j = 0; j < W; ++j) ov.v[j] = s * silu_mul(gv.v[j], uv.v[j]);
      store_vec<W>(o, ov);
    } else {
      *o = from_float<T>(s * silu_mul(to_float(g[0]), to_float(g[cols])));
    }
  }
}

template <class T, class Index, int W>
__global__ void swiglu_packed_backward_kernel(const T* __restrict__ gu, const T* __restrict__ grad_out,
                                              T* __restrict__ grad_gu, Index rows, Index cols) {
  const Index per_row = cols / W, items = rows * per_row;
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < items;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = i / per_row, c = (i - r * per_row) * W;
    const int64_t in = static_cast<int64_t>(r) * 2 * cols + c, o = static_cast<int64_t>(r) * cols + c;
    if constexpr (W > 1) {
      const auto gv = load_vec<W>(gu + in), uv = load_vec<W>(gu + in + cols), go = load_vec<W>(grad_out + o);
      auto dg = gv, du = uv;
      for (int j = 0; j < W; ++j) silu_mul_grad(gv.v[j], uv.v[j], sigmoid(gv.v[j]), go.v[j], dg.v[j], du.v[j]);
      store_vec<W>(grad_gu + in, dg);
      store_vec<W>(grad_gu + in + cols, du);
    } else {
      const float gf = to_float(gu[in]);
      float dg, du;
      silu_mul_grad(gf, to_float(gu[in + cols]), sigmoid(gf), to_float(grad_out[o]), dg, du);
      grad_gu[in] = from_float<T>(dg);
      grad_gu[in + cols] = from_float<T>(du);
    }
  }
}

// The scaled backward: out = s·silu(g)·u per row r, so d/dg and d/du take grad_out·s, and
// grad_scale[r] = Σ_c grad_out[r, c]·silu(g)·u — a row sum, hence one warp a row (lane `lane`
// owns columns lane·W + k·32·W; the warp's sum is deterministic, no atomics).
template <class T, int W>
__global__ void swiglu_scaled_backward_kernel(const T* __restrict__ gu, const T* __restrict__ grad_out,
                                              const float* __restrict__ row_scale, T* __restrict__ grad_gu,
                                              float* __restrict__ grad_scale, int64_t rows, int64_t cols) {
  const int lane = threadIdx.x % 32;
  const int64_t first = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = first; r < rows; r += stride) {
    const float s = row_scale[r];
    const T* g = gu + r * 2 * cols;
    const T* go = grad_out + r * cols;
    T* dgu = grad_gu + r * 2 * cols;
    float dot = 0.f;
    for (int64_t c = static_cast<int64_t>(lane) * W; c < cols; c += 32 * W) {
      if constexpr (W > 1) {
        const auto gv = load_vec<W>(g + c), uv = load_vec<W>(g + cols + c), gov = load_vec<W>(go + c);
        auto dg = gv, du = uv;
        for (int j = 0; j < W; ++j) {
          const float sg = sigmoid(gv.v[j]);
          dot += gov.v[j] * gv.v[j] * sg * uv.v[j];
          silu_mul_grad(gv.v[j], uv.v[j], sg, gov.v[j] * s, dg.v[j], du.v[j]);
        }
        store_vec<W>(dgu + c, dg);
        store_vec<W>(dgu + cols + c, du);
      } else {
        const float gf = to_float(g[c]), uf = to_float(g[cols + c]), gof = to_float(go[c]);
        const float sg = sigmoid(gf);
        float dg, du;
        dot += gof * gf * sg * uf;
        silu_mul_grad(gf, uf, sg, gof * s, dg, du);
        dgu[c] = from_float<T>(dg);
        dgu[cols + c] = from_float<T>(du);
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) grad_scale[r] = dot;
  }
}

// Runs f(Index{}) with a 32-bit index type when `items` fits, else 64-bit.
template <class F>
void with_index_type(int64_t items, F&& f) {
  if (items < (int64_t{1} << 31)) {
    f(uint32_t{});
  } else {
    f(uint64_t{});
  }
}

// Columns a work item covers: 8 for bf16 (16 bytes), 4 for fp32 (16 bytes) or bf16 (8), else 1.
template <class T>
int swiglu_width(int64_t cols, bool aligned) {
  if (!aligned) return 1;
  if (sizeof(T) == 2 && cols % 8 == 0) return 8;
  return cols % 4 == 0 ? 4 : 1;
}

// Runs launch(T{}, Index{}, std::integral_constant<int, W>{}) for the dtype, the index type and
// the width that fit.
template <class F>
void dispatch_swiglu(int dtype, int64_t rows, int64_t cols, bool aligned, F&& launch) {
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    const int w = swiglu_width<T>(cols, aligned);
    with_index_type(rows * (cols / w), [&](auto index) {
      if (w == 8) launch(T{}, index, std::integral_constant<int, 8>{});
      else if (w == 4) launch(T{}, index, std::integral_constant<int, 4>{});
      else launch(T{}, index, std::integral_constant<int, 1>{});
    });
  })
}

}  // namespace

int launch_swiglu_packed_forward(const void* gu, const float* row_scale, void* out, int64_t rows, int64_t cols,
                                 int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_swiglu(dtype, rows, cols, aligned16(gu, out), [&](auto t, auto index, auto width) {
    using T = decltype(t);
    using Index = decltype(index);
    constexpr int W = decltype(width)::value;
    swiglu_packed_forward_kernel<T, Index, W><<<grid_for(rows * (cols / W), kBlock), kBlock, 0, s>>>(
        static_cast<const T*>(gu), row_scale, static_cast<T*>(out), static_cast<Index>(rows),
        static_cast<Index>(cols));
  });
  return static_cast<int>(cudaGetLastError());
}

int launch_swiglu_packed_backward(const void* gu, const void* grad_out, void* grad_gu, int64_t rows, int64_t cols,
                                  int dtype, void* stream) {
  constexpr int kBlock = 256;
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_swiglu(dtype, rows, cols, aligned16(gu, grad_out, grad_gu), [&](auto t, auto index, auto width) {
    using T = decltype(t);
    using Index = decltype(index);
    constexpr int W = decltype(width)::value;
    swiglu_packed_backward_kernel<T, Index, W><<<grid_for(rows * (cols / W), kBlock), kBlock, 0, s>>>(
        static_cast<const T*>(gu), static_cast<const T*>(grad_out), static_cast<T*>(grad_gu),
        static_cast<Index>(rows), static_cast<Index>(cols));
  });
  return static_cast<int>(cudaGetLastError());
}

int launch_swiglu_scaled_backward(const void* gu, const void* grad_out, const float* row_scale, void* grad_gu,
                                  float* grad_scale, int64_t rows, int64_t cols, int dtype, void* stream) {
  constexpr int kBlock = 256, kRowsPerBlock = kBlock / 32;
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = grid_for(rows, kRowsPerBlock);  // one warp a row
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    const int w = swiglu_width<T>(cols, aligned16(gu, grad_out, grad_gu));
    auto launch = [&](auto width) {
      constexpr int W = decltype(width)::value;
      swiglu_scaled_backward_kernel<T, W><<<grid, kBlock, 0, s>>>(static_cast<const T*>(gu),
                                                                  static_cast<const T*>(grad_out), row_scale,
                                                                  static_cast<T*>(grad_gu), grad_scale, rows, cols);
    };
    if (w == 8) launch(std::integral_constant<int, 8>{});
    else if (w == 4) launch(std::integral_constant<int, 4>{});
    else launch(std::integral_constant<int, 1>{});
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
