// defines: mla_rope_q_fused, mla_rope_kv_fused, mla_rope_kernel_ok — MLA's query and key
// assembly with decoupled RoPE as one CUDA kernel each way (mla_rope_kernels.cu):
//   q [B, T, H, nope + R] -> [q_nope | rope(q_rope)]
//   kv [B, T, H, nope + v], k_rope [B, T, R] -> k [B, T, H, nope + R] = [k_nope | rope(k_rope) for every head]
//                                              and v [B, T, H, v] (contiguous: its gradient goes
//                                              into kv's in the same pass as k_nope's)
// Same values as models/mla.cpp's ATen path (apply_rope + cat, the reference), which the
// GPU test holds them to; CUDA tensors only.
#pragma once

#include <torch/torch.h>

#include "models/rope.h"

namespace moetrain {

// Whether the kernels take these operands: a CUDA build, fp32/bf16 CUDA activations, fp32 tables.
bool mla_rope_kernel_ok(const torch::Tensor& x, const RopeTables& rope);

torch::Tensor mla_rope_q_fused(const torch::Tensor& q, const RopeTables& rope, int64_t nope);
// {k, v}
std::pair<torch::Tensor, torch::Tensor> mla_rope_kv_fused(const torch::Tensor& kv, const torch::Tensor& k_rope,
                                                          const RopeTables& rope, int64_t nope);

}  // namespace moetrain
