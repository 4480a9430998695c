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

// M: the moments' storage type (float or __nv_bfloat16); the arithmetic is fp32 either way.
template <class M>
__global__ void master_adamw_kernel(const MasterAdamWTensor* __restrict__ tensors, int n_tensors, int64_t chunk,
                                    float b1, float b2, float eps, const float* __restrict__ grad_scale) {
  const int64_t c = blockIdx.x;
  const MasterAdamWTensor t = tensors[entry_of_chunk(tensors, n_tensors, c)];
  const int64_t begin = (c - t.first_chunk) * chunk;
  const int64_t end = begin + chunk < t.numel ? begin + chunk : t.numel;
  const float scale = grad_scale ? *grad_scale : 1.0f;
  const auto* grad = static_cast<const __nv_bfloat16*>(t.grad);
  auto* param = static_cast<__nv_bfloat16*>(t.param);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  if (t.vec == 8) {  // begin and chunk are multiples of 8: so is every i
    for (int64_t i = begin + threadIdx.x * 8; i + 7 < end; i += kThreads * 8) {
      const Float8 g = load8(grad + i), p = load8(t.master + i), m = load8(exp_avg + i), v = load8(exp_avg_sq + i);
      Float8 np, nm, nv;
      for (int j = 0; j < 8; ++j) {
        Moments s{m.v[j], v.v[j]};
        np.v[j] = adamw(p.v[j], g.v[j] / scale, s, t, b1, b2, eps);
        nm.v[j] = s.m;
        nv.v[j] = s.v;
      }
      store8(t.master + i, np);
      store8(exp_avg + i, nm);
      store8(exp_avg_sq + i, nv);
      store8(param + i, np);
    }
    return;
  }
  int64_t i = begin + threadIdx.x * 4;
  if (t.vec == 4) {  // begin and chunk are multiples of 4: so is every i
    for (; i + 3 < end; i += kThreads * 4) {
      const Float4 g = load4(grad + i), p = load4(t.master + i), m = load4(exp_avg + i), v = load4(exp_avg_sq + i);
      Float4 np, nm, nv;
      for (int j = 0; j < 4; ++j) {
        Moments s{m.v[j], v.v[j]};
        np.v[j] = adamw(p.v[j], g.v[j] / scale, s, t, b1, b2, eps);
        nm.v[j] = s.m;
        nv.v[j] = s.v;
      }
      store4(t.master + i, np);
      store4(exp_avg + i, nm);
      store4(exp_avg_sq + i, nv);
      store4(param + i, np);
    }
    return;
  }
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
