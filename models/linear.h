// defines: make_linear, apply_linear — the bias-free Linear every matmul weight in the model
// uses, initialized normal(0, std) (DeepSeek-V3: std = 0.006), and the product the model
// applies it with.
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

// x: [..., in], w: [out, in] -> x·wᵀ: [..., out], as torch::linear (bf16 under CUDA autocast).
// On CUDA its backward runs the weight gradient dYᵀ·X on a second stream beside dX = dY·W
// (weight_grad_stream.h); elsewhere, or with MOETRAIN_WGRAD_STREAM off, it is torch::linear,
// which is also the twin the tests hold it to.
torch::Tensor apply_linear(const torch::Tensor& x, const torch::Tensor& w);

}  // namespace moetrain
