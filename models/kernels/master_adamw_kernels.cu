// The fused master-weight AdamW step: one block per chunk of one parameter (found by a binary
// search over the tensors' first chunks), fp32 math, the bf16 weight written from the new
// master in the same pass.
#include "models/kernels/master_adamw_kernels.h"

#include <type_traits>

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

// W consecutive 16-bit values (bf16 weights or int16 remainders) as raw bits, two a 32-bit word
// (element 2k in the low half of word k): one 16- (W = 8) or 8-byte (W = 4) access.
template <int W>
struct Bits16 {
  uint32_t word[W / 2];
  __device__ __forceinline__ uint16_t get(int j) const { return static_cast<uint16_t>(word[j / 2] >> (16 * (j % 2))); }
  __device__ __forceinline__ void set(int j, uint16_t x) {
    const int shift = 16 * (j % 2);
    word[j / 2] = (word[j / 2] & ~(0xffffu << shift)) | (static_cast<uint32_t>(x) << shift);
  }
};
template <int W>
__device__ __forceinline__ Bits16<W> load_bits(const void* p) {
  if constexpr (W == 8) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    return {{r.x, r.y, r.z, r.w}};
  } else {
    const uint2 r = *reinterpret_cast<const uint2*>(p);
    return {{r.x, r.y}};
  }
}
template <int W>
__device__ __forceinline__ void store_bits(void* p, const Bits16<W>& b) {
  if constexpr (W == 8) *reinterpret_cast<uint4*>(p) = make_uint4(b.word[0], b.word[1], b.word[2], b.word[3]);
  else *reinterpret_cast<uint2*>(p) = make_uint2(b.word[0], b.word[1]);
}

__device__ __forceinline__ float join_master(uint16_t w, int16_t lo) { return __uint_as_float(join_master_bits(w, lo)); }
// The new master's bf16 weight (round to nearest even) and remainder.
__device__ __forceinline__ void split_master(float m, uint16_t& w, int16_t& lo) {
  w = __bfloat16_as_ushort(__float2bfloat16(m));
  lo = split_master_lo(__float_as_uint(m), w);
}

// Elements [begin, end) of one tensor, W at a time (begin and end multiples of W: the caller
// checked numel and the chunk length). Split: the master read from the weight and its
// remainder (18 bytes an element with bf16 moments instead of 20).
template <int W, class M, bool Split>
__device__ __forceinline__ void adamw_vectors(const MasterAdamWTensor& t, int64_t begin, int64_t end, float scale,
                                              float b1, float b2, float eps) {
  const auto* grad = static_cast<const __nv_bfloat16*>(t.grad);
  auto* param = static_cast<__nv_bfloat16*>(t.param);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  using Vec = typename FloatVec<W>::type;
  for (int64_t i = begin + threadIdx.x * W; i + W - 1 < end; i += kThreads * W) {
    const Vec g = load_vec<W>(grad + i), m = load_vec<W>(exp_avg + i), v = load_vec<W>(exp_avg_sq + i);
    Vec p;
    Bits16<W> w, lo;
    if constexpr (Split) {
      w = load_bits<W>(param + i);
      lo = load_bits<W>(t.master_lo + i);
#pragma unroll
      for (int j = 0; j < W; ++j) p.v[j] = join_master(w.get(j), static_cast<int16_t>(lo.get(j)));
    } else {
      p = load_vec<W>(t.master + i);
    }
    Vec np, nm, nv;
    for (int j = 0; j < W; ++j) {
      Moments s{m.v[j], v.v[j]};
      np.v[j] = adamw(p.v[j], g.v[j] / scale, s, t, b1, b2, eps);
      nm.v[j] = s.m;
      nv.v[j] = s.v;
    }
    store_vec<W>(exp_avg + i, nm);
    store_vec<W>(exp_avg_sq + i, nv);
    if constexpr (Split) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        uint16_t wj;
        int16_t l;
        split_master(np.v[j], wj, l);
        w.set(j, wj);
        lo.set(j, static_cast<uint16_t>(l));
      }
      store_bits<W>(param + i, w);
      store_bits<W>(t.master_lo + i, lo);
    } else {
      store_vec<W>(t.master + i, np);
      store_vec<W>(param + i, np);
    }
  }
}

// M: the moments' storage type (float or __nv_bfloat16); the arithmetic is fp32 either way.
// Split: the masters are split (MasterAdamWTensor::master_lo).
template <class M, bool Split>
__global__ void master_adamw_kernel(const MasterAdamWTensor* __restrict__ tensors, int n_tensors, int64_t chunk,
                                    float b1, float b2, float eps, const float* __restrict__ grad_scale) {
  const int64_t c = blockIdx.x;
  const MasterAdamWTensor t = tensors[entry_of_chunk(tensors, n_tensors, c)];
  const int64_t begin = (c - t.first_chunk) * chunk;
  const int64_t end = begin + chunk < t.numel ? begin + chunk : t.numel;
  const float scale = grad_scale ? *grad_scale : 1.0f;
  if (t.vec == 8) return adamw_vectors<8, M, Split>(t, begin, end, scale, b1, b2, eps);
  if (t.vec == 4) return adamw_vectors<4, M, Split>(t, begin, end, scale, b1, b2, eps);
  const auto* grad = static_cast<const __nv_bfloat16*>(t.grad);
  auto* param = static_cast<__nv_bfloat16*>(t.param);
  auto* exp_avg = static_cast<M*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<M*>(t.exp_avg_sq);
  for (int64_t k = begin + threadIdx.x; k < end; k += kThreads) {
    Moments s{to_float(exp_avg[k]), to_float(exp_avg_sq[k])};
    const float master = Split ? join_master(__bfloat16_as_ushort(param[k]), t.master_lo[k]) : t.master[k];
    const float np = adamw(master, to_float(grad[k]) / scale, s, t, b1, b2, eps);
    exp_avg[k] = from_float<M>(s.m);
    exp_avg_sq[k] = from_float<M>(s.v);
    if constexpr (Split) {
      uint16_t w;
      split_master(np, w, t.master_lo[k]);
      param[k] = __ushort_as_bfloat16(w);
    } else {
      t.master[k] = np;
      param[k] = from_float<__nv_bfloat16>(np);
    }
  }
}

}  // namespace

int launch_master_adamw(const MasterAdamWTensor* tensors, int n_tensors, int64_t n_chunks, int64_t chunk, float beta1,
                        float beta2, float eps, const float* grad_scale, bool bf16_moments, bool split_masters,
                        void* stream) {
  if (n_tensors == 0 || n_chunks == 0) return 0;
  const dim3 grid(static_cast<unsigned>(n_chunks));
  const auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto moments, auto split) {
    master_adamw_kernel<decltype(moments), decltype(split)::value>
        <<<grid, kThreads, 0, s>>>(tensors, n_tensors, chunk, beta1, beta2, eps, grad_scale);
  };
  if (bf16_moments && split_masters) launch(__nv_bfloat16{}, std::true_type{});
  else if (bf16_moments) launch(__nv_bfloat16{}, std::false_type{});
  else if (split_masters) launch(float{}, std::true_type{});
  else launch(float{}, std::false_type{});
  return static_cast<int>(cudaGetLastError());
}

}  // namespace moetrain::kernels
