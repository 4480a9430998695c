// defines: to_float, from_float, warp_sum, grid_for — small device helpers shared
// by the .cu launchers of models/kernels (fp32 math over fp32 or bf16 storage).
#pragma once

#include <cstdint>
#include <cstddef>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace moetrain::kernels {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Four consecutive elements as floats: one 16-byte (fp32) or 8-byte (bf16) access.
// p must be aligned to 4 elements (callers check dim % 4 == 0 and the base pointers).
struct Float4 {
  float v[4];
};
__device__ __forceinline__ Float4 load4(const float* p) {
  const float4 r = *reinterpret_cast<const float4*>(p);
  return {{r.x, r.y, r.z, r.w}};
}
__device__ __forceinline__ Float4 load4(const __nv_bfloat16* p) {
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&r.x);
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&r.y);
  const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
  return {{fa.x, fa.y, fb.x, fb.y}};
}
__device__ __forceinline__ void store4(float* p, const Float4& f) {
  *reinterpret_cast<float4*>(p) = make_float4(f.v[0], f.v[1], f.v[2], f.v[3]);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, const Float4& f) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(f.v[0], f.v[1]);
  const __nv_bfloat162 b = __floats2bfloat162_rn(f.v[2], f.v[3]);
  uint2 r;
  r.x = *reinterpret_cast<const unsigned int*>(&a);
  r.y = *reinterpret_cast<const unsigned int*>(&b);
  *reinterpret_cast<uint2*>(p) = r;
}
// Eight consecutive elements as floats: one 16-byte access of bf16, two of fp32 (pointers
// 16-byte aligned, 8-element offsets).
struct Float8 {
  float v[8];
};
__device__ __forceinline__ Float8 load8(const float* p) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  return {{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}};
}
// Eight bf16 values' bits (one 16-byte word) as floats.
__device__ __forceinline__ Float8 widen8(const uint4& r) {
  Float8 f;
  const unsigned int w[4] = {r.x, r.y, r.z, r.w};
  for (int j = 0; j < 4; ++j) {
    const float2 h = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[j]));
    f.v[2 * j] = h.x;
    f.v[2 * j + 1] = h.y;
  }
  return f;
}
__device__ __forceinline__ Float8 widen8(const Float8& f) { return f; }
__device__ __forceinline__ Float8 load8(const __nv_bfloat16* p) { return widen8(*reinterpret_cast<const uint4*>(p)); }
// Eight elements as loaded, before widening (4 registers of bf16, 8 of fp32): what a kernel
// holds while many loads are in flight.
template <class T>
struct Raw8Of {
  using type = Float8;
};
template <>
struct Raw8Of<__nv_bfloat16> {
  using type = uint4;
};
template <class T>
__device__ __forceinline__ typename Raw8Of<T>::type load_raw8(const T* p) {
  if constexpr (sizeof(T) == 2) return *reinterpret_cast<const uint4*>(p);
  else return load8(p);
}
__device__ __forceinline__ void store8(float* p, const Float8& f) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f.v[0], f.v[1], f.v[2], f.v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f.v[4], f.v[5], f.v[6], f.v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const Float8& f) {
  unsigned int w[4];
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f.v[2 * j], f.v[2 * j + 1]);
    w[j] = *reinterpret_cast<const unsigned int*>(&h);
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
// W (4 or 8) consecutive elements as floats through one name: Float4 / Float8.
template <int W>
struct FloatVec;
template <>
struct FloatVec<4> {
  using type = Float4;
};
template <>
struct FloatVec<8> {
  using type = Float8;
};
template <int W, class T>
__device__ __forceinline__ typename FloatVec<W>::type load_vec(const T* p) {
  if constexpr (W == 8) return load8(p);
  else return load4(p);
}
template <int W, class T>
__device__ __forceinline__ void store_vec(T* p, const typename FloatVec<W>::type& f) {
  if constexpr (W == 8) store8(p, f);
  else store4(p, f);
}
// Whether every pointer is 16-byte aligned (the 4-element accesses of fp32 need it).
template <class... P>
inline bool aligned16(const P*... p) {
  return ((reinterpret_cast<uintptr_t>(p) % 16 == 0) && ...);
}

// Row loops of one warp: with vec (dim % 4 == 0, aligned pointers) four columns per access, else one.
// Lane `lane` handles columns lane·w + k·32·w, w = 4 or 1.
template <class F>
__device__ __forceinline__ void for_columns(int64_t dim, int lane, bool vec, F&& f) {
  if (vec) {
    for (int64_t c = 4 * lane; c < dim; c += 128) f(c, 4);
  } else {
    for (int64_t c = lane; c < dim; c += 32) f(c, 1);
  }
}

template <class T>
__device__ __forceinline__ Float4 load_n(const T* p, int n) {
  if (n == 4) return load4(p);
  return {{to_float(p[0]), 0.f, 0.f, 0.f}};
}
template <class T>
__device__ __forceinline__ void store_n(T* p, const Float4& f, int n) {
  if (n == 4) {
    store4(p, f);
  } else {
    p[0] = from_float<T>(f.v[0]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Multi-tensor kernels give one block to each chunk of each tensor: the entry (ordered by its
// first_chunk field) that chunk c belongs to, by binary search.
template <class Entry>
__device__ __forceinline__ int entry_of_chunk(const Entry* __restrict__ entries, int n_entries, int64_t c) {
  int lo = 0, hi = n_entries - 1;  // the last entry whose first chunk is ≤ c
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (entries[mid].first_chunk <= c) lo = mid;
    else hi = mid - 1;
  }
  return lo;
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
