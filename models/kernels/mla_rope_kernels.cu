// MLA query/key assembly with RoPE: one pass writes [nope | rotated rope] per head, where
// ATen ran split, cast to fp32, 6 elementwise ops, stack, cast back and cat (each way).
#include "models/kernels/mla_rope_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kBlock = 256;

// Element c of a rope part whose pair is (a, b) = (x[c & ~1], x[c | 1]) at angle (cs, sn).
// forward: (a cs − b sn, a sn + b cs); inverse (the transpose): (a cs + b sn, −a sn + b cs).
__device__ __forceinline__ float rotate(float a, float b, float cs, float sn, bool odd, bool inverse) {
  if (inverse) sn = -sn;
  return odd ? a * sn + b * cs : a * cs - b * sn;
}

// The row kernels give one row — (b·T + t)·H + h — to each threadIdx.y and stride its columns
// over threadIdx.x: the position t is one division per row, not 64-bit divisions per element.
constexpr int kRowThreads = 32, kRowsPerBlock = 8;

inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

template <class T>
__global__ void rope_q_kernel(const T* __restrict__ q, T* __restrict__ out, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t rows, int64_t t_len, int64_t heads, int nope,
                              int rope, bool inverse) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int qk = nope + rope;
  const int64_t t = (row / heads) % t_len;
  const T* src = q + row * qk;
  T* dst = out + row * qk;
  const float* cs = cos + t * (rope / 2);
  const float* sn = sin + t * (rope / 2);
  for (int c = threadIdx.x; c < qk; c += kRowThreads) {
    if (c < nope) {
      dst[c] = src[c];
      continue;
    }
    const int j = c - nope, pair = j / 2;
    dst[c] = from_float<T>(rotate(to_float(src[nope + 2 * pair]), to_float(src[nope + 2 * pair + 1]), cs[pair], sn[pair],
                                  j & 1, inverse));
  }
}

template <class T>
__global__ void rope_k_forward_kernel(const T* __restrict__ kv, const T* __restrict__ k_rope, int64_t k_rope_stride,
                                      T* __restrict__ k, const float* __restrict__ cos, const float* __restrict__ sin,
                                      int64_t rows, int64_t t_len, int64_t heads, int nope, int v_dim, int rope) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;  // (b·T + t)·H + h
  if (row >= rows) return;
  const int qk = nope + rope;
  const int64_t bt = row / heads, t = bt % t_len;
  const T* kv_row = kv + row * (nope + v_dim);
  const T* rope_row = k_rope + bt * k_rope_stride;
  T* dst = k + row * qk;
  const float* cs = cos + t * (rope / 2);
  const float* sn = sin + t * (rope / 2);
  for (int c = threadIdx.x; c < qk; c += kRowThreads) {
    if (c < nope) {
      dst[c] = kv_row[c];
      continue;
    }
    const int j = c - nope, pair = j / 2;
    dst[c] = from_float<T>(rotate(to_float(rope_row[2 * pair]), to_float(rope_row[2 * pair + 1]), cs[pair], sn[pair],
                                  j & 1, false));
  }
}

template <class T>
__global__ void rope_k_backward_kv_kernel(const T* __restrict__ grad_k, T* __restrict__ grad_kv, int64_t rows,
                                          int nope, int v_dim, int rope) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int width = nope + v_dim;
  const T* src = grad_k + row * (nope + rope);
  T* dst = grad_kv + row * width;
  for (int c = threadIdx.x; c < width; c += kRowThreads) dst[c] = c < nope ? src[c] : from_float<T>(0.f);
}

template <class T>
__global__ void rope_k_backward_rope_kernel(const T* __restrict__ grad_k, T* __restrict__ grad_k_rope,
                                            const float* __restrict__ cos, const float* __restrict__ sin, int64_t n,
                                            int64_t t_len, int64_t heads, int64_t nope, int64_t rope) {
  const int64_t qk = nope + rope;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % rope, bt = i / rope, t = bt % t_len, pair = j / 2;
    const float cs = cos[t * (rope / 2) + pair], sn = sin[t * (rope / 2) + pair];
    float acc = 0.f;
    for (int64_t h = 0; h < heads; ++h) {
      const T* g = grad_k + (bt * heads + h) * qk + nope + 2 * pair;
      acc += rotate(to_float(g[0]), to_float(g[1]), cs, sn, j & 1, true);
    }
    grad_k_rope[i] = from_float<T>(acc);
  }
}

}  // namespace

int launch_mla_rope_q(const void* q, void* out, const float* cos, const float* sin, int64_t rows, int64_t t_len,
                      int64_t heads, int64_t nope, int64_t rope, bool inverse, int dtype, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 block(kRowThreads, kRowsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    rope_q_kernel<T><<<row_blocks(rows), block, 0, s>>>(static_cast<const T*>(q), static_cast<T*>(out), cos, sin, rows,
                                                         t_len, heads, static_cast<int>(nope), static_cast<int>(rope),
                                                         inverse);
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_mla_rope_k_forward(const void* kv, const void* k_rope, int64_t k_rope_stride, void* k, const float* cos,
                              const float* sin, int64_t bt, int64_t t_len, int64_t heads, int64_t nope, int64_t v_dim,
                              int64_t rope, int dtype, void* stream) {
  if (bt == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t rows = bt * heads;
  const dim3 block(kRowThreads, kRowsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    rope_k_forward_kernel<T><<<row_blocks(rows), block, 0, s>>>(
        static_cast<const T*>(kv), static_cast<const T*>(k_rope), k_rope_stride, static_cast<T*>(k), cos, sin, rows,
        t_len, heads, static_cast<int>(nope), static_cast<int>(v_dim), static_cast<int>(rope));
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_mla_rope_k_backward(const void* grad_k, void* grad_kv, void* grad_k_rope, const float* cos,
                               const float* sin, int64_t bt, int64_t t_len, int64_t heads, int64_t nope,
                               int64_t v_dim, int64_t rope, int dtype, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (bt == 0) return 0;
  const int64_t rows = bt * heads, n_rope = bt * rope;
  const dim3 block(kRowThreads, kRowsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    rope_k_backward_kv_kernel<T><<<row_blocks(rows), block, 0, s>>>(
        static_cast<const T*>(grad_k), static_cast<T*>(grad_kv), rows, static_cast<int>(nope), static_cast<int>(v_dim),
        static_cast<int>(rope));
    rope_k_backward_rope_kernel<T><<<grid_for(n_rope, kBlock), kBlock, 0, s>>>(
        static_cast<const T*>(grad_k), static_cast<T*>(grad_k_rope), cos, sin, n_rope, t_len, heads, nope, rope);
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
