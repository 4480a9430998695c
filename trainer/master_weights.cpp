#include "trainer/master_weights.h"

namespace moetrain {

ParamSwap::ParamSwap(std::vector<torch::Tensor> params, const std::vector<torch::Tensor>& with)
    : params_(std::move(params)) {
  TORCH_CHECK(params_.size() == with.size(), "ParamSwap: ", params_.size(), " parameters, ", with.size(), " replacements");
  saved_.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    TORCH_CHECK(params_[i].sizes() == with[i].sizes(), "ParamSwap: shape ", params_[i].sizes(), " vs ", with[i].sizes());
    saved_.push_back(params_[i].data());
    params_[i].set_data(with[i]);
  }
}

ParamSwap::~ParamSwap() {
  for (size_t i = 0; i < params_.size(); ++i) params_[i].set_data(saved_[i]);
}

std::vector<torch::Tensor> bf16_weight_params(torch::nn::Module& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model.parameters())
    if (p.requires_grad() && p.is_floating_point() && p.dim() >= 2) out.push_back(p);
  return out;
}

void cast_params_to_bf16(const std::vector<torch::Tensor>& params) {
  torch::NoGradGuard no_grad;
  for (const auto& p : params)
    if (p.scalar_type() != torch::kBFloat16) const_cast<torch::Tensor&>(p).set_data(p.data().to(torch::kBFloat16));
}

MasterWeights::MasterWeights(std::vector<torch::Tensor> params) : params_(std::move(params)) {
  torch::NoGradGuard no_grad;
  masters_.reserve(params_.size());
  for (const auto& p : params_) {
    TORCH_CHECK(p.scalar_type() == torch::kFloat, "MasterWeights: the masters come from fp32 parameters, got ",
                p.scalar_type());
    masters_.push_back(p.data().clone());
  }
  cast_params_to_bf16(params_);
}

int64_t MasterWeights::bytes() const {
  int64_t b = 0;
  for (const auto& m : masters_) b += static_cast<int64_t>(m.nbytes());
  return b;
}

void MasterWeights::step(torch::optim::Optimizer& optimizer) {
  torch::NoGradGuard no_grad;
  // fp32 gradients, each bf16 one freed as soon as it is upcast (peak: +2 bytes a parameter)
  std::vector<torch::Tensor> grads32(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].grad().defined()) continue;
    grads32[i] = params_[i].grad().to(torch::kFloat);
    params_[i].mutable_grad() = torch::Tensor();
  }
  {
    ParamSwap swap(params_, masters_);
    for (size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = grads32[i];
    grads32.clear();
    optimizer.step();
    for (auto& p : params_) p.mutable_grad() = torch::Tensor();
  }
  for (size_t i = 0; i < params_.size(); ++i) params_[i].data().copy_(masters_[i]);
}

}  // namespace moetrain
