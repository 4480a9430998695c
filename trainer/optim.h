// defines: FusedAdamW, weight_decayed, build_optimizer, lr_at, set_lr — AdamW with the decay / no-decay
// split (weight decay on ≥2-D weights only; norms excluded; the router bias is a buffer
// and never reaches the optimizer) and the learning-rate schedules.
#pragma once

#include <memory>

#include <torch/torch.h>

#include "trainer/experiment_config.h"

namespace moetrain {

// torch::optim::AdamW whose step on CUDA parameters is one at::_fused_adamw_ launch
// sequence per parameter group (the multi-tensor kernel PyTorch's AdamW(fused=True) runs)
// instead of ~10 kernels per parameter; CPU parameters (and amsgrad) take AdamW::step, the
// reference twin. The state is AdamW's own (AdamWParamState: step, exp_avg, exp_avg_sq),
// updated in place, so checkpoints and resume see no difference.
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;

  // Gradient clipping folded into the next step (no host sync, no pass over the gradients):
  // every gradient is divided by max(1, (total_norm + 1e-6) / max_norm) — clip_grad_norm_'s
  // clipping — inside the fused kernel (its grad_scale) on CUDA, by an in-place division first
  // on the CPU reference path. total_norm: a 0-dim tensor (grad_norm below).
  void clip_next_step(const torch::Tensor& total_norm, double max_norm);
  // The divisor of the pending clip (0-dim fp32), undefined when none; step() consumes it.
  const torch::Tensor& pending_grad_scale() const { return grad_scale_; }

 private:
  torch::Tensor grad_scale_;  // defined while a clip is pending
};

// The global L2 norm of the parameters' gradients (undefined gradients skipped), a 0-dim
// fp32 tensor on their device: sqrt of grad_squares_sum, no host sync.
torch::Tensor grad_norm(const std::vector<torch::Tensor>& params);

// Σ g² over `grads` (the gradients themselves, at least one), 0-dim on their device, no host
// sync: one kernel for CUDA fp32/bf16 gradients (models/kernels/sum_squares.h, fp32), else
// the reference below.
torch::Tensor grad_squares_sum(const std::vector<torch::Tensor>& grads);

// The reference twin of that kernel: _foreach_norm per gradient (fp32 results, fp64 for fp64
// gradients), their squares summed.
torch::Tensor grad_squares_sum_reference(const std::vector<torch::Tensor>& grads);

// The decay / no-decay rule: weight decay on ≥2-D weights only (norms are 1-D).
inline bool weight_decayed(const torch::Tensor& p) { return p.dim() >= 2; }

// Parameter groups in registration order (stable: optimizer state is positional). A FusedAdamW.
std::unique_ptr<FusedAdamW> build_optimizer(torch::nn::Module& model, const OptimConfig& cfg);

// Learning rate for optimizer step `step` (0-based) of `total_steps`:
// linear warmup from lr/warmup to lr over warmup_steps, then cosine to min_lr,
// constant, or multistep (× multistep_factor at each milestone passed).
double lr_at(int64_t step, const OptimConfig& cfg, int64_t total_steps);

void set_lr(torch::optim::Optimizer& opt, double lr);

}  // namespace moetrain
