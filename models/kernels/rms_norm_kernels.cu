// Fused RMSNorm: one warp per row, fp32 math. Forward reads x once (twice from L1/L2)
// and writes out + rstd (with a residual: reads x and delta, writes their sum too); backward writes grad_x and the weight gradient's per-warp
// partial sums (no atomics: each warp owns one row of the partial buffer).
#include "models/kernels/rms_norm_kernels.h"

#include "models/kernels/cuda_common.cuh"

#include <algorithm>

namespace moetrain::kernels {

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxBackwardWarps = 2048;  // rows of the dweight partial buffer

// delta (nullable): the norm is of h = round_x(x + delta), which is written to sum_out (each
// lane reads back only the columns it wrote, so the second pass sees its own stores).
// x_stride: elements between x's rows (≥ dim: a column slice of a wider matrix reads in place).
template <class TX, class TO>
__global__ void rms_norm_forward_kernel(const TX* __restrict__ x, int64_t x_stride, const TX* __restrict__ delta,
                                        TX* sum_out, const float* __restrict__ weight, TO* __restrict__ out,
                                        float* __restrict__ rstd, int64_t rows, int64_t dim, float eps, bool vec) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += n_warps) {
    const TX* xr = delta ? sum_out + r * dim : x + r * x_stride;  // the normalized input
    float ss = 0.f;
    for_columns(dim, lane, vec, [&](int64_t c, int n) {
      Float4 v = load_n(x + r * x_stride + c, n);
      if (delta) {
        const Float4 d = load_n(delta + r * dim + c, n);
        for (int j = 0; j < n; ++j) v.v[j] = to_float(from_float<TX>(v.v[j] + d.v[j]));  // as ATen's add rounds
        store_n(sum_out + r * dim + c, v, n);
      }
      for (int j = 0; j < n; ++j) ss += v.v[j] * v.v[j];
    });
    const float inv = rsqrtf(warp_sum(ss) / static_cast<float>(dim) + eps);
    if (lane == 0) rstd[r] = inv;
    TO* orow = out + r * dim;
    for_columns(dim, lane, vec, [&](int64_t c, int n) {
      const Float4 v = load_n(xr + c, n), w = load_n(weight + c, n);
      Float4 o;
      // as the reference: normalize in fp32, round to x's dtype, then scale in fp32
      for (int j = 0; j < n; ++j) o.v[j] = w.v[j] * to_float(from_float<TX>(v.v[j] * inv));
      store_n(orow + c, o, n);
    });
  }
}

// xhat = x·r, dn = g·w: dx = r·(dn − xhat·mean(dn·xhat)) (+ grad_residual); dw += g·round_x(xhat)
template <class TX, class TO>
__global__ void rms_norm_backward_kernel(const TX* __restrict__ x, int64_t x_stride, const float* __restrict__ weight,
                                         const float* __restrict__ rstd, const TO* __restrict__ grad_out,
                                         const TX* __restrict__ grad_residual, TX* __restrict__ grad_x,
                                         float* __restrict__ dweight_partial, int64_t rows, int64_t dim, bool vec) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + threadIdx.x / 32;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  float* dw = dweight_partial + warp * dim;
  for_columns(dim, lane, vec, [&](int64_t c, int n) { store_n(dw + c, Float4{{0.f, 0.f, 0.f, 0.f}}, n); });
  for (int64_t r = warp; r < rows; r += n_warps) {
    const TX* xr = x + r * x_stride;
    const TO* gr = grad_out + r * dim;
    const float inv = rstd[r];
    float dot = 0.f;
    for_columns(dim, lane, vec, [&](int64_t c, int n) {
      const Float4 v = load_n(xr + c, n), g = load_n(gr + c, n), w = load_n(weight + c, n);
      Float4 acc = load_n(dw + c, n);
      for (int j = 0; j < n; ++j) {
        const float xhat = v.v[j] * inv;
        dot += g.v[j] * w.v[j] * xhat;
        acc.v[j] += g.v[j] * to_float(from_float<TX>(xhat));
      }
      store_n(dw + c, acc, n);
    });
    const float mean_dot = warp_sum(dot) / static_cast<float>(dim);
    TX* dxr = grad_x + r * dim;
    for_columns(dim, lane, vec, [&](int64_t c, int n) {
      const Float4 v = load_n(xr + c, n), g = load_n(gr + c, n), w = load_n(weight + c, n);
      Float4 dx;
      for (int j = 0; j < n; ++j) dx.v[j] = inv * (g.v[j] * w.v[j] - v.v[j] * inv * mean_dot);
      if (grad_residual) {
        const Float4 gres = load_n(grad_residual + r * dim + c, n);
        for (int j = 0; j < n; ++j) dx.v[j] += gres.v[j];
      }
      store_n(dxr + c, dx, n);
    });
  }
}

// Four elements as loaded (bf16: two registers), converted to fp32 where used.
template <class T>
struct alignas(4 * sizeof(T)) Raw4 {
  T v[4];
};
template <class T>
__device__ __forceinline__ Raw4<T> load_raw4(const T* p) {
  return *reinterpret_cast<const Raw4<T>*>(p);
}

// The same backward for dim ≤ 128·VECS with four-column accesses. The row's x, grad and
// residual gradient are loaded together in one round trip and kept in registers as loaded.
// The weight-gradient partial is kept in fp32 in shared memory (each lane owns its columns of
// its warp's row, so no barrier until the end), which leaves the registers to the loads: at
// ≤ 80 registers three blocks (24 warps) fit an SM, against two when the partial sat in
// registers and the residual took a second round trip (bench/NOTES.md 42). The block's warps
// are summed in shared memory at the end: one partial row per block.
template <int VECS>
constexpr int kBackwardBlocksPerSM = VECS <= 4 ? 3 : 2;  // 1024 columns: x, grad and residual need ≤ 128 registers

template <class TX, class TO, int VECS>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kBackwardBlocksPerSM<VECS>)
    rms_norm_backward_reg_kernel(const TX* __restrict__ x, int64_t x_stride, const float* __restrict__ weight,
                                 const float* __restrict__ rstd, const TO* __restrict__ grad_out,
                                 const TX* __restrict__ grad_residual, TX* __restrict__ grad_x,
                                 float* __restrict__ dweight_partial, int64_t rows, int64_t dim) {
  __shared__ float4 block_dw[kWarpsPerBlock][VECS * 32];
  const int lane = threadIdx.x % 32, warp_in_block = threadIdx.x / 32;
  const int64_t warp = blockIdx.x * static_cast<int64_t>(kWarpsPerBlock) + warp_in_block;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  float4* acc = block_dw[warp_in_block];  // this warp's partial row: lane's columns at lane + 32·k
#pragma unroll
  for (int k = 0; k < VECS; ++k) acc[lane + 32 * k] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int64_t r = warp; r < rows; r += n_warps) {
    const float inv = rstd[r];
    Raw4<TX> xv[VECS], rv[VECS];
    Raw4<TO> gv[VECS];
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
      const int64_t c = 4 * lane + 128 * k;
      if (c >= dim) continue;
      xv[k] = load_raw4(x + r * x_stride + c);
      gv[k] = load_raw4(grad_out + r * dim + c);
      if (grad_residual) rv[k] = load_raw4(grad_residual + r * dim + c);
    }
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
      const int64_t c = 4 * lane + 128 * k;
      if (c >= dim) continue;
      const Float4 w = load4(weight + c);
      float4 a = acc[lane + 32 * k];
      float* av = reinterpret_cast<float*>(&a);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float g = to_float(gv[k].v[j]), xhat = to_float(xv[k].v[j]) * inv;
        dot += g * w.v[j] * xhat;
        av[j] += g * to_float(from_float<TX>(xhat));
      }
      acc[lane + 32 * k] = a;
    }
    const float mean_dot = warp_sum(dot) / static_cast<float>(dim);
#pragma unroll
    for (int k = 0; k < VECS; ++k) {
      const int64_t c = 4 * lane + 128 * k;
      if (c >= dim) continue;
      const Float4 w = load4(weight + c);
      Float4 dx;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dx.v[j] = inv * (to_float(gv[k].v[j]) * w.v[j] - to_float(xv[k].v[j]) * inv * mean_dot);
        if (grad_residual) dx.v[j] += to_float(rv[k].v[j]);
      }
      store4(grad_x + r * dim + c, dx);
    }
  }
  __syncthreads();
  const float* dw = reinterpret_cast<const float*>(&block_dw[0][0]);  // [warps][VECS·128]: column c at c
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) sum += dw[w * VECS * 128 + c];
    dweight_partial[blockIdx.x * dim + c] = sum;
  }
}

// The weight gradient from the backward's partial rows: [rows, dim] fp32 -> [dim]. A block owns
// 32 columns; its 16 warps stride the rows (each warp reads 128 contiguous bytes a row), then
// one warp adds the 16 sums in a fixed order (deterministic). ATen's sum(0) over the same
// [264, 1024] buffer took ≈ 9 µs a call, 49 calls a bench-1b step (bench/NOTES.md 51).
constexpr int kColumnSumRows = 16;
__global__ void __launch_bounds__(32 * kColumnSumRows)
    column_sum_kernel(const float* __restrict__ in, int64_t rows, int64_t dim, float* __restrict__ out) {
  __shared__ float part[kColumnSumRows][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < dim) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < rows; r += kColumnSumRows) s += in[r * dim + c];
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < dim) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kColumnSumRows; ++w) t += part[w][threadIdx.x];
    out[c] = t;
  }
}

}  // namespace

int launch_column_sum(const float* in, int64_t rows, int64_t dim, float* out, void* stream) {
  if (dim == 0) return 0;
  const dim3 block(32, kColumnSumRows);
  const auto blocks = static_cast<unsigned>((dim + 31) / 32);
  column_sum_kernel<<<blocks, block, 0, static_cast<cudaStream_t>(stream)>>>(in, rows, dim, out);
  return static_cast<int>(cudaGetLastError());
}

int64_t rms_norm_backward_partials(int64_t rows) {
  const int64_t blocks = grid_for(rows, kWarpsPerBlock, kMaxBackwardWarps / kWarpsPerBlock);
  return blocks * kWarpsPerBlock;
}

int launch_rms_norm_forward(const void* x, int64_t x_stride, const void* delta, void* sum_out, const float* weight,
                            void* out, float* rstd, int64_t rows, int64_t dim, float eps, int x_dtype, int out_dtype,
                            void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = grid_for(rows, kWarpsPerBlock);
  const bool vec = dim % 4 == 0 && x_stride % 4 == 0 && aligned16(x, weight, out) && (!delta || aligned16(delta, sum_out));
  MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
    MOETRAIN_DISPATCH_DTYPE(out_dtype, TO, {
      rms_norm_forward_kernel<TX, TO><<<blocks, kWarpsPerBlock * 32, 0, s>>>(
          static_cast<const TX*>(x), x_stride, static_cast<const TX*>(delta), static_cast<TX*>(sum_out), weight,
          static_cast<TO*>(out), rstd, rows, dim, eps, vec);
    })
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_rms_norm_backward(const void* x, int64_t x_stride, const float* weight, const float* rstd,
                             const void* grad_out, const void* grad_residual, void* grad_x, float* dweight_partial,
                             int64_t* partial_rows_written, int64_t rows, int64_t dim, int x_dtype, int out_dtype,
                             void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = dim % 4 == 0 && x_stride % 4 == 0 && aligned16(x, weight, grad_out, grad_x, dweight_partial) &&
                   (!grad_residual || aligned16(grad_residual));
  const int threads = kWarpsPerBlock * 32;
  // The generic kernel: one partial row per warp, as many warps as the buffer has rows.
  // The register kernels: one partial row per block, as many blocks as fit the SMs at once.
  const int64_t partial_rows = rms_norm_backward_partials(rows);
  const int max_blocks = static_cast<int>(partial_rows / kWarpsPerBlock);
  static const int sms = [] {
    int dev = 0, n = 132;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      n = 132;
    return n;
  }();
  auto reg_blocks = [&](int per_sm) {
    return grid_for(rows, kWarpsPerBlock, std::min(partial_rows, static_cast<int64_t>(sms) * per_sm));
  };
  MOETRAIN_DISPATCH_DTYPE(x_dtype, TX, {
    MOETRAIN_DISPATCH_DTYPE(out_dtype, TO, {
      const auto* xp = static_cast<const TX*>(x);
      const auto* gp = static_cast<const TO*>(grad_out);
      const auto* rp = static_cast<const TX*>(grad_residual);
      auto* dxp = static_cast<TX*>(grad_x);
      int blocks = max_blocks;
      if (vec && dim <= 256) {
        blocks = reg_blocks(kBackwardBlocksPerSM<2>);
        rms_norm_backward_reg_kernel<TX, TO, 2>
            <<<blocks, threads, 0, s>>>(xp, x_stride, weight, rstd, gp, rp, dxp, dweight_partial, rows, dim);
      } else if (vec && dim <= 512) {
        blocks = reg_blocks(kBackwardBlocksPerSM<4>);
        rms_norm_backward_reg_kernel<TX, TO, 4>
            <<<blocks, threads, 0, s>>>(xp, x_stride, weight, rstd, gp, rp, dxp, dweight_partial, rows, dim);
      } else if (vec && dim <= 1024) {
        blocks = reg_blocks(kBackwardBlocksPerSM<8>);
        rms_norm_backward_reg_kernel<TX, TO, 8>
            <<<blocks, threads, 0, s>>>(xp, x_stride, weight, rstd, gp, rp, dxp, dweight_partial, rows, dim);
      } else {
        rms_norm_backward_kernel<TX, TO>
            <<<blocks, threads, 0, s>>>(xp, x_stride, weight, rstd, gp, rp, dxp, dweight_partial, rows, dim, vec);
      }
      *partial_rows_written = vec && dim <= 1024 ? blocks : static_cast<int64_t>(blocks) * kWarpsPerBlock;
    })
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
