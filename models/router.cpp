#include "models/router.h"

#include <algorithm>
#include <limits>

#include "models/autocast.h"
#include "models/kernels/router_select.h"

namespace moetrain {

namespace {

// Router logits under CUDA bf16 autocast: bf16 operands, fp32 accumulation AND fp32 output
// (cuBLAS writes fp32 directly), so the scores, the selection and the gates see fp32 logits —
// autocast's own matmul would round them to bf16. The backward runs bf16 GEMMs, as autocast's
// would: the logits' gradient is rounded to bf16 once; the weight gradient is written in fp32
// when the weight is fp32.
struct RouterLogitsBf16 : torch::autograd::Function<RouterLogitsBf16> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight) {
    const torch::Tensor xb = x.to(torch::kBFloat16), wb = weight.to(torch::kBFloat16);
    ctx->save_for_backward({xb, wb});
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["w_dtype"] = static_cast<int64_t>(weight.scalar_type());
    return at::mm(xb, wb.t(), torch::kFloat);  // [N, E] fp32
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &xb = saved[0], &wb = saved[1];
    const auto x_dtype = static_cast<torch::Dtype>(ctx->saved_data["x_dtype"].toInt());
    const auto w_dtype = static_cast<torch::Dtype>(ctx->saved_data["w_dtype"].toInt());
    const torch::Tensor g = grads[0].to(torch::kBFloat16);            // [N, E]
    const torch::Tensor dx = at::mm(g, wb).to(x_dtype);                // [N, D]
    const torch::Tensor dw = w_dtype == torch::kBFloat16 ? at::mm(g.t(), xb) : at::mm(g.t(), xb, w_dtype);  // [E, D]
    return {dx, dw};
  }
};

}  // namespace

torch::Tensor router_logits(const torch::Tensor& x, const torch::Tensor& weight) {
  if (cuda_bf16_autocast(x)) return RouterLogitsBf16::apply(x, weight);
  // Router math in fp32 at least (fp64 stays fp64 for finite-difference tests).
  const auto compute = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return torch::matmul(x.to(compute), weight.to(compute).t());  // [N, E]
}

std::pair<torch::Tensor, torch::Tensor> router_select_reference(const torch::Tensor& scores, const torch::Tensor& bias,
                                                                int64_t top_k, int64_t n_group, int64_t topk_group) {
  torch::NoGradGuard no_grad;
  const int64_t N = scores.size(0), E = scores.size(1);
  torch::Tensor choice = scores.detach() + bias;  // [N, E]
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
  torch::Tensor idx = std::get<1>(choice.topk(top_k, -1));  // [N, K], sorted by biased score
  torch::Tensor counts = torch::zeros({E}, idx.options()).scatter_add_(0, idx.flatten(), torch::ones({N * top_k}, idx.options()));
  return {idx, counts};
}

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
  RoutingStats r;
  r.logits = router_logits(x, weight);  // [N, E] fp32
  r.scores = scoring_func == ScoringFunc::kSigmoid ? torch::sigmoid(r.logits) : torch::softmax(r.logits, -1);
  // Selection: biased scores, no gradient through the choice (eq. 16); one kernel on CUDA.
  std::tie(r.topk_idx, r.counts) =
      router_select_kernel_ok(r.scores, top_k, n_group)
          ? router_select_fused(r.scores, bias, top_k, n_group, topk_group)
          : router_select_reference(r.scores, bias, top_k, n_group, topk_group);

  // Gate values from the UNBIASED scores (eqs. 13–14).
  torch::Tensor w = r.scores.gather(1, r.topk_idx);  // [N, K]
  if (norm_topk_prob) w = w / (w.sum(-1, /*keepdim=*/true) + 1e-20);
  r.topk_weight = w * routed_scaling_factor;
  return r;
}

}  // namespace moetrain
