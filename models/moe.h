// defines: MoE, MoEOutput, ExpertPermutation, moe_sort_by_expert, moe_permute,
// moe_unpermute, moe_routed_experts — a DeepSeekMoE layer (eq. 12): shared experts
// plus gate-weighted routed experts, dropless.
//
// Routed path: router -> sort (token, k) pairs by expert -> gather rows (permute)
// -> grouped GEMM over experts -> weight by gate and scatter-add back (unpermute).
// Expert parallelism slots in between permute and the GEMM (an all-to-all of the
// sorted rows and counts) and its inverse before unpermute, through the layer's
// ExpertDispatcher (models/expert_dispatch.h); nothing else changes.
#pragma once

#include <torch/torch.h>

#include "models/expert_dispatch.h"
#include "models/experts.h"
#include "models/model_config.h"
#include "models/router.h"
#include "models/swiglu.h"

namespace moetrain {

// Where each expert-sorted row comes from.
struct ExpertPermutation {
  torch::Tensor order;      // [N·K] int64: flat index token·K + k of each sorted row
  torch::Tensor token_idx;  // [N·K] int64: its source token (order / K)
  torch::Tensor counts;     // [E] int64: rows per expert, in expert order
  torch::Tensor inv;        // [N·K] int64: sorted row of pair n·K + k (CUDA only: the fused kernels' index)
  int64_t top_k = 0;
};

// topk_idx: [N, K] int64, counts: [E] (bincount of topk_idx) -> permutation
// (stable sort: within an expert, rows keep token order). On CUDA one counting sort
// (moe_expert_order_fused); moe_sort_by_expert_reference (ATen's stable argsort) is its twin.
ExpertPermutation moe_sort_by_expert(const torch::Tensor& topk_idx, const torch::Tensor& counts);
ExpertPermutation moe_sort_by_expert_reference(const torch::Tensor& topk_idx, const torch::Tensor& counts);
// x: [N, D] -> [N·K, D] rows in expert order. On CUDA the fused gather kernel
// (models/kernels/moe_permute.h), writing bf16 rows under bf16 autocast; elsewhere
// moe_permute_reference (index_select), its twin.
torch::Tensor moe_permute(const torch::Tensor& x, const ExpertPermutation& perm);
torch::Tensor moe_permute_reference(const torch::Tensor& x, const ExpertPermutation& perm);
// y: [N·K, D] expert outputs in expert order, topk_weight: [N, K] or undefined (all ones) -> [N, D]:
// out[n] = base[n] + sum_k topk_weight[n, k] · y[row of (n, k)], the sum accumulated in
// topk_weight's dtype (fp32; without weights in fp32 or y's dtype if wider) and returned in
// y's dtype; base (undefined: none) is the shared experts' output. CUDA: the fused gather kernel, which adds the base inside its fp32 sum;
// elsewhere moe_unpermute_reference (an fp32 index_add, then + base), its twin.
torch::Tensor moe_unpermute(const torch::Tensor& y, const ExpertPermutation& perm,
                            const torch::Tensor& topk_weight, int64_t n_tokens, const torch::Tensor& base = {});
torch::Tensor moe_unpermute_reference(const torch::Tensor& y, const ExpertPermutation& perm,
                                      const torch::Tensor& topk_weight, int64_t n_tokens,
                                      const torch::Tensor& base = {});
// Where the gate weights multiply the routed experts' outputs: in the unpermute's sum (the
// textbook form; its backward reads the experts' outputs again for the gates' gradient), or on
// each row's SwiGLU output inside the experts' grouped node, before w2 (equal, as w2 is linear;
// the unpermute becomes a plain sum and keeps nothing — bench/NOTES.md 56). Inside needs the
// grouped-GEMM path (GroupedExpertsImpl::uses_grouped_mm of the permuted rows) and all experts
// local; elsewhere the unpermute applies them. The two round differently in bf16 (the gate
// before h's rounding, not after the output's), so they agree to bf16 rounding, not bitwise. kDefault:
// inside unless MOETRAIN_GATES_IN_EXPERTS=0.
enum class GatePlacement { kDefault, kInUnpermute, kInsideExperts };

// The routed experts' sum plus `base` (undefined: none): x: [N, D], topk_idx / topk_weight:
// [N, K], counts: [E] -> [N, D]. With a dispatcher, `experts` holds only its shard and the
// rows travel (null: all local).
torch::Tensor moe_routed_experts(GroupedExpertsImpl& experts, const torch::Tensor& x,
                                 const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                                 const torch::Tensor& counts, ExpertDispatcher* dispatcher = nullptr,
                                 const torch::Tensor& base = {}, GatePlacement gates = GatePlacement::kDefault);

struct MoEOutput {
  torch::Tensor y;       // [B, T, D]
  RoutingStats routing;  // of the B·T tokens, row b·T + t
};

struct MoEImpl : torch::nn::Module {
  explicit MoEImpl(const ModelConfig& cfg);

  // x: [B, T, D] -> y [B, T, D] (+ routing)
  MoEOutput forward(const torch::Tensor& x);

  // Expert parallelism: keep only shard d->index() of d->size() of the routed experts
  // (copied from the current weights, so every shard starts as the full layer did) and
  // send the rows through `d`. Call before building the optimizer.
  void shard_experts(std::shared_ptr<ExpertDispatcher> d);

  Router gate{nullptr};             // weight [E, D], bias [E] fp32 buffer
  GroupedExperts experts{nullptr};  // w13 [E, 2I, D], w2 [E, D, I] (E/ep_size of them when sharded)
  SwiGLU shared_experts{nullptr};   // width n_shared·I; absent when n_shared_experts == 0
  std::shared_ptr<ExpertDispatcher> dispatcher = std::make_shared<LocalExpertDispatcher>();
};
TORCH_MODULE(MoE);

}  // namespace moetrain
