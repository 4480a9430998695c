#include "models/checkpointing.h"

#include <cstdint>

#include "models/autocast.h"

namespace moetrain {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Outputs: [h] for a dense layer, [h, logits, scores, topk_idx, topk_weight, counts] for an MoE layer.
variable_list run_layer(DecoderLayerImpl& layer, const torch::Tensor& x, const RopeTables& rope) {
  std::vector<RoutingStats> routing;
  torch::Tensor h = layer.forward(x, rope, routing);
  if (routing.empty()) return {h};
  const RoutingStats& r = routing.front();
  return {h, r.logits, r.scores, r.topk_idx, r.topk_weight, r.counts};
}

struct CheckpointedLayer : torch::autograd::Function<CheckpointedLayer> {
  // layer: the module's address (it outlives the step's graph: the model owns it)
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& x, int64_t layer, const torch::Tensor& cos,
                               const torch::Tensor& sin) {
    auto& l = *reinterpret_cast<DecoderLayerImpl*>(static_cast<std::intptr_t>(layer));
    ctx->save_for_backward({x, cos, sin});
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["bf16_autocast"] = cuda_bf16_autocast(x);
    variable_list out;
    {
      torch::NoGradGuard no_grad;
      out = run_layer(l, x, RopeTables{cos, sin});
    }
    if (out.size() > 1) ctx->mark_non_differentiable({out[3], out[4], out[5]});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto& l = *reinterpret_cast<DecoderLayerImpl*>(static_cast<std::intptr_t>(ctx->saved_data["layer"].toInt()));
    const torch::Tensor x = saved[0].detach().requires_grad_(true);
    variable_list out;
    {
      torch::AutoGradMode grad_on(true);
      Bf16AutocastGuard autocast(ctx->saved_data["bf16_autocast"].toBool());  // as the forward ran
      out = run_layer(l, x, RopeTables{saved[1], saved[2]});
    }
    // Back-propagate every differentiable output that received a gradient (h, logits, scores).
    variable_list roots, root_grads;
    for (size_t i = 0; i < out.size() && i < 3; ++i) {
      if (!grads[i].defined() || !out[i].requires_grad()) continue;
      roots.push_back(out[i]);
      root_grads.push_back(grads[i].to(out[i].scalar_type()));
    }
    torch::autograd::backward(roots, root_grads);  // parameter gradients accumulate as usual
    return {x.grad(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpointed_layer_forward(DecoderLayerImpl& layer, const torch::Tensor& x, const RopeTables& rope,
                                         std::vector<RoutingStats>& routing) {
  const variable_list out =
      CheckpointedLayer::apply(x, static_cast<int64_t>(reinterpret_cast<std::intptr_t>(&layer)), rope.cos, rope.sin);
  if (out.size() > 1) {
    RoutingStats r;
    r.logits = out[1];
    r.scores = out[2];
    r.topk_idx = out[3];
    r.topk_weight = out[4];
    r.counts = out[5];
    r.seq_len = x.dim() == 3 ? x.size(1) : 0;
    routing.push_back(std::move(r));
  }
  return out[0];
}

}  // namespace moetrain
