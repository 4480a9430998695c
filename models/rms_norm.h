// defines: RMSNorm — root-mean-square layer norm (no bias, no mean subtraction),
// computed in fp32 (fp64 for fp64 inputs) and cast back to the input dtype.
#pragma once

#include <torch/torch.h>

namespace moetrain {

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);

  // x: [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x);

  torch::Tensor weight;  // [dim], init ones
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace moetrain
