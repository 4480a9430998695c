// The fused master-weight AdamW step: one block per chunk of one parameter (found by a binary
// search over the tensors' first chunks), fp32 math, the bf16 weight written from the new
// master in the same pass.
#include "models/kernels/master_adamw_kernels.h"

#include "models/kernels/cuda_common.cuh"

namespace moetrain::kernels {

namespace {

constexpr int kThreads = 512;

struct Moments {
  float m, v;
};

// AdamW on one element; returns the new master (m, v updated in place).
__device__ __forceinline__ float adamw(float master, float g, Moments& s, const MasterAdamWTensor& t, float b1,
                                       float b2, float eps) {
  master *= t.decay;
  s.m = b1 * s.m + (1.0f - b1) * g;
  s.v = b2 * s.v + (1.0f - b2) * g * g;
  const float denom = sqrtf(s.v) / t.bc2_sqrt + eps;
  return master - t.step_size * s.m / denom;
}

// Elements [begin, end) of one tensor, W at a time (begin and end multiples of W: the caller
// checked numel and the chunk length).
template <int W, class M>
__device__ __forceinline__ void adamw_vectors(const MasterAdamWTensor& t, int64_t begin, int64_t end, float scale,
                                              float b1, float b2, float eps) {
  const auto* grad = static_cast<const __nv_bfloat16*>(t.grad);
  auto* param = static_cast<__nv_bfloat16*>(t.param);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  using Vec = typename FloatVec<W>::type;
  for (int64_t i = begin + threadIdx.x * W; i + W - 1 < end; i += kThreads * W) {
    const Vec g = load_vec<W>(grad + i), p = load_vec<W>(t.master + i), m = load_vec<W>(exp_avg + i),
              v = load_vec<W>(exp_avg_sq + i);
    Vec np, nm, nv;
    for (int j = 0; j < W; ++j) {
      Moments s{m.v[j], v.v[j]};
      np.v[j] = adamw(p.v[j], g.v[j] / scale, s, t, b1, b2, eps);
      nm.v[j] = s.m;
      nv.v[j] = s.v;
    }
    store_vec<W>(t.master + i, np);
    store_vec<W>(exp_avg + i, nm);
    store_vec<W>(exp_avg_sq + i, nv);
    store_vec<W>(param + i, np);
  }
}

// M: the moments' storage type (float or __nv_bfloat16); the arithmetic is fp32 either way.
template <class M>
__global__ void master_adamw_kernel(const MasterAdamWTensor* __restrict__ tensors, int n_tensors, int64_t chunk,
                                    float b1, float b2, float eps, const float* __restrict__ grad_scale) {
  const int64_t c = blockIdx.x;
  const MasterAdamWTensor t = tensors[entry_of_chunk(tensors, n_tensors, c)];
  const int64_t begin = (c - t.first_chunk) * chunk;
  const int64_t end = begin + chunk < t.numel ? begin + chunk : t.numel;
  const float scale = grad_scale ? *grad_scale : 1.0f;
  if (t.vec == 8) return adamw_vectors<8, M>(t, begin, end, scale, b1, b2, eps);
  if (t.vec == 4) return adamw_vectors<4, M>(t, begin, end, scale, b1, b2, eps);
  const auto* grad = static_cast<const __nv_bfloat16*>(t.grad);
  auto* param = static_cast<__nv_bfloat16*>(t.param);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
    Moments s{to_float(exp_avg[k]), to_float(exp_avg_sq[k])};
    const float np = adamw(t.master[k], to_float(grad[k]) / scale, s, t, b1, b2, eps);
    t.master[k] = np;
    exp_avg[k] = from_float<M>(s.m);
    exp_avg_sq[k] = from_float<M>(s.v);
    param[k] = from_float<__nv_bfloat16>(np);
  }
}

}  // namespace

int launch_master_adamw(const MasterAdamWTensor* tensors, int n_tensors, int64_t n_chunks, int64_t chunk, float beta1,
                        float beta2, float eps, const float* grad_scale, bool bf16_moments, void* stream) {
  if (n_tensors == 0 || n_chunks == 0) return 0;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  const auto s = static_cast<cudaStream_t>(stream);
  if (bf16_moments)
    master_adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(tensors, n_tensors, chunk, beta1, beta2, eps, grad_scale);
  else
    master_adamw_kernel<float><<<grid, kThreads, 0, s>>>(tensors, n_tensors, chunk, beta1, beta2, eps, grad_scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
