#include "trainer/optim.h"

#include "models/kernels/sum_squares.h"

#include <cmath>
#include <optional>

#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>

namespace moetrain {

std::unique_ptr<FusedAdamW> build_optimizer(torch::nn::Module& model, const OptimConfig& cfg) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.parameters()) {
    if (!p.requires_grad()) continue;
    (weight_decayed(p) ? decay : no_decay).push_back(p);  // norms (1-D) are not decayed
  }
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(cfg.lr).betas({cfg.betas[0], cfg.betas[1]}).eps(cfg.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(cfg.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<FusedAdamW>(groups, torch::optim::AdamWOptions(cfg.lr));
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  bool fused = true;
  for (const auto& group : param_groups()) {
    const auto& opt = static_cast<const torch::optim::AdamWOptions&>(group.options());
    if (opt.amsgrad()) fused = false;
    for (const auto& p : group.params())  // (parameters without a gradient are not stepped)
      if (p.grad().defined() && (!p.is_cuda() || p.scalar_type() != torch::kFloat)) fused = false;
  }
  if (!fused) {  // the reference
    if (grad_scale_.defined()) {
      torch::NoGradGuard no_grad;
      for (auto& group : param_groups())
        for (auto& p : group.params())
          if (p.grad().defined()) p.mutable_grad().div_(grad_scale_.to(p.grad().device()));
      grad_scale_ = torch::Tensor();
    }
    return torch::optim::AdamW::step(closure);
  }
  TORCH_CHECK(!closure, "FusedAdamW: closures are not supported on CUDA");

  torch::NoGradGuard no_grad;
  for (auto& group : param_groups()) {
    const auto& opt = static_cast<const torch::optim::AdamWOptions&>(group.options());
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
    std::vector<float> steps;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = state()[p.unsafeGetTensorImpl()];
      if (!slot) {  // as AdamW::step initialises it
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(st);
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
      st.step(st.step() + 1);  // the kernel reads the incremented step for the bias corrections
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(st.exp_avg());
      exp_avg_sqs.push_back(st.exp_avg_sq());
      steps.push_back(static_cast<float>(st.step()));
    }
    if (params.empty()) continue;
    // One host-to-device copy for all step counts (scalar views of one tensor), from pinned
    // memory and asynchronous: a pageable copy would make the host wait for the GPU to drain
    // (after a CUDA graph's replay, the whole step) before it queues the rest of the update.
    torch::Tensor host_steps = torch::tensor(steps);
    if (params[0].is_cuda()) host_steps = host_steps.pin_memory();
    const std::vector<torch::Tensor> step_tensors =
        host_steps.to(params[0].device(), /*non_blocking=*/true).unbind(0);
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, step_tensors, opt.lr(),
                      std::get<0>(opt.betas()), std::get<1>(opt.betas()), opt.weight_decay(), opt.eps(),
                      /*amsgrad=*/false, /*maximize=*/false,
                      // an undefined tensor inside the optional would be read: pass none
                      grad_scale_.defined() ? std::optional<torch::Tensor>(grad_scale_) : std::nullopt);
  }
  grad_scale_ = torch::Tensor();
  return {};
}

void FusedAdamW::clip_next_step(const torch::Tensor& total_norm, double max_norm) {
  TORCH_CHECK(max_norm > 0.0, "clip_next_step: max_norm must be positive");
  grad_scale_ = ((total_norm.to(torch::kFloat) + 1e-6) / max_norm).clamp_min(1.0);
}

torch::Tensor grad_norm(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return torch::zeros({}, torch::kFloat);
  return grad_squares_sum(grads).sqrt().to(torch::kFloat);
}

torch::Tensor grad_squares_sum(const std::vector<torch::Tensor>& grads) {
  // CUDA fp32/bf16 gradients: one kernel over all of them (ATen's _foreach_norm with an fp32
  // result for bf16 gradients takes one reduction kernel per tensor).
  if (sum_of_squares_kernel_ok(grads)) return sum_of_squares_fused(grads);
  return grad_squares_sum_reference(grads);
}

torch::Tensor grad_squares_sum_reference(const std::vector<torch::Tensor>& grads) {
  TORCH_CHECK(!grads.empty(), "grad_squares_sum: no gradients");
  bool fp64 = false;
  for (const auto& g : grads) fp64 = fp64 || g.scalar_type() == torch::kDouble;
  // per tensor, accumulated and returned in fp32 (bf16 gradients included)
  const std::vector<torch::Tensor> norms = at::_foreach_norm(grads, 2, fp64 ? torch::kDouble : torch::kFloat);
  return torch::stack(norms).square().sum();
}

double lr_at(int64_t step, const OptimConfig& cfg, int64_t total_steps) {
  if (step < cfg.warmup_steps) return cfg.lr * static_cast<double>(step + 1) / static_cast<double>(cfg.warmup_steps);
  if (cfg.schedule == "constant") return cfg.lr;
  if (cfg.schedule == "multistep") {
    double lr = cfg.lr;
    for (int64_t m : cfg.milestones)
      if (step >= m) lr *= cfg.multistep_factor;
    return lr;
  }
  // cosine from lr (end of warmup) to min_lr (last step)
  const int64_t span = std::max<int64_t>(1, total_steps - cfg.warmup_steps - 1);
  const double progress = std::min(1.0, static_cast<double>(step - cfg.warmup_steps) / static_cast<double>(span));
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * progress));
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& group : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

}  // namespace moetrain
