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

  torch::Tensor weight;  // [dim], init ones
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace moetrain
