// defines: make_linear — the bias-free Linear every matmul weight in the model
// uses, initialized normal(0, std) (DeepSeek-V3: std = 0.006).
#pragma once

#include <torch/torch.h>

namespace moetrain {

// weight: [out, in]
inline torch::nn::Linear make_linear(int64_t in, int64_t out, double std) {
  torch::nn::Linear linear(torch::nn::LinearOptions(in, out).bias(false));
  torch::NoGradGuard no_grad;
  linear->weight.normal_(0.0, std);
  return linear;
}

}  // namespace moetrain
