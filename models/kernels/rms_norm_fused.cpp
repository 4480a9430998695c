#include "models/kernels/rms_norm_fused.h"

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/rms_norm_kernels.h"
#endif

namespace moetrain {

torch::Tensor rms_norm_reference(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const auto compute = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const torch::Tensor xf = x.to(compute);
  const torch::Tensor normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

using kernels::check_kernel_launch;
using kernels::current_stream_of;
using kernels::kernel_dtype_code;

struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  // x: [R, D] contiguous, weight: [D] fp32 contiguous -> [R, D] out_dtype
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps, torch::ScalarType out_dtype) {
    const int64_t rows = x.size(0), dim = x.size(1);
    torch::Tensor out = torch::empty({rows, dim}, x.options().dtype(out_dtype));
    torch::Tensor rstd = torch::empty({rows}, x.options().dtype(torch::kFloat));
    check_kernel_launch(kernels::launch_rms_norm_forward(x.data_ptr(), weight.data_ptr<float>(), out.data_ptr(),
                                                         rstd.data_ptr<float>(), rows, dim, static_cast<float>(eps),
                                                         kernel_dtype_code(x), kernel_dtype_code(out_dtype),
                                                         current_stream_of(x)),
                        "rms_norm forward");
    ctx->save_for_backward({x, weight, rstd});
    ctx->saved_data["out_dtype"] = static_cast<int64_t>(out_dtype);
    return out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &weight = saved[1], &rstd = saved[2];
    const auto out_dtype = static_cast<torch::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    const torch::Tensor grad_out = grads[0].to(out_dtype).contiguous();
    const int64_t rows = x.size(0), dim = x.size(1);
    torch::Tensor grad_x = torch::empty_like(x);
    torch::Tensor partial =
        torch::empty({kernels::rms_norm_backward_partials(rows), dim}, x.options().dtype(torch::kFloat));
    check_kernel_launch(kernels::launch_rms_norm_backward(x.data_ptr(), weight.data_ptr<float>(),
                                                          rstd.data_ptr<float>(), grad_out.data_ptr(),
                                                          grad_x.data_ptr(), partial.data_ptr<float>(), rows, dim,
                                                          kernel_dtype_code(x), kernel_dtype_code(out_dtype),
                                                          current_stream_of(x)),
                        "rms_norm backward");
    return {grad_x, partial.sum(0), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace
#endif

torch::Tensor rms_norm_fused(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                             torch::ScalarType out_dtype) {
#ifdef MOETRAIN_WITH_CUDA
  const bool kernel_ok = x.is_cuda() && weight.device() == x.device() && weight.scalar_type() == torch::kFloat &&
                         weight.dim() == 1 && x.size(-1) == weight.size(0) && x.numel() > 0 &&
                         kernels::kernel_dtype_ok(x.scalar_type()) && kernels::kernel_dtype_ok(out_dtype);
  if (kernel_ok) {
    const torch::Tensor rows = x.reshape({-1, x.size(-1)}).contiguous();  // [R, D]
    return RMSNormFunction::apply(rows, weight.contiguous(), eps, out_dtype).view(x.sizes());
  }
#endif
  return rms_norm_reference(x, weight, eps).to(out_dtype);
}

}  // namespace moetrain
