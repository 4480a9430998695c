#include "models/rms_norm.h"

#include "models/autocast.h"
#include "models/kernels/rms_norm_fused.h"

namespace moetrain {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

namespace {

// Every consumer of a norm is a matmul, which bf16 autocast would cast to bf16 anyway:
// emitting bf16 directly gives the same values and skips an fp32 round trip.
torch::ScalarType cuda_output_dtype(const torch::Tensor& x, const torch::Tensor& weight) {
  return cuda_bf16_autocast(x) ? torch::kBFloat16 : torch::promote_types(weight.scalar_type(), x.scalar_type());
}

}  // namespace

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  if (!x.is_cuda()) return rms_norm_reference(x, weight, eps);
  return rms_norm_fused(x, weight, eps, cuda_output_dtype(x, weight));
}

std::pair<torch::Tensor, torch::Tensor> RMSNormImpl::forward_add(const torch::Tensor& x, const torch::Tensor& delta) {
  if (!x.is_cuda()) return add_rms_norm_reference(x, delta, weight, eps);
  return add_rms_norm_fused(x, delta, weight, eps, cuda_output_dtype(x, weight));
}

}  // namespace moetrain
