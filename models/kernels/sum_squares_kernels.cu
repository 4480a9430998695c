// Σ x² over a list of fp32/bf16 tensors in one launch: a block per 64K-element chunk of any
// tensor (the master AdamW kernel's layout) writes its partial sum; the caller adds the
// partials (deterministic: no atomics). ATen's _foreach_norm takes one kernel per tensor
// when the list mixes dtypes or the norm's dtype differs from the gradients'.
#include "models/kernels/sum_squares_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 512;

template <class T>
__device__ __forceinline__ float chunk_sum_squares(const T* x, int64_t begin, int64_t end, bool vec) {
  float acc = 0.0f;
  if (vec) {  // begin and the chunk are multiples of 4: so is every i
    for (int64_t i = begin + 4 * threadIdx.x; i + 3 < end; i += 4 * kThreads) {
      const Float4 v = load4(x + i);
      for (int j = 0; j < 4; ++j) acc += v.v[j] * v.v[j];
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      const float v = to_float(x[i]);
      acc += v * v;
    }
  }
  return acc;
}

// Σ x² of chunk c (local to t) by the whole block; the result in thread 0.
__device__ __forceinline__ float block_chunk_sum_squares(const SumSquaresTensor& t, int64_t c, int64_t chunk) {
  const int64_t begin = c * chunk;
  const int64_t end = begin + chunk < t.numel ? begin + chunk : t.numel;
  float acc = t.dtype == 1 ? chunk_sum_squares(static_cast<const __nv_bfloat16*>(t.data), begin, end, t.vec)
                           : chunk_sum_squares(static_cast<const float*>(t.data), begin, end, t.vec);
  acc = warp_sum(acc);
  __shared__ float warps[kThreads / 32];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < kThreads / 32 ? warps[threadIdx.x] : 0.0f;
    acc = warp_sum(acc);
  }
  return acc;
}

__global__ void sum_squares_kernel(const SumSquaresTensor* __restrict__ tensors, int n_tensors, int64_t chunk,
                                   float* __restrict__ partials) {
  const int64_t c = blockIdx.x;
  const SumSquaresTensor t = tensors[entry_of_chunk(tensors, n_tensors, c)];
  const float acc = block_chunk_sum_squares(t, c - t.first_chunk, chunk);
  if (threadIdx.x == 0) partials[c] = acc;
}

// One tensor passed by value: no table in device memory (so a graph capture holds no pointer
// into a host staging buffer).
__global__ void sum_squares_one_kernel(SumSquaresTensor t, int64_t chunk, float* __restrict__ partials) {
  const float acc = block_chunk_sum_squares(t, blockIdx.x, chunk);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace

int launch_sum_squares(const SumSquaresTensor* tensors, int n_tensors, int64_t n_chunks, int64_t chunk, float* partials,
                       void* stream) {
  if (n_tensors == 0 || n_chunks == 0) return 0;
  sum_squares_kernel<<<static_cast<unsigned>(n_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tensors, n_tensors, chunk, partials);
  return static_cast<int>(cudaGetLastError());
}

int launch_sum_squares_one(SumSquaresTensor t, int64_t chunk, float* partials, void* stream) {
  const int64_t n_chunks = (t.numel + chunk - 1) / chunk;
  if (n_chunks == 0) return 0;
  sum_squares_one_kernel<<<static_cast<unsigned>(n_chunks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      t, chunk, partials);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
