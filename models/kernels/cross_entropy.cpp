#include "models/kernels/cross_entropy.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/cross_entropy_kernels.h"
#include "models/kernels/launch.h"
#endif

namespace moetrain {

bool cross_entropy_kernel_ok(const torch::Tensor& logits) {
#ifdef MOETRAIN_WITH_CUDA
  return logits.is_cuda() && logits.dim() == 2 &&
         (logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16) && logits.is_contiguous();
#else
  (void)logits;
  return false;
#endif
}

#ifdef MOETRAIN_WITH_CUDA
namespace {
// targets [n] int64, loss and lse [n] fp32, all contiguous
void check_row_outputs(const char* what, int64_t n, const torch::Tensor& targets, const torch::Tensor& loss,
                       const torch::Tensor& lse) {
  TORCH_CHECK(targets.numel() == n && targets.scalar_type() == torch::kLong && targets.is_contiguous(), what,
              ": targets must be [n] contiguous int64");
  TORCH_CHECK(loss.numel() == n && lse.numel() == n && loss.is_contiguous() && lse.is_contiguous() &&
                  loss.scalar_type() == torch::kFloat && lse.scalar_type() == torch::kFloat,
              what, ": loss and lse must be [n] contiguous fp32");
}
}  // namespace
#endif

void cross_entropy_rows_fused(const torch::Tensor& logits, const torch::Tensor& targets, int64_t ignore_index,
                              torch::Tensor& loss, torch::Tensor& lse) {
  if (!cross_entropy_kernel_ok(logits)) throw std::invalid_argument("cross_entropy_rows_fused: contiguous fp32 or bf16 CUDA logits");
#ifdef MOETRAIN_WITH_CUDA
  const int64_t n = logits.size(0);
  check_row_outputs("cross_entropy_rows_fused", n, targets, loss, lse);
  kernels::check_kernel_launch(
      kernels::launch_cross_entropy_forward(logits.data_ptr(), kernels::kernel_dtype_code(logits),
                                            targets.data_ptr<int64_t>(), n, logits.size(1),
                                            ignore_index, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                            kernels::current_stream_of(logits)),
      "cross-entropy forward");
#else
  (void)targets, (void)ignore_index, (void)loss, (void)lse;
#endif
}

torch::Tensor cross_entropy_grad_fused(const torch::Tensor& logits, const torch::Tensor& lse, const torch::Tensor& targets,
                                       const torch::Tensor& scale, int64_t ignore_index, torch::ScalarType grad_dtype) {
  if (!cross_entropy_kernel_ok(logits) || (grad_dtype != torch::kFloat && grad_dtype != torch::kBFloat16))
    throw std::invalid_argument("cross_entropy_grad_fused: contiguous fp32 or bf16 CUDA logits, fp32/bf16 gradient");
#ifdef MOETRAIN_WITH_CUDA
  const int64_t n = logits.size(0);
  TORCH_CHECK(targets.numel() == n && targets.scalar_type() == torch::kLong && targets.is_contiguous() &&
                  lse.numel() == n && lse.scalar_type() == torch::kFloat && lse.is_contiguous(),
              "cross_entropy_grad_fused: targets [n] int64 and lse [n] fp32, contiguous");
  const torch::Tensor k = scale.to(logits.device(), torch::kFloat).contiguous();
  TORCH_CHECK(k.numel() == 1, "cross_entropy_grad_fused: scale must have one element");
  torch::Tensor grad = torch::empty(logits.sizes(), logits.options().dtype(grad_dtype));
  kernels::check_kernel_launch(
      kernels::launch_cross_entropy_backward(logits.data_ptr(), kernels::kernel_dtype_code(logits), lse.data_ptr<float>(),
                                             targets.data_ptr<int64_t>(), k.data_ptr<float>(), n, logits.size(1),
                                             ignore_index, grad.data_ptr(), kernels::kernel_dtype_code(grad_dtype),
                                             kernels::current_stream_of(logits)),
      "cross-entropy backward");
  return grad;
#else
  (void)lse, (void)targets, (void)scale, (void)ignore_index;
  return {};
#endif
}

torch::Tensor cross_entropy_rows_and_grad_fused(torch::Tensor& logits, const torch::Tensor& targets,
                                                const torch::Tensor& scale, int64_t ignore_index, torch::Tensor& loss,
                                                torch::Tensor& lse, torch::ScalarType grad_dtype) {
  if (!cross_entropy_kernel_ok(logits) || (grad_dtype != torch::kFloat && grad_dtype != torch::kBFloat16))
    throw std::invalid_argument("cross_entropy_rows_and_grad_fused: contiguous fp32 or bf16 CUDA logits, fp32/bf16 gradient");
#ifdef MOETRAIN_WITH_CUDA
  const int64_t n = logits.size(0);
  check_row_outputs("cross_entropy_rows_and_grad_fused", n, targets, loss, lse);
  const torch::Tensor k = scale.to(logits.device(), torch::kFloat).contiguous();
  TORCH_CHECK(k.numel() == 1, "cross_entropy_rows_and_grad_fused: scale must have one element");
  torch::Tensor grad = logits.scalar_type() == grad_dtype ? logits : torch::empty(logits.sizes(), logits.options().dtype(grad_dtype));
  kernels::check_kernel_launch(
      kernels::launch_cross_entropy_forward_grad(logits.data_ptr(), kernels::kernel_dtype_code(logits),
                                                 targets.data_ptr<int64_t>(), k.data_ptr<float>(), n, logits.size(1),
                                                 ignore_index, loss.data_ptr<float>(), lse.data_ptr<float>(),
                                                 grad.data_ptr(), kernels::kernel_dtype_code(grad_dtype),
                                                 kernels::current_stream_of(logits)),
      "cross-entropy forward + gradient");
  return grad;
#else
  (void)targets, (void)scale, (void)ignore_index, (void)loss, (void)lse;
  return {};
#endif
}

}  // namespace moetrain
