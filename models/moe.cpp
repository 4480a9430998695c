#include "models/moe.h"

#include "models/autocast.h"
#include "models/kernels/fan_out.h"
#include "models/kernels/moe_permute.h"
#include "models/kernels/swiglu.h"

#include <cstdlib>
#include <string>

namespace moetrain {

ExpertPermutation moe_sort_by_expert_reference(const torch::Tensor& topk_idx, const torch::Tensor& counts) {
  const int64_t K = topk_idx.size(1);
  ExpertPermutation p;
  p.order = torch::argsort(topk_idx.flatten(), /*stable=*/true);  // [N·K]
  p.token_idx = torch::div(p.order, K, "floor");
  p.counts = counts;
  p.top_k = K;
  if (topk_idx.is_cuda() && fused_kernels_available()) p.inv = moe_inverse_order(p.order);
  return p;
}

ExpertPermutation moe_sort_by_expert(const torch::Tensor& topk_idx, const torch::Tensor& counts) {
  const int64_t n_experts = counts.size(0);
  if (!fused_kernels_available() || !moe_expert_order_kernel_ok(topk_idx, n_experts))
    return moe_sort_by_expert_reference(topk_idx, counts);
  ExpertOrder o = moe_expert_order_fused(topk_idx, n_experts);  // CUDA: one counting sort
  ExpertPermutation p;
  p.order = std::move(o.order);
  p.token_idx = std::move(o.token_idx);
  p.inv = std::move(o.inv);
  p.counts = counts;
  p.top_k = topk_idx.size(1);
  return p;
}

torch::Tensor moe_permute_reference(const torch::Tensor& x, const ExpertPermutation& perm) {
  return x.index_select(0, perm.token_idx);  // [N·K, D]
}

torch::Tensor moe_permute(const torch::Tensor& x, const ExpertPermutation& perm) {
  if (!perm.inv.defined() || !moe_permute_kernel_ok(x)) return moe_permute_reference(x, perm);
  // The grouped GEMM reads bf16 under autocast: write the rows in bf16 straight away.
  return moe_permute_fused(x, perm.inv, perm.top_k, cuda_bf16_autocast(x) ? torch::kBFloat16 : x.scalar_type());
}

torch::Tensor moe_unpermute(const torch::Tensor& y, const ExpertPermutation& perm,
                            const torch::Tensor& topk_weight, int64_t n_tokens, const torch::Tensor& base) {
  if (perm.inv.defined() && moe_unpermute_kernel_ok(y, topk_weight) && perm.inv.numel() == n_tokens * perm.top_k)
    return moe_unpermute_fused(y, perm.inv, perm.top_k, topk_weight, base);
  return moe_unpermute_reference(y, perm, topk_weight, n_tokens, base);
}

torch::Tensor moe_unpermute_reference(const torch::Tensor& y, const ExpertPermutation& perm,
                                      const torch::Tensor& topk_weight, int64_t n_tokens, const torch::Tensor& base) {
  const auto acc = topk_weight.defined() ? topk_weight.scalar_type() : at::promote_types(y.scalar_type(), torch::kFloat);
  const torch::Tensor zeros = torch::zeros({n_tokens, y.size(1)}, y.options().dtype(acc));
  torch::Tensor rows = y.to(acc);  // [N·K, D]
  if (topk_weight.defined()) rows = rows * topk_weight.flatten().index_select(0, perm.order).unsqueeze(1);
  const torch::Tensor out = zeros.index_add(0, perm.token_idx, rows).to(y.scalar_type());  // [N, D]
  return base.defined() ? out + base : out;
}

bool gates_inside_experts_by_default() {
  // MOETRAIN_GATES_IN_EXPERTS=0: the gates applied in the unpermute (an A/B switch for benchmarks)
  static const bool on = [] {
    const char* v = std::getenv("MOETRAIN_GATES_IN_EXPERTS");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

torch::Tensor moe_routed_experts(GroupedExpertsImpl& experts, const torch::Tensor& x,
                                 const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                                 const torch::Tensor& counts, ExpertDispatcher* dispatcher,
                                 const torch::Tensor& base, GatePlacement gates) {
  const ExpertPermutation perm = moe_sort_by_expert(topk_idx, counts);
  const torch::Tensor rows = moe_permute(x, perm);        // [N·K, D]
  const bool local = !dispatcher || dispatcher->size() == 1;
  const bool inside = gates == GatePlacement::kInsideExperts ||
                      (gates == GatePlacement::kDefault && gates_inside_experts_by_default());
  if (inside && local && experts.uses_grouped_mm(rows)) {
    // w2 is linear, so Σ_k g_k·w2(h_k) = Σ_k w2(g_k·h_k): each row's gate scales its SwiGLU output
    // inside the experts' node, and the unpermute is a plain sum whose backward is a gather — it
    // neither keeps the experts' [N·K, D] output nor reads it again for the gates' gradient.
    const torch::Tensor row_gate = topk_weight.flatten().index_select(0, perm.order).to(torch::kFloat);  // [N·K]
    return moe_unpermute(experts.forward(rows, counts, row_gate), perm, torch::Tensor(), x.size(0), base);
  }
  torch::Tensor out;
  if (dispatcher && dispatcher->size() > 1) {  // expert parallelism: all-to-all rows + counts, and back
    const ExpertDispatch d = dispatcher->dispatch(rows, counts);
    out = dispatcher->combine(experts.forward(d.rows, d.counts), d);  // [N·K, D]
  } else {
    out = experts.forward(rows, counts);  // [N·K, D]
  }
  return moe_unpermute(out, perm, topk_weight, x.size(0), base);
}

MoEImpl::MoEImpl(const ModelConfig& cfg) {
  gate = register_module("gate", Router(cfg));
  experts = register_module("experts", GroupedExperts(cfg.n_routed_experts, cfg.hidden_size,
                                                      cfg.moe_intermediate_size, cfg.init_std));
  if (cfg.n_shared_experts > 0) {
    shared_experts = register_module(
        "shared_experts",
        SwiGLU(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size, cfg.init_std));
  }
}

void MoEImpl::shard_experts(std::shared_ptr<ExpertDispatcher> d) {
  const int64_t n = d->size(), e = experts->n_experts / n, first = d->index() * e;
  TORCH_CHECK(experts->n_experts % n == 0, "MoE: ", experts->n_experts, " experts do not split into ", n, " shards");
  {  // set_data keeps the registered parameters (and consumes no random numbers)
    torch::NoGradGuard no_grad;
    for (auto* w : {&experts->w13, &experts->w2}) w->set_data(w->narrow(0, first, e).clone());
  }
  experts->n_experts = e;
  dispatcher = std::move(d);
}

MoEOutput MoEImpl::forward(const torch::Tensor& x) {
  // [N, D], read by the router, the shared and the routed experts: one node sums its three
  // gradients in one pass (models/kernels/fan_out.h)
  const auto [to_router, to_shared, to_routed] = fan_out3(x.reshape({-1, x.size(-1)}));
  MoEOutput out;
  out.routing = gate(to_router);
  if (x.dim() == 3) out.routing.seq_len = x.size(1);
  // the shared experts' output rides into the routed sum's kernel (no separate [N, D] add)
  const torch::Tensor shared = shared_experts ? shared_experts(to_shared) : torch::Tensor();
  const torch::Tensor y = moe_routed_experts(*experts, to_routed, out.routing.topk_idx, out.routing.topk_weight,
                                             out.routing.counts, dispatcher.get(), shared);
  out.y = y.view(x.sizes());
  return out;
}

}  // namespace moetrain
