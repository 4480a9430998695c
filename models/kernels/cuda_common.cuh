// defines: to_float, from_float, warp_sum, grid_for — small device helpers shared
// by the .cu launchers of models/kernels (fp32 math over fp32 or bf16 storage).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace moetrain::kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Blocks for a grid-stride loop over n items, block items per block, capped at `cap`.
inline int grid_for(int64_t n, int block, int64_t cap = 65535) {
  int64_t blocks = (n + block - 1) / block;
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < cap ? blocks : cap);
}

// dtype codes shared with the C++ wrappers: 0 = float32, 1 = bfloat16.
#define MOETRAIN_DISPATCH_DTYPE(code, T, ...)  \
  if ((code) == 0) {                           \
    using T = float;                           \
    __VA_ARGS__                                \
  } else {                                     \
    using T = __nv_bfloat16;                   \
    __VA_ARGS__                                \
  }

}  // namespace moetrain::kernels
