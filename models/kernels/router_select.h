// defines: router_select_fused, router_select_kernel_ok — the router's expert selection
// (bias add, group-limited top-k, per-expert counts) as one CUDA kernel
// (router_select_kernels.cu). models/router.cpp keeps the ATen twin and picks.
#pragma once

#include <utility>

#include <torch/torch.h>

namespace moetrain {

// Whether the kernel takes these operands: CUDA build, contiguous fp32/bf16 CUDA scores [N, E],
// E <= 512, top_k <= 32, n_group <= 32.
bool router_select_kernel_ok(const torch::Tensor& scores, int64_t top_k, int64_t n_group);

// scores [N, E], bias [E] fp32 -> {topk_idx [N, K] int64 (by biased score, descending),
// counts [E] int64}. No autograd (the choice has no gradient).
std::pair<torch::Tensor, torch::Tensor> router_select_fused(const torch::Tensor& scores, const torch::Tensor& bias,
                                                            int64_t top_k, int64_t n_group, int64_t topk_group);

}  // namespace moetrain
