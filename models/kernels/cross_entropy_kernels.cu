// The LM head's cross-entropy fused over each row of logits (fp32, or bf16 as the head's GEMM
// writes them under autocast; the math is fp32 either way): the forward reads a row once (online
// max and sum of exponentials) and writes its loss and logsumexp; the backward reads it once more
// and writes the logits' gradient straight in the GEMM's dtype; when the gradient is wanted
// with the loss (the LM head's gradients in the forward) one kernel does both, reading each
// row from HBM once and writing the gradient over the logits when the dtypes match. ATen's path makes five passes
// over the [n, V] fp32 chunk (log_softmax and its write, softmax, the one-hot scatter, the
// scaling, the bf16 cast).
#include "models/kernels/cross_entropy_kernels.h"

#include <cmath>

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 512;

// (max, sum of exp(x − max)) pairs: merge b into a.
__device__ __forceinline__ void merge(float& m, float& s, float om, float os) {
  if (om == -INFINITY) return;
  if (m == -INFINITY) {
    m = om;
    s = os;
    return;
  }
  const float mm = fmaxf(m, om);
  s = s * expf(m - mm) + os * expf(om - mm);
  m = mm;
}

__device__ __forceinline__ void add_one(float& m, float& s, float x) {
  if (x > m) {
    s = (m == -INFINITY ? 0.0f : s * expf(m - x)) + 1.0f;
    m = x;
  } else {
    s += expf(x - m);
  }
}

// W values at once: their max first, then one rescale of the running sum and W exponentials
// with the fast exp (add_one per value cost up to 2 accurate expf and a divergent branch each,
// and kept the kernel at ≈ 2.3 TB/s, instruction-bound: bench/NOTES.md 60). A value equal to
// the new max contributes exactly 1 (no inf − inf within a thread; `merge` across threads still
// makes a row with +inf in two threads NaN, as before); a vector of −inf contributes nothing. A
// NaN among finite values makes the sum NaN; one seen while the thread's max is still −inf (all
// else −inf) is lost, as add_one loses it.
template <class Vec>
__device__ __forceinline__ void add_vec(float& m, float& s, const Vec& v) {
  constexpr int W = sizeof(v.v) / sizeof(v.v[0]);
  float vm = v.v[0];
#pragma unroll
  for (int j = 1; j < W; ++j) vm = fmaxf(vm, v.v[j]);
  const float nm = fmaxf(m, vm);
  if (nm == -INFINITY) return;
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < W; ++j) acc += v.v[j] == nm ? 1.0f : __expf(v.v[j] - nm);
  s = (m == nm ? s : s * __expf(m - nm)) + acc;
  m = nm;
}

// Columns a thread reads at once: 8 of bf16 (one 16-byte load) or 4 of fp32.
template <class TL>
constexpr int kVecWidth = sizeof(TL) == 2 ? 8 : 4;

// The row's logsumexp, in every thread of the block (online max and sum over the row, then
// the warps' pairs merged by warp 0 and broadcast through shared memory). Once per kernel: a
// second call would rewrite the shared values before every thread has read them.
template <class TL>
__device__ float row_logsumexp(const TL* x, int64_t V, bool vec) {
  constexpr int W = kVecWidth<TL>;
  float m = -INFINITY, s = 0.0f;
  if (vec) {
    for (int64_t c = W * static_cast<int64_t>(threadIdx.x); c < V; c += W * kThreads) {
      add_vec(m, s, load_vec<W>(x + c));
    }
  } else {
    for (int64_t c = threadIdx.x; c < V; c += kThreads) add_one(m, s, to_float(x[c]));
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off), os = __shfl_xor_sync(0xffffffffu, s, off);
    merge(m, s, om, os);
  }
  __shared__ float sm[kThreads / 32], ss[kThreads / 32], result;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kThreads / 32 ? sm[lane] : -INFINITY;
    s = lane < kThreads / 32 ? ss[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, off), os = __shfl_xor_sync(0xffffffffu, s, off);
      merge(m, s, om, os);
    }
    if (lane == 0) result = m + logf(s);
  }
  __syncthreads();
  return result;
}

// The target's logit, read by thread 0 (0 for an ignored or out-of-range target).
template <class TL>
__device__ float target_logit(const TL* x, int64_t V, int64_t t) {
  return threadIdx.x == 0 && t >= 0 && t < V ? to_float(x[t]) : 0.0f;
}

// Thread 0 writes the row's loss and logsumexp from the target's logit (target_logit).
__device__ void write_row_loss(float x_t, int64_t V, int64_t t, int64_t ignore_index, float l, float* loss,
                               float* lse) {
  if (threadIdx.x != 0) return;
  *lse = l;
  *loss = t == ignore_index ? 0.0f : (t < 0 || t >= V ? NAN : l - x_t);
}

// g = (exp(x − lse) − onehot(t)) · k over the row. x and g may be the same row (the gradient
// written over bf16 logits): each element is read, then written, by one thread.
template <class TL, class T>
__device__ void write_row_grad(const TL* x, T* g, int64_t V, int64_t t, float l, float k, bool vec) {
  constexpr int W = kVecWidth<TL>;
  if (vec) {
    for (int64_t c = W * static_cast<int64_t>(threadIdx.x); c < V; c += W * kThreads) {
      auto v = load_vec<W>(x + c);
      for (int j = 0; j < W; ++j) v.v[j] = (__expf(v.v[j] - l) - (c + j == t ? 1.0f : 0.0f)) * k;
      store_vec<W>(g + c, v);
    }
  } else {
    for (int64_t c = threadIdx.x; c < V; c += kThreads)
      g[c] = from_float<T>((__expf(to_float(x[c]) - l) - (c == t ? 1.0f : 0.0f)) * k);
  }
}

template <class TL>
__global__ void cross_entropy_forward_kernel(const TL* __restrict__ logits, const int64_t* __restrict__ targets,
                                             int64_t V, int64_t ignore_index, bool vec, float* __restrict__ loss,
                                             float* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const TL* x = logits + row * V;
  const int64_t t = targets[row];
  const float x_t = target_logit(x, V, t);
  const float l = row_logsumexp(x, V, vec);
  write_row_loss(x_t, V, t, ignore_index, l, loss + row, lse + row);
}

template <class TL, class T>
__global__ void cross_entropy_backward_kernel(const TL* __restrict__ logits, const float* __restrict__ lse,
                                              const int64_t* __restrict__ targets, const float* __restrict__ scale,
                                              int64_t V, int64_t ignore_index, bool vec, T* __restrict__ grad) {
  const int64_t row = blockIdx.x, t = targets[row];
  write_row_grad(logits + row * V, grad + row * V, V, t, lse[row], t == ignore_index ? 0.0f : scale[0], vec);
}

// Both in one pass over HBM: the row's second read (for the gradient) comes from L1/L2, where
// the first one just left it (64 KB a bf16 row of a 32k vocabulary). logits and grad may alias.
template <class TL, class T>
__global__ void cross_entropy_forward_grad_kernel(const TL* logits, const int64_t* __restrict__ targets,
                                                  const float* __restrict__ scale, int64_t V, int64_t ignore_index,
                                                  bool vec, float* __restrict__ loss, float* __restrict__ lse, T* grad) {
  const int64_t row = blockIdx.x, t = targets[row];
  const TL* x = logits + row * V;
  // read before row_logsumexp's barriers: past them the other threads write the gradient,
  // over these very logits when grad aliases them
  const float x_t = target_logit(x, V, t);
  const float l = row_logsumexp(x, V, vec);
  write_row_loss(x_t, V, t, ignore_index, l, loss + row, lse + row);
  write_row_grad(x, grad + row * V, V, t, l, t == ignore_index ? 0.0f : scale[0], vec);
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

int launch_cross_entropy_forward(const void* logits, int logits_dtype, const int64_t* targets, int64_t n, int64_t V,
                                 int64_t ignore_index, float* loss, float* lse, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(logits_dtype, TL, {
    const bool vec = V % kVecWidth<TL> == 0 && aligned(logits, 16);
    cross_entropy_forward_kernel<TL><<<n, kThreads, 0, s>>>(static_cast<const TL*>(logits), targets, V, ignore_index,
                                                            vec, loss, lse);
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_cross_entropy_backward(const void* logits, int logits_dtype, const float* lse, const int64_t* targets,
                                  const float* scale, int64_t n, int64_t V, int64_t ignore_index, void* grad,
                                  int grad_dtype, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(logits_dtype, TL, {
    MOETRAIN_DISPATCH_DTYPE(grad_dtype, T, {
      const bool vec = V % kVecWidth<TL> == 0 && aligned(logits, 16) && aligned(grad, 16);  // 8- to 32-byte stores
      cross_entropy_backward_kernel<TL, T><<<n, kThreads, 0, s>>>(static_cast<const TL*>(logits), lse, targets, scale,
                                                                  V, ignore_index, vec, static_cast<T*>(grad));
    })
  })
  return static_cast<int>(cudaGetLastError());
}

int launch_cross_entropy_forward_grad(const void* logits, int logits_dtype, const int64_t* targets, const float* scale,
                                      int64_t n, int64_t V, int64_t ignore_index, float* loss, float* lse, void* grad,
                                      int grad_dtype, void* stream) {
  if (n == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  MOETRAIN_DISPATCH_DTYPE(logits_dtype, TL, {
    MOETRAIN_DISPATCH_DTYPE(grad_dtype, T, {
      const bool vec = V % kVecWidth<TL> == 0 && aligned(logits, 16) && aligned(grad, 16);
      cross_entropy_forward_grad_kernel<TL, T><<<n, kThreads, 0, s>>>(static_cast<const TL*>(logits), targets, scale, V,
                                                                      ignore_index, vec, loss, lse,
                                                                      static_cast<T*>(grad));
    })
  })
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
