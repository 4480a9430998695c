// defines: ZeroFragment, ZeroShardLayout, zero_shard_layout, ZeroAdamW, OptimizerPieces,
// read_optimizer_pieces, zero_shard_file_name — ZeRO-1 (distributed.zero_stage: 1), the
// sharded AdamW DeepSeek-V3 trained with: every rank keeps the AdamW moments of 1/DP of the
// parameters only.
//
// With train.param_dtype fp32 the parameters are fp32 master weights (bf16 autocast casts
// on the fly) and only the moments are sharded; with bf16 the weight matrices are bf16 and
// their fp32 masters are sharded too (use_bf16_params; with optim.moment_dtype bf16 their
// moments are stored in bf16 from then on, stepped through fp32 copies). A flat space is the parameters of
// one dtype (the bf16 matrices apart) concatenated in registration order,
// padded to world · S and cut into `world` equal shards of S elements; rank r owns
// [r·S, (r+1)·S). A parameter may straddle shards: each rank holds fragments (element
// ranges of flattened parameters). One optimizer step:
//   reduce_gradients  grads (zeros where undefined) → flat → reduce-scatter (sum) → ÷ world:
//                     the averaged gradient of the rank's shard; the parameters' .grad are freed
//   clip_grad_norm    global L2 norm = sqrt(all-reduce of the shards' sums of squares);
//                     the shard is scaled as clip_grad_norm_ scales whole gradients
//   step              AdamW on the rank's fragments (at::_fused_adamw_ on CUDA fp32, the
//                     reference formulas of torch::optim::AdamW otherwise), per-parameter
//                     step counts, weight decay exactly as build_optimizer groups it, then
//                     all-gather of the parameters
// A parameter whose gradient is undefined on every rank is skipped as AdamW skips it (no
// decay, no step count), so stage 1 trains what stage 0 trains up to float rounding.
// The step counts are kept for every parameter on every rank (scalars); the moments
// exist only for the shard.
//
// Checkpoints: rank r writes optimizer-zero-<r:05d>-of-<W:05d>.safetensors with, per
// fragment, exp_avg.<name>[b:e] and exp_avg_sq.<name>[b:e] (elements b..e-1 of the
// flattened parameter, 1-D) and step.<name> for every parameter that has state. Any world
// size (and stage 0) re-assembles its own state from whatever fragments exist
// (read_optimizer_pieces); a gap is an error naming the parameter.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "trainer/distributed.h"
#include "trainer/experiment_config.h"
#include "trainer/master_weights.h"
#include "trainer/optim.h"

namespace moetrain {

struct ZeroFragment {
  int64_t param = 0;         // index into the layout's parameters
  int64_t begin = 0;         // elements [begin, end) of the flattened parameter
  int64_t end = 0;
  int64_t shard_offset = 0;  // where they sit in the rank's shard
};

struct ZeroShardLayout {
  std::vector<int64_t> numels;   // per parameter, in order
  std::vector<int64_t> offsets;  // start of each parameter in the flat space
  int64_t numel = 0;             // Σ numels
  int64_t shard_numel = 0;       // S = ceil(numel / world) (the last shard is zero-padded)
  int64_t world = 1;
  // The fragments of rank `rank`, in flat order; empty parameters have none.
  std::vector<ZeroFragment> fragments(int64_t rank) const;
};

ZeroShardLayout zero_shard_layout(const std::vector<int64_t>& numels, int64_t world);

// "optimizer-zero-00001-of-00004.safetensors"
std::string zero_shard_file_name(int64_t rank, int64_t world);

// The optimizer state of a checkpoint, whatever wrote it: per parameter name its step count
// and the pieces of its flattened moments (one piece [0, numel) for optimizer.safetensors).
struct OptimizerPieces {
  struct Piece {
    int64_t begin = 0, end = 0;
    torch::Tensor exp_avg, exp_avg_sq;  // 1-D, CPU
  };
  std::map<std::string, int64_t> steps;
  std::map<std::string, std::vector<Piece>> pieces;
  // Elements [begin, end) of `name`'s moment (0 = exp_avg, 1 = exp_avg_sq) as one 1-D
  // tensor; CheckpointError naming the parameter and the first uncovered element on a gap.
  torch::Tensor assemble(const std::string& name, int which, int64_t begin, int64_t end, const std::string& where) const;
};

// optimizer.safetensors, or every optimizer-zero-*-of-W.safetensors of ckpt_dir.
OptimizerPieces read_optimizer_pieces(const std::string& ckpt_dir);

class ZeroAdamW {
 public:
  // named: the trainable parameters in registration order, identical on every rank.
  // bf16_weights (train.param_dtype bf16): the weight matrices (bf16_weight_params) get a space
  // of their own, ready for use_bf16_params.
  ZeroAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg, ProcessGroup& pg,
            bool bf16_weights = false);

  // train.param_dtype bf16, after any resume: this rank's shard of the weight matrices'
  // current (fp32) values becomes their master shard, then the parameters are cast to bf16.
  // From then on their gradients are reduce-scattered in bf16, AdamW updates the fp32 master
  // shard, and the all-gather sends bf16: per-rank fp32 weights fall as 1/DP with the moments.
  void use_bf16_params();
  // Collective: the parameters hold full fp32 weights (the masters all-gathered) while the
  // result lives, for checkpoint saves; null without bf16 parameters.
  std::unique_ptr<ParamSwap> expose_masters();

  void set_lr(double lr) { lr_ = lr; }
  double lr() const { return lr_; }
  void reduce_gradients();
  // Returns the global norm (the same on every rank); max_norm ≤ 0 or infinite: no clipping.
  double clip_grad_norm(double max_norm);
  void step();

  // Bytes of optimizer state on this rank (moments + gradient shard + master shard).
  int64_t state_bytes() const;
  // This rank's shard as checkpoint tensors (CPU), see above.
  std::vector<std::pair<std::string, torch::Tensor>> shard_tensors() const;
  // Replaces the state with this rank's part of `pieces` (any writer's world size).
  void load(const OptimizerPieces& pieces, const std::string& where);
  // Per-parameter step counts (0 = no state yet), in order; for tests.
  const std::vector<int64_t>& steps() const { return steps_; }

 private:
  struct Space {  // one dtype (and, with bf16 weights, the matrices apart from the rest)
    std::vector<int64_t> params;  // indices into params_
    ZeroShardLayout layout;
    std::vector<ZeroFragment> mine;  // fragment.param indexes `params`
    torch::Tensor grad, exp_avg, exp_avg_sq;  // [S] each
    bool matrices = false;  // bf16_weights: this space holds the weight matrices
    torch::Tensor master;   // [S] fp32 after use_bf16_params (the params are bf16 then)
    // the dtype of the reduce-scatter and all-gather: the params' own
    torch::ScalarType comm_dtype() const { return master.defined() ? torch::kBFloat16 : grad.scalar_type(); }
  };
  // This rank's fragments of the parameters' current values into `shard` ([S], any dtype).
  void copy_fragments(const Space& s, torch::Tensor& shard) const;

  ProcessGroup& pg_;
  double lr_;
  OptimConfig cfg_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> params_;
  std::vector<bool> decay_;
  std::vector<bool> active_;  // has a gradient on some rank this step
  std::vector<int64_t> steps_;
  std::vector<Space> spaces_;
};

// The optimizer distributed.zero_stage asks for, as `train` and `bench` build it: the
// replicated FusedAdamW over `model` (stage 0) or ZeroAdamW over its named parameters,
// sharded over `pg` (stage 1). Exactly one is set.
// With train.param_dtype bf16, use_bf16_weights (after any resume) makes the model's matrices
// bf16 with their fp32 masters in the optimizer (trainer/master_weights.h).
struct ModelOptimizer {
  std::unique_ptr<FusedAdamW> replicated;
  std::unique_ptr<ZeroAdamW> zero;
  std::unique_ptr<MasterWeights> masters;  // bf16 weights with the replicated optimizer
  bool bf16_weights = false;               // train.param_dtype bf16
  torch::ScalarType moment_dtype = torch::kFloat;  // optim.moment_dtype (the masters' moments)
  bool split_masters = false;                      // optim.master_storage: split

  void use_bf16_weights(torch::nn::Module& model);
  // The replicated optimizer's step (on the masters when the weights are bf16).
  void step_replicated();
  // The parameters hold fp32 weights while the result lives (checkpoint saves; collective
  // under ZeRO-1); null when they are fp32 already.
  std::unique_ptr<ParamSwap> expose_fp32_weights();
};
ModelOptimizer build_model_optimizer(torch::nn::Module& model, const ExperimentConfig& cfg, ProcessGroup& pg);

}  // namespace moetrain
