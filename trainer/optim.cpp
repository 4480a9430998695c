#include "trainer/optim.h"

#include <cmath>

namespace moetrain {

std::unique_ptr<torch::optim::AdamW> build_optimizer(torch::nn::Module& model, const OptimConfig& cfg) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.parameters()) {
    if (!p.requires_grad()) continue;
    (p.dim() >= 2 ? decay : no_decay).push_back(p);  // norms (1-D) are not decayed
  }
  auto options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(cfg.lr).betas({cfg.betas[0], cfg.betas[1]}).eps(cfg.eps).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, options(cfg.weight_decay));
  groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<torch::optim::AdamW>(groups, torch::optim::AdamWOptions(cfg.lr));
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
