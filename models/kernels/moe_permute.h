// defines: moe_expert_order_fused, moe_permute_fused, moe_unpermute_fused, moe_inverse_order — the MoE row
// permutation (token rows -> expert-sorted rows and back, gate-weighted) as one CUDA
// gather kernel each way (moe_permute_kernels.cu): no atomics, no fp32 [N·K, D]
// temporaries. CUDA tensors only; models/moe.cpp keeps the ATen twins and picks.
#pragma once

#include <torch/torch.h>

namespace moetrain {

// order: [M] the sort (sorted row -> flat pair n·K + k) -> inv: [M] (pair -> sorted row)
torch::Tensor moe_inverse_order(const torch::Tensor& order);

// topk_idx: [N, K] int64 CUDA, values in [0, n_experts) -> the stable sort of its N·K pairs by
// expert as a three-pass counting sort: order [M] (sorted row -> pair n·K + k), token_idx [M]
// (order / K) and inv [M] (pair -> sorted row). Equal to ATen's stable argsort, its twin
// (models/moe.cpp, moe_sort_by_expert_reference).
struct ExpertOrder {
  torch::Tensor order, token_idx, inv;
};
ExpertOrder moe_expert_order_fused(const torch::Tensor& topk_idx, int64_t n_experts);
bool moe_expert_order_kernel_ok(const torch::Tensor& topk_idx, int64_t n_experts);

// x: [N, D] fp32/bf16 CUDA, inv: [N·K] -> rows [N·K, D] in rows_dtype (rows[inv[n·K + k]] = x[n])
torch::Tensor moe_permute_fused(const torch::Tensor& x, const torch::Tensor& inv, int64_t top_k,
                                torch::ScalarType rows_dtype);

// y: [N·K, D] fp32/bf16 CUDA, inv: [N·K], topk_weight: [N, K] fp32 or undefined (all ones),
// base: undefined or [N, D] -> [N, D] in y's dtype: out[n] = base[n] + Σ_k topk_weight[n, k] ·
// y[inv[n·K + k]] (fp32 sums; the base is the shared experts' output, added here instead of by a
// separate pass). Unweighted, the backward is a gather and y is not kept for it.
torch::Tensor moe_unpermute_fused(const torch::Tensor& y, const torch::Tensor& inv, int64_t top_k,
                                  const torch::Tensor& topk_weight, const torch::Tensor& base = {});

// Whether the fused kernels take these operands (CUDA build, CUDA tensors, fp32/bf16, fp32 gates
// or none).
bool moe_permute_kernel_ok(const torch::Tensor& x);
bool moe_unpermute_kernel_ok(const torch::Tensor& y, const torch::Tensor& topk_weight);

}  // namespace moetrain
