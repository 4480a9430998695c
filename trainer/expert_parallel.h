// defines: ExpertParallel, ep_all_to_all, ep_regroup, ep_is_expert_param — expert parallelism
// (distributed.ep_size) over c10d: the routed experts of every MoE layer are sharded
// over ep_size ranks, rows travel to their expert's rank and back by all-to-all.
//
// Rank layout (world W = DP·EP ranks, ep = distributed.ep_size dividing W and E):
//   EP group    consecutive ranks: rank / ep is the group, rank % ep the shard it holds,
//               experts [s·E/ep, (s+1)·E/ep) of every MoE layer (MTP ones included);
//               the MoE layer's all-to-alls run inside it.
//   EDP group   the W/ep ranks holding the same shard (rank % ep equal): expert data parallel.
// Attention, dense layers, shared experts, routers (and their biases), embeddings and
// heads are replicated; every rank is a data-parallel rank for them and reads its slice
// of the global batch (as without EP).
//
// Gradients: each rank's loss is the mean over its own tokens; the all-to-all backward
// brings every token's gradient to its expert's owner, so a local expert's gradient is
// the sum over the EP group's losses. Summing it over the EDP group and dividing by W
// gives the single-process gradient, as averaging the replicated ones over W does.
// Expert gradients are always defined (zeros when no row came), as a single process's
// stacked expert tensors are. The clipping norm counts every expert once.
//
// Host syncs: each MoE layer's dispatch exchanges its [ep, E/ep] counts with one all-to-all on
// the rows' device and reads the send / receive split sizes once (c10d's all-to-all of the
// rows takes them on the host, as in torchtitan and Megatron); the regrouping of the received
// rows by local expert, combine and the backward read nothing. grad_norm() stays on the
// device (the trainer reads it once, for logging and the non-finite check). The replicated
// gradients are averaged by a GradReducer during the backward (trainer/grad_reducer.h; one
// flag all-reduce), the expert ones by ProcessGroup::average_gradients over the EDP group
// after it (reads which gradients exist: one more).
//
// Group-limited routing (model.n_group, topk_group) maps onto EP ranks: with n_group a
// multiple of ep_size, expert group g lives on rank g / (n_group / ep_size), so each token
// reaches at most topk_group EP ranks (DeepSeek-V3's node-limited routing, M = topk_group).
//
// The model is built whole (same init as one process), then shard() keeps each rank's
// slice; checkpoints store one file pair per shard (trainer/checkpoint.h) and load into
// any ep_size / world size.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "models/expert_dispatch.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"
#include "trainer/distributed.h"

namespace moetrain {

// Differentiable all-to-all of rows (ProcessGroup::all_to_all): forward sends
// send_splits[r] rows to rank r of `group`; backward sends the gradients back
// (the reverse all-to-all). x: [sum send_splits, ...] -> [sum recv_splits, ...]
torch::Tensor ep_all_to_all(ProcessGroup& group, const torch::Tensor& x, const std::vector<int64_t>& send_splits,
                            const std::vector<int64_t>& recv_splits);

// The regrouping of received rows: recv_counts [S, E_local] int64 (on any device), rows of
// local expert e from source s; the rows arrive source-major (s, then e), the local experts
// take them expert-major (e, then s), each block in arrival order; total = recv_counts.sum(),
// known on the host. Computed on recv_counts' device without a sync or a sort.
struct EpRegroup {
  torch::Tensor regroup;  // [total] int64: the received row of each expert-major row
  torch::Tensor restore;  // [total] int64: its inverse, the expert-major row of each received row
};
EpRegroup ep_regroup(const torch::Tensor& recv_counts, int64_t total);

// layers.{i}.ffn.experts.w13 / w2 and the MTP modules' (the stacked routed experts).
bool ep_is_expert_param(const std::string& name);

class ExpertParallel {
 public:
  // Creates the EP and EDP groups (every rank of `world` must call this). Throws DistError
  // when ep_size does not divide the world size.
  ExpertParallel(ProcessGroup& world, int64_t ep_size);
  ~ExpertParallel();

  bool enabled() const { return ep_size_ > 1; }
  int64_t size() const { return ep_size_; }
  int64_t index() const { return world_.rank() % ep_size_; }  // the expert shard held
  ProcessGroup& ep_group() { return *ep_; }
  ProcessGroup& edp_group() { return *edp_; }

  // Keeps this rank's expert shard in every MoE layer and routes through the EP group;
  // records which parameters are experts. Call after init, before the optimizer. No-op
  // (but for the bookkeeping) without EP.
  void shard(Transformer& model);
  // This rank's routed experts of every layer (count 0 without EP), for checkpoints.
  ExpertShard expert_shard() const;

  // Every replicated parameter and buffer becomes world rank 0's, every expert shard its
  // EDP group's first rank's.
  void broadcast_model(Transformer& model);
  // Replicated gradients averaged over the world, expert ones summed over EDP / W.
  void reduce_gradients();
  // Only the expert part (no-op without EP): for when a GradReducer over replicated_params()
  // averaged the rest during the backward.
  void reduce_expert_gradients();
  // The parameters every rank holds (all of them without EP), in registration order.
  const std::vector<torch::Tensor>& replicated_params() const { return dense_; }
  // The global gradient norm (replicated parameters once, each expert shard once), a 0-dim
  // fp64 tensor on the parameters' device, no host read: for FusedAdamW::clip_next_step.
  // With EP a collective: every rank of the EP group calls it.
  torch::Tensor grad_norm();

  // Saves a checkpoint (every rank calls it): rank 0 prepares the temporary directory,
  // the first EDP replica of each shard writes its expert files into it, rank 0 writes the
  // rest and commits. Returns the step directory.
  std::string save_checkpoint(const ExperimentConfig& cfg, Transformer& model, torch::optim::AdamW& optimizer,
                              const TrainingState& state);

 private:
  ProcessGroup& world_;
  int64_t ep_size_;
  int64_t job_ = 0;  // rank 0's pid: names the shared temporary checkpoint directory
  int64_t n_experts_ = 0;
  std::unique_ptr<ProcessGroup> ep_, edp_;
  std::vector<torch::Tensor> dense_, experts_;
};

}  // namespace moetrain
