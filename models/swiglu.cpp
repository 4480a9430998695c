#include "models/swiglu.h"

#include "models/kernels/swiglu.h"
#include "models/linear.h"

namespace moetrain {

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t inter, double init_std) {
  // Registration order w1, w2, w3 (stable: optimizer state is keyed by position).
  w1 = register_module("w1", make_linear(dim, inter, init_std));
  w2 = register_module("w2", make_linear(inter, dim, init_std));
  w3 = register_module("w3", make_linear(dim, inter, init_std));
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x) {
  // One GEMM against [w1; w3] (a [2F, D] copy of the weights: ≤ 12 MB here) and the packed
  // kernel: the backward then takes x's gradient in one GEMM of depth 2F, not two and an add.
  const torch::Tensor w13 = torch::cat({w1->weight, w3->weight}, 0);  // [2F, D]
  return apply_linear(swiglu_packed(apply_linear(x, w13)), w2->weight);  // [..., 2F] -> [..., F] -> [..., D]
}

}  // namespace moetrain
