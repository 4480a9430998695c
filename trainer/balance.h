// defines: Balancer, BalanceLosses, aux_loss, seq_aux_loss, z_loss, max_violation,
// max_violation_per_row
// — expert load balancing (balance.strategy, combinable):
//   loss_free     the auxiliary-loss-free bias (Wang et al. 2024; DeepSeek-V3 §2.1.2):
//                 per MoE layer, count the tokens each expert receives from the BIASED
//                 top-k over the whole global batch (every micro-step; all ranks once
//                 data parallelism exists); once per optimizer step
//                 b_i += γ·sign(mean_load − load_i)  (or γ·(mean − load_i)/mean),
//                 optionally centred; γ = 0 after the freeze step / token count.
//   aux_loss      batch-level Switch/GShard loss α·N·Σ f_i·P_i per micro-batch.
//   seq_aux_loss  DeepSeek-V3 eqs. 17–20, per sequence, averaged over sequences.
//   z_loss        ST-MoE: mean over tokens of logsumexp(router logits)².
// Reductions (documented choice; the papers leave them open): f_i counts the
// UNBIASED plain top-k of the scores (Megatron; the bias only steers routing);
// P_i uses scores normalized to sum 1 over all experts per token (for softmax this
// is a no-op; for sigmoid it is Megatron #1438's fix); every loss is summed over
// MoE layers; aux / seq-aux / z losses are computed per micro-batch. The MoE blocks
// of MTP modules are MoE layers like the others (after the main ones, in
// Transformer::routers() order); their sequences are T-k tokens long.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "models/router.h"
#include "trainer/experiment_config.h"

namespace moetrain {

// scores [N, E] (unbiased affinities, differentiable) → the unbiased top-k
// indicator counts per expert [E] (no grad) and the normalized mean probability [E].
torch::Tensor aux_loss(const RoutingStats& r, int64_t top_k);                       // N·Σ f_i·P_i (no α)
torch::Tensor seq_aux_loss(const RoutingStats& r, int64_t top_k, int64_t seq_len);  // mean over sequences of Σ f_i·P_i
torch::Tensor z_loss(const RoutingStats& r);                                       // mean logsumexp(logits)²

// MaxVio = (max_i load_i − mean load) / mean load, for counts [E].
double max_violation(const torch::Tensor& counts);
// The MaxVio of each row of counts [L, E] (one copy to the host for all rows).
std::vector<double> max_violation_per_row(const torch::Tensor& counts);

struct BalanceLosses {
  torch::Tensor aux, seq_aux, z;  // already multiplied by their coefficients; scalars
  torch::Tensor total() const { return aux + seq_aux + z; }
};

class Balancer {
 public:
  Balancer(const BalanceConfig& cfg, const ModelConfig& model, std::vector<Router> routers);

  // The weighted auxiliary losses of one micro-batch's routing (zeros when unused).
  // seq_len: tokens per sequence for layers whose RoutingStats::seq_len is 0.
  BalanceLosses losses(const std::vector<RoutingStats>& routing, int64_t seq_len) const;

  // Adds one TRAINING micro-step's biased-selection counts (never eval or recompute).
  void accumulate(const std::vector<RoutingStats>& routing);

  // Global-batch counts so far: [L_moe, E] int64 on the routers' device (what all-reduce would sum).
  const torch::Tensor& counts() const { return counts_; }
  torch::Tensor& mutable_counts() { return counts_; }

  // Once per optimizer step, after optimizer.step(): moves every router's bias
  // (loss_free only) from the accumulated counts, then resets them.
  // `step` is the optimizer step just taken (1-based), `tokens` tokens seen so far.
  void after_step(int64_t step, int64_t tokens);
  // A skipped (non-finite) step: drop the counts, move nothing.
  void discard_step();

  // The γ in force at this step (0 once frozen or without loss_free).
  double rate_at(int64_t step, int64_t tokens) const;
  std::vector<double> maxvio_per_layer() const;  // of counts() (before after_step resets them)
  torch::Tensor biases() const;                  // [L_moe, E] fp32 copy

 private:
  BalanceConfig cfg_;
  int64_t top_k_;
  std::vector<Router> routers_;
  torch::Tensor counts_;  // [L_moe, E] int64, on the routers' device
};

}  // namespace moetrain
