// defines: RMSNorm — root-mean-square layer norm (no bias, no mean subtraction),
// computed in fp32 (fp64 for fp64 inputs), rounded to the input dtype, then scaled
// (Hugging Face's order; models/kernels/rms_norm_fused.h has the math). On CUDA one
// fused kernel each way; under bf16 autocast the output is bf16 (what the consuming
// matmul would cast it to).
#pragma once

#include <torch/torch.h>

namespace moetrain {

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);

  // x: [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x);
  // The residual add before it: {h = x + delta, norm(h)}, both [..., dim] (one CUDA kernel).
  std::pair<torch::Tensor, torch::Tensor> forward_add(const torch::Tensor& x, const torch::Tensor& delta);

  torch::Tensor weight;  // [dim], init ones
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace moetrain
