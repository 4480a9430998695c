#include "models/router.h"

#include <algorithm>
#include <limits>

namespace moetrain {

RouterImpl::RouterImpl(const ModelConfig& cfg)
    : n_experts(cfg.n_routed_experts),
      top_k(cfg.num_experts_per_tok),
      n_group(cfg.n_group),
      topk_group(cfg.topk_group),
      norm_topk_prob(cfg.norm_topk_prob),
      routed_scaling_factor(cfg.routed_scaling_factor),
      scoring_func(cfg.scoring_func) {
  TORCH_CHECK(n_group >= 1 && n_experts % n_group == 0, "n_routed_experts (", n_experts,
              ") must be a multiple of n_group (", n_group, ")");
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group]");
  TORCH_CHECK(top_k >= 1 && top_k <= topk_group * (n_experts / n_group),
              "num_experts_per_tok must be in [1, experts in the kept groups]");
  weight = register_parameter("weight", torch::empty({n_experts, cfg.hidden_size}));
  {
    torch::NoGradGuard no_grad;
    weight.normal_(0.0, cfg.init_std);
  }
  bias = register_buffer("bias", torch::zeros({n_experts}, torch::kFloat));
}

void RouterImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  weight.set_data(weight.to(device, dtype, non_blocking));
  bias.set_data(bias.to(device, torch::kFloat, non_blocking));
}

void RouterImpl::to(torch::Dtype dtype, bool non_blocking) {
  weight.set_data(weight.to(dtype, non_blocking));
}

RoutingStats RouterImpl::forward(const torch::Tensor& x) {
  const int64_t N = x.size(0), E = n_experts;
  RoutingStats r;
  // Router math in fp32 at least (fp64 stays fp64 for finite-difference tests).
  const auto compute = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  r.logits = torch::matmul(x.to(compute), weight.to(compute).t());  // [N, E]
  r.scores = scoring_func == ScoringFunc::kSigmoid ? torch::sigmoid(r.logits) : torch::softmax(r.logits, -1);

  {
    // Selection: biased scores, no gradient through the choice (eq. 16).
    torch::NoGradGuard no_grad;
    torch::Tensor choice = r.scores.detach() + bias;  // [N, E]
    if (n_group > 1) {
      // Group-limited routing: a group's score is the sum of its top-2 biased
      // scores; keep the best topk_group groups, mask the rest with -inf.
      const int64_t per_group = E / n_group;
      const torch::Tensor grouped = choice.view({N, n_group, per_group});
      const torch::Tensor group_scores =
          std::get<0>(grouped.topk(std::min<int64_t>(2, per_group), -1)).sum(-1);  // [N, G]
      const torch::Tensor keep_groups = std::get<1>(group_scores.topk(topk_group, -1));
      const torch::Tensor keep = torch::zeros({N, n_group}, choice.options().dtype(torch::kBool))
                                     .scatter_(1, keep_groups, true)
                                     .unsqueeze(-1)
                                     .expand({N, n_group, per_group})
                                     .reshape({N, E});
      choice = choice.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
    }
    r.topk_idx = std::get<1>(choice.topk(top_k, -1));  // [N, K], sorted by biased score
    r.counts = torch::zeros({E}, r.topk_idx.options())
                   .scatter_add_(0, r.topk_idx.flatten(), torch::ones({N * top_k}, r.topk_idx.options()));
  }

  // Gate values from the UNBIASED scores (eqs. 13–14).
  torch::Tensor w = r.scores.gather(1, r.topk_idx);  // [N, K]
  if (norm_topk_prob) w = w / (w.sum(-1, /*keepdim=*/true) + 1e-20);
  r.topk_weight = w * routed_scaling_factor;
  return r;
}

}  // namespace moetrain
