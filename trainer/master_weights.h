// defines: ParamSwap, bf16_weight_params, MasterWeights — train.param_dtype: bf16, the model
// storing its weight matrices in bf16 while the optimizer updates fp32 master copies
// (Megatron's --bf16 with its main params, DeepSeek-V3's FP32 master weights).
//
// Why: under autocast over fp32 weights every forward casts each matrix to bf16 and every
// backward casts its bf16 gradient back to fp32, both per micro-step and growing with the
// expert count; data parallelism then reduces 4-byte gradients. With bf16 matrices the
// forward and backward run on them directly, gradients are bf16 (half the bytes to reduce),
// and the casts move to the optimizer step (once per step). ZeRO-1 shards the masters
// (trainer/zero.h), so per-rank fp32 weights fall as 1/DP too.
//
// Which parameters: the trainable ones with ≥ 2 dims (embeddings, projections, expert
// stacks: all but ~0.1 % of the weights). Norm weights (1-D) stay fp32 — they are their own
// masters, and the fused RMSNorm kernel reads fp32 weights.
//
// The optimizer's state is AdamW's, keyed by the model's parameters; optim.moment_dtype bf16
// stores these parameters' moments in bf16 (DeepSeek-V3 §3.3.2; Megatron's
// --exp-avg-dtype/--exp-avg-sq-dtype): the arithmetic stays fp32, only the storage rounds. On CUDA one
// fused kernel steps every master from its bf16 gradient and writes the bf16 weight; the
// reference twin swaps the parameters' storage (Tensor::set_data: same TensorImpl, so the
// AdamW state, autograd hooks and every module reference stay valid) to the fp32 masters
// with the gradients upcast, lets AdamW step them, and rounds the new masters to bf16.
// Checkpoint saves run inside the same swap, so model.safetensors holds the fp32 masters and
// a resume (which happens before the cast) is exact.
#pragma once

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "trainer/optim.h"

namespace moetrain {

// For a scope, `params[i]` holds the data of `with[i]` (same shape; any dtype); the previous
// data comes back on destruction. Gradients are left alone.
class ParamSwap {
 public:
  ParamSwap(std::vector<torch::Tensor> params, const std::vector<torch::Tensor>& with);
  ~ParamSwap();
  ParamSwap(const ParamSwap&) = delete;
  ParamSwap& operator=(const ParamSwap&) = delete;

 private:
  std::vector<torch::Tensor> params_, saved_;
};

// Whether param_dtype: bf16 stores `p` in bf16: trainable, floating, ≥ 2 dims (the one rule
// for the replicated masters and ZeRO-1's spaces).
inline bool stored_in_bf16(const torch::Tensor& p) { return p.requires_grad() && p.is_floating_point() && p.dim() >= 2; }

// Those parameters of `model`, in registration order.
std::vector<torch::Tensor> bf16_weight_params(torch::nn::Module& model);

// Replaces each parameter's data by its bf16 rounding (a no-op for bf16 ones).
void cast_params_to_bf16(const std::vector<torch::Tensor>& params);

// A split fp32 master (optim.master_storage: split; the kernel's codec in
// models/kernels/master_adamw_kernels.h): the weight w = master rounded to nearest even bf16
// and this int16 remainder, bits(master) − bits(w)·2¹⁶ (+2¹⁵, an exact tie rounded down, is
// stored as 2¹⁵ − 1: the master one fp32 ulp lower, still rounding to w). master: fp32.
torch::Tensor split_master_remainder(const torch::Tensor& master);
// The fp32 master from its bf16 weight and int16 remainder: exact.
torch::Tensor join_split_master(const torch::Tensor& weight, const torch::Tensor& remainder);

// The replicated optimizer's masters (zero_stage 0): a full fp32 copy of each parameter, or
// (split) its low half.
class MasterWeights {
 public:
  // Copies `params`' current (fp32) values as the masters, then casts the params to bf16.
  // moment_dtype: how their AdamW moments are stored (fp32 or bf16); moments of another
  // dtype (a resume: checkpoints load them as fp32) are converted at the next step.
  // split (optim.master_storage: split): each master kept as its bf16 weight (the param itself)
  // and an int16 remainder (split_master_remainder), 2 bytes a parameter instead of 4.
  explicit MasterWeights(std::vector<torch::Tensor> params, torch::ScalarType moment_dtype = torch::kFloat,
                         bool split = false);

  // The optimizer step on the masters (a clip set by clip_next_step applies), then each
  // param gets the bf16 rounding of its updated master; the params keep their gradients (as
  // FusedAdamW leaves them: a captured backward, trainer/cuda_graph.h, writes them again).
  // fused (CUDA): one kernel over every master (models/kernels/master_adamw_kernels.h) reads
  // the bf16 gradients, updates master and moments (the optimizer's own AdamW state) and
  // writes the bf16 weights; the rest of the optimizer's parameters (fp32 norms) take its
  // step. The reference twin (CPU, or fused = false): the params hold the masters and fp32
  // copies of their gradients (and bf16 moments fp32 copies, rounded back after) while
  // optimizer.step() runs.
  void step(FusedAdamW& optimizer, bool fused = true);

  // The params hold their fp32 masters while the result lives (checkpoint saves).
  std::unique_ptr<ParamSwap> expose() const { return std::make_unique<ParamSwap>(params_, masters()); }

  // The fp32 masters (joined from weight and remainder when split: new tensors).
  std::vector<torch::Tensor> masters() const;
  int64_t bytes() const;

 private:
  // The fused step; false (nothing done) where it does not apply.
  bool fused_step(FusedAdamW& optimizer);
  // The existing moments of params_ in `dtype` (a no-op for those already in it).
  void store_moments_as(FusedAdamW& optimizer, torch::ScalarType dtype) const;

  std::vector<torch::Tensor> params_, masters_;  // masters_: fp32, or int16 remainders (split_)
  torch::ScalarType moment_dtype_;
  bool split_ = false;
};

}  // namespace moetrain
