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
  return w2(swiglu_fused(w1(x), w3(x)));  // one kernel each way on CUDA
}

}  // namespace moetrain
