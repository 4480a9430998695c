// defines: RoutingStats, Router — DeepSeek-V3's token-choice top-k router with the
// auxiliary-loss-free selection bias (§2.1.2, eqs. 13–16) and group-limited routing.
//
// The bias is an fp32 buffer with no gradient, added to the scores for the top-k
// SELECTION only; gate values always come from the unbiased scores. Router
// overrides Module::to so that a blanket model.to(kBFloat16) leaves it fp32.
#pragma once

#include <utility>

#include <torch/torch.h>

#include "models/model_config.h"

namespace moetrain {

// One MoE layer's routing of N = B·T tokens (row n = token b·T + t).
// "fp32" below means fp32 for fp32/bf16 models and fp64 for fp64 models.
struct RoutingStats {
  torch::Tensor topk_idx;     // [N, K] int64: chosen experts (biased, group-limited top-k)
  torch::Tensor topk_weight;  // [N, K] fp32: gate values from unbiased scores (normalized, scaled)
  torch::Tensor counts;       // [E] int64: tokens per expert of topk_idx (no grad; for the bias update, MaxVio)
  torch::Tensor scores;       // [N, E] fp32: unbiased affinities s (sigmoid/softmax), differentiable (aux losses)
  torch::Tensor logits;       // [N, E] fp32: router logits x·W^T, differentiable (z-loss)
  // Tokens per sequence of these rows (set by MoE for [B, T, D] input; 0 = unknown).
  // MTP depth k routes T-k tokens per sequence, which the per-sequence aux loss needs.
  int64_t seq_len = 0;
};

// x [N, D] · weight [E, D]^T -> logits [N, E] in fp32 (fp64 for fp64 inputs). Under CUDA bf16
// autocast: bf16 GEMMs with an fp32 output (no fp32 copy of x); elsewhere fp32 matmuls.
torch::Tensor router_logits(const torch::Tensor& x, const torch::Tensor& weight);

// The selection's reference twin (plain ATen; router_select_fused is the CUDA kernel):
// scores [N, E] + bias [E] -> {topk_idx [N, K] by biased score (group-limited), counts [E]}.
std::pair<torch::Tensor, torch::Tensor> router_select_reference(const torch::Tensor& scores, const torch::Tensor& bias,
                                                                int64_t top_k, int64_t n_group, int64_t topk_group);

struct RouterImpl : torch::nn::Module {
  explicit RouterImpl(const ModelConfig& cfg);

  // x: [N, D] -> RoutingStats (N tokens)
  RoutingStats forward(const torch::Tensor& x);

  // Cast/move the weight; the bias follows the device but always stays fp32.
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  int64_t n_experts, top_k, n_group, topk_group;
  bool norm_topk_prob;
  double routed_scaling_factor;
  ScoringFunc scoring_func;

  torch::Tensor weight;  // [E, D] parameter (expert centroids), init normal(0, init_std)
  torch::Tensor bias;    // [E] fp32 buffer, init zeros; written only by the balancer (NoGrad)
};
TORCH_MODULE(Router);

}  // namespace moetrain
