// MLA query/key assembly with RoPE: one pass writes [nope | rotated rope] per head, where
// ATen ran split, cast to fp32, 6 elementwise ops, stack, cast back and cat (each way).
#include "models/kernels/mla_rope_kernels.h"

#include <initializer_list>

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

// grad_kv = [grad_k's nope | grad_v] per row, element by element (any widths, any alignment).
template <class T>
__global__ void rope_kv_backward_rows_kernel(const T* __restrict__ grad_k, const T* __restrict__ grad_v, int64_t sb,
                                             int64_t st, int64_t sh, T* __restrict__ grad_kv, int64_t rows,
                                             int64_t t_len, int64_t heads, int nope, int v_dim, int rope) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.y;
  if (row >= rows) return;
  const int width = nope + v_dim;
  const int64_t bt = row / heads, h = row % heads, b = bt / t_len, t = bt % t_len;
  const T* gk = grad_k + row * (nope + rope);
  const T* gv = grad_v + b * sb + t * st + h * sh;
  T* dst = grad_kv + row * width;
  for (int c = threadIdx.x; c < width; c += kRowThreads) dst[c] = c < nope ? gk[c] : gv[c - nope];
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

// ---- 16-byte chunks (8 bf16 or 4 fp32 elements; the pairs of the rope part never straddle a
// chunk). Taken when nope, rope and v are multiples of the chunk, every base is 16-byte aligned
// and the chunk count fits 32-bit indexing (the 32-bit divisions are cheap; 64-bit ones made
// the first per-element version 4× slower than its bytes). A thread moves one chunk.
template <class T>
struct alignas(16) Chunk {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  T v[N];
};
template <class T>
__device__ __forceinline__ Chunk<T> load_chunk(const T* p) {
  Chunk<T> c;
  *reinterpret_cast<uint4*>(&c) = *reinterpret_cast<const uint4*>(p);
  return c;
}
template <class T>
__device__ __forceinline__ void store_chunk(T* p, const Chunk<T>& c) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&c);
}
// Rotates the chunk's N/2 pairs in place; cs/sn point at the first pair's angle.
template <class T>
__device__ __forceinline__ void rotate_chunk(Chunk<T>& c, const float* cs, const float* sn, bool inverse) {
#pragma unroll
  for (int p = 0; p < Chunk<T>::N / 2; ++p) {
    const float a = to_float(c.v[2 * p]), b = to_float(c.v[2 * p + 1]);
    c.v[2 * p] = from_float<T>(rotate(a, b, cs[p], sn[p], false, inverse));
    c.v[2 * p + 1] = from_float<T>(rotate(a, b, cs[p], sn[p], true, inverse));
  }
}

template <class T>
__global__ void rope_q_chunk_kernel(const T* __restrict__ q, T* __restrict__ out, const float* __restrict__ cos,
                                    const float* __restrict__ sin, uint32_t n_chunks, uint32_t t_len, uint32_t heads,
                                    uint32_t nope, uint32_t rope, bool inverse) {
  constexpr uint32_t N = Chunk<T>::N;
  const uint32_t per_row = (nope + rope) / N;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_chunks; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / per_row, col = (i - row * per_row) * N;
    Chunk<T> c = load_chunk(q + static_cast<int64_t>(i) * N);
    if (col >= nope) {
      const uint32_t t = (row / heads) % t_len, pair = t * (rope / 2) + (col - nope) / 2;
      rotate_chunk(c, cos + pair, sin + pair, inverse);
    }
    store_chunk(out + static_cast<int64_t>(i) * N, c);
  }
}

// k = [kv's nope | rotated k_rope] and v = kv's v part, per row (b, t, h): one pass over kv.
template <class T>
__global__ void rope_kv_chunk_kernel(const T* __restrict__ kv, const T* __restrict__ k_rope, int64_t k_rope_stride,
                                     T* __restrict__ k, T* __restrict__ v, const float* __restrict__ cos,
                                     const float* __restrict__ sin, uint32_t n_chunks, uint32_t t_len, uint32_t heads,
                                     uint32_t nope, uint32_t v_dim, uint32_t rope) {
  constexpr uint32_t N = Chunk<T>::N;
  const uint32_t qk = nope + rope, per_row = (qk + v_dim) / N;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_chunks; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / per_row, col = (i - row * per_row) * N;  // col: in [k | v]
    const T* kv_row = kv + static_cast<int64_t>(row) * (nope + v_dim);
    if (col < nope) {
      store_chunk(k + static_cast<int64_t>(row) * qk + col, load_chunk(kv_row + col));
    } else if (col < qk) {
      const uint32_t bt = row / heads, t = bt % t_len, j = col - nope;
      Chunk<T> c = load_chunk(k_rope + static_cast<int64_t>(bt) * k_rope_stride + j);
      const uint32_t pair = t * (rope / 2) + j / 2;
      rotate_chunk(c, cos + pair, sin + pair, false);
      store_chunk(k + static_cast<int64_t>(row) * qk + col, c);
    } else {
      store_chunk(v + static_cast<int64_t>(row) * v_dim + (col - qk), load_chunk(kv_row + nope + (col - qk)));
    }
  }
}

// grad_kv = [grad_k's nope | grad_v] per row; grad_v's rows (b, t, h) at strides (sb, st, sh).
template <class T>
__global__ void rope_kv_backward_chunk_kernel(const T* __restrict__ grad_k, const T* __restrict__ grad_v, int64_t sb,
                                              int64_t st, int64_t sh, T* __restrict__ grad_kv, uint32_t n_chunks,
                                              uint32_t t_len, uint32_t heads, uint32_t nope, uint32_t v_dim,
                                              uint32_t rope) {
  constexpr uint32_t N = Chunk<T>::N;
  const uint32_t width = nope + v_dim, per_row = width / N;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_chunks; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / per_row, col = (i - row * per_row) * N;
    Chunk<T> c;
    if (col < nope) {
      c = load_chunk(grad_k + static_cast<int64_t>(row) * (nope + rope) + col);
    } else {
      const uint32_t bt = row / heads, h = row - bt * heads, b = bt / t_len, t = bt - b * t_len;
      c = load_chunk(grad_v + b * sb + t * st + h * sh + (col - nope));
    }
    store_chunk(grad_kv + static_cast<int64_t>(i) * N, c);
  }
}

template <class T>
bool chunks_fit(int64_t n_chunks, std::initializer_list<int64_t> dims, std::initializer_list<const void*> ptrs) {
  constexpr int64_t N = Chunk<T>::N;
  if (n_chunks >= (int64_t{1} << 31)) return false;
  for (int64_t d : dims)
    if (d % N != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace

int launch_mla_rope_q(const void* q, void* out, const float* cos, const float* sin, int64_t rows, int64_t t_len,
                      int64_t heads, int64_t nope, int64_t rope, bool inverse, int dtype, void* stream) {
  if (rows == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 block(kRowThreads, kRowsPerBlock);
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    const int64_t n_chunks = rows * (nope + rope) / Chunk<T>::N;
    if (chunks_fit<T>(n_chunks, {nope, rope}, {q, out, cos, sin})) {
      rope_q_chunk_kernel<T><<<grid_for(n_chunks, kBlock, 1 << 20), kBlock, 0, s>>>(
          static_cast<const T*>(q), static_cast<T*>(out), cos, sin, static_cast<uint32_t>(n_chunks),
          static_cast<uint32_t>(t_len), static_cast<uint32_t>(heads), static_cast<uint32_t>(nope),
          static_cast<uint32_t>(rope), inverse);
    } else {
      rope_q_kernel<T><<<row_blocks(rows), block, 0, s>>>(static_cast<const T*>(q), static_cast<T*>(out), cos, sin,
                                                           rows, t_len, heads, static_cast<int>(nope),
                                                           static_cast<int>(rope), inverse);
    }
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_mla_rope_kv_forward(const void* kv, const void* k_rope, int64_t k_rope_stride, void* k, void* v,
                               const float* cos, const float* sin, int64_t bt, int64_t t_len, int64_t heads,
                               int64_t nope, int64_t v_dim, int64_t rope, int dtype, void* stream) {
  if (bt == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t rows = bt * heads;
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    const int64_t n_chunks = rows * (nope + rope + v_dim) / Chunk<T>::N;
    if (chunks_fit<T>(n_chunks, {nope, rope, v_dim, k_rope_stride}, {kv, k_rope, k, v, cos, sin})) {
      rope_kv_chunk_kernel<T><<<grid_for(n_chunks, kBlock, 1 << 20), kBlock, 0, s>>>(
          static_cast<const T*>(kv), static_cast<const T*>(k_rope), k_rope_stride, static_cast<T*>(k),
          static_cast<T*>(v), cos, sin, static_cast<uint32_t>(n_chunks), static_cast<uint32_t>(t_len),
          static_cast<uint32_t>(heads), static_cast<uint32_t>(nope), static_cast<uint32_t>(v_dim),
          static_cast<uint32_t>(rope));
      return static_cast<int>(cudaGetLastError());
    }
    const dim3 block(kRowThreads, kRowsPerBlock);
    rope_k_forward_kernel<T><<<row_blocks(rows), block, 0, s>>>(
        static_cast<const T*>(kv), static_cast<const T*>(k_rope), k_rope_stride, static_cast<T*>(k), cos, sin, rows,
        t_len, heads, static_cast<int>(nope), static_cast<int>(v_dim), static_cast<int>(rope));
    const int err = static_cast<int>(cudaGetLastError());
    if (err != 0) return err;
    // v: the kv rows' last v_dim columns, as a strided 2-D copy
    return static_cast<int>(cudaMemcpy2DAsync(v, v_dim * sizeof(T), static_cast<const T*>(kv) + nope,
                                              (nope + v_dim) * sizeof(T), v_dim * sizeof(T), rows,
                                              cudaMemcpyDeviceToDevice, s));
  })
}

int launch_mla_rope_kv_backward(const void* grad_k, const void* grad_v, const int64_t grad_v_strides[3],
                                void* grad_kv, void* grad_k_rope, const float* cos, const float* sin, int64_t bt,
                                int64_t t_len, int64_t heads, int64_t nope, int64_t v_dim, int64_t rope, int dtype,
                                void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (bt == 0) return 0;
  const int64_t rows = bt * heads, n_rope = bt * rope;
  const int64_t sb = grad_v_strides[0], st = grad_v_strides[1], sh = grad_v_strides[2];
  MOETRAIN_DISPATCH_DTYPE(dtype, T, {
    const int64_t n_chunks = rows * (nope + v_dim) / Chunk<T>::N;
    if (chunks_fit<T>(n_chunks, {nope, rope, v_dim, sb, st, sh}, {grad_k, grad_v, grad_kv})) {
      rope_kv_backward_chunk_kernel<T><<<grid_for(n_chunks, kBlock, 1 << 20), kBlock, 0, s>>>(
          static_cast<const T*>(grad_k), static_cast<const T*>(grad_v), sb, st, sh, static_cast<T*>(grad_kv),
          static_cast<uint32_t>(n_chunks), static_cast<uint32_t>(t_len), static_cast<uint32_t>(heads),
          static_cast<uint32_t>(nope), static_cast<uint32_t>(v_dim), static_cast<uint32_t>(rope));
    } else {
      const dim3 block(kRowThreads, kRowsPerBlock);
      rope_kv_backward_rows_kernel<T><<<row_blocks(rows), block, 0, s>>>(
          static_cast<const T*>(grad_k), static_cast<const T*>(grad_v), sb, st, sh, static_cast<T*>(grad_kv), rows,
          t_len, heads, static_cast<int>(nope), static_cast<int>(v_dim), static_cast<int>(rope));
    }
    rope_k_backward_rope_kernel<T><<<grid_for(n_rope, kBlock), kBlock, 0, s>>>(
        static_cast<const T*>(grad_k), static_cast<T*>(grad_k_rope), cos, sin, n_rope, t_len, heads, nope, rope);
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
