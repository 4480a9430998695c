// defines: SwiGLU — the gated MLP w2(silu(w1 x) * w3 x), used for the dense FFN
// of the first `first_k_dense_replace` layers and for the shared experts. w1 and w3
// stay separate parameters (HF's gate_proj / up_proj) and are stacked per call.
#pragma once

#include <torch/torch.h>

namespace moetrain {

struct SwiGLUImpl : torch::nn::Module {
  // dim: D, inter: F (hidden width); weights ~ normal(0, init_std).
  SwiGLUImpl(int64_t dim, int64_t inter, double init_std);

  // x: [..., D] -> [..., D]
  torch::Tensor forward(const torch::Tensor& x);

  torch::nn::Linear w1{nullptr};  // gate [F, D]
  torch::nn::Linear w2{nullptr};  // down [D, F]
  torch::nn::Linear w3{nullptr};  // up   [F, D]
};
TORCH_MODULE(SwiGLU);

}  // namespace moetrain
