// defines: MasterAdamWTensor, launch_master_adamw — the raw CUDA launcher of the fused
// master-weight AdamW step (train.param_dtype bf16, trainer/master_weights.h): per element one
// read of the bf16 gradient, fp32 master and both fp32 moments, one write of the master, the
// moments and the bf16 weight — 28 bytes instead of the ≈ 40 of upcast + _fused_adamw_ +
// downcast. No torch headers (nvcc compiles it quickly).
#pragma once

#include <cstdint>

namespace moetrain::kernels {

// One parameter's buffers (device pointers, contiguous, `numel` elements each) and its step
// constants, computed on the host in double: PyTorch's fused AdamW (ADAMW mode) arithmetic.
struct MasterAdamWTensor {
  float* master;       // the fp32 master, or null when it is split (master_lo)
  int16_t* master_lo;  // split masters: the master's remainder (split_master_lo / join_master_bits below)
  const void* grad;    // bf16
  void* exp_avg;       // fp32, or bf16 (launch_master_adamw's bf16_moments)
  void* exp_avg_sq;
  void* param;         // bf16: the rounding of the updated master
  int64_t numel;
  int64_t first_chunk;  // chunks of the tensors before this one
  float decay;          // 1 − lr·weight_decay (decoupled decay)
  float step_size;      // lr / (1 − β1^t)
  float bc2_sqrt;       // sqrt(1 − β2^t)
  int vec;              // elements per access: 8 or 4 (every pointer 16-byte aligned, numel a multiple), else 1
};

// optim.master_storage: split keeps a master as its bf16 weight w = round_nearest_even(m) and
// lo = bits(m) − bits(w)·2¹⁶ as int16 (the fp32 bit patterns' difference, in [−2¹⁵, 2¹⁵]):
// m = float(bits(w)·2¹⁶ + lo) exactly. The one value int16 lacks, +2¹⁵ (m exactly halfway above
// w, rounded down to the even w), is stored as 2¹⁵ − 1: m one fp32 ulp lower, which still rounds
// to w (a 1-in-131,072 case per update). Non-finite masters saturate.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int16_t split_master_lo(uint32_t m_bits, uint16_t w_bits) {
  const auto delta = static_cast<int32_t>(m_bits - (static_cast<uint32_t>(w_bits) << 16));
  return static_cast<int16_t>(delta > 32767 ? 32767 : delta < -32768 ? -32768 : delta);
}
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t join_master_bits(uint16_t w_bits, int16_t lo) {
  return (static_cast<uint32_t>(w_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(lo));
}

// tensors: a device array of n_tensors entries, ordered by first_chunk; n_chunks chunks of
// `chunk` elements in all (one block each). grad_scale: a device fp32 scalar dividing every
// gradient (the clip factor), or null. bf16_moments: the moments are stored in bf16 (read,
// updated in fp32, the update computed from the fp32 values, stored rounded to nearest: 20
// bytes an element instead of 28). split_masters: every entry's master is split (master_lo;
// 18 bytes an element with bf16 moments). Returns a cudaError_t as int (0 = success).
int launch_master_adamw(const MasterAdamWTensor* tensors, int n_tensors, int64_t n_chunks, int64_t chunk, float beta1,
                        float beta2, float eps, const float* grad_scale, bool bf16_moments, bool split_masters,
                        void* stream);

}  // namespace moetrain::kernels
