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

struct NormForward {
  torch::Tensor sum, out, rstd;  // sum: x + delta (undefined without delta)
};

// x: [R, D] with unit column stride (rows evenly strided; delta and x contiguous when delta is
// given), weight: [D] fp32 contiguous -> out [R, D] out_dtype
NormForward norm_forward(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& weight, double eps,
                         torch::ScalarType out_dtype) {
  const int64_t rows = x.size(0), dim = x.size(1);
  NormForward f;
  f.out = torch::empty({rows, dim}, x.options().dtype(out_dtype));
  f.rstd = torch::empty({rows}, x.options().dtype(torch::kFloat));
  if (delta.defined()) f.sum = torch::empty_like(x);
  check_kernel_launch(kernels::launch_rms_norm_forward(
                          x.data_ptr(), x.stride(0), delta.defined() ? delta.data_ptr() : nullptr,
                          f.sum.defined() ? f.sum.data_ptr() : nullptr, weight.data_ptr<float>(), f.out.data_ptr(),
                          f.rstd.data_ptr<float>(), rows, dim, static_cast<float>(eps), kernel_dtype_code(x),
                          kernel_dtype_code(out_dtype), current_stream_of(x)),
                      "rms_norm forward");
  return f;
}

// -> {grad of the normalized input (+ grad_residual when defined), grad of the weight}
std::pair<torch::Tensor, torch::Tensor> norm_backward(const torch::Tensor& x, const torch::Tensor& weight,
                                                      const torch::Tensor& rstd, torch::ScalarType out_dtype,
                                                      const torch::Tensor& grad_output,
                                                      const torch::Tensor& grad_residual) {
  const torch::Tensor grad_out = grad_output.to(out_dtype).contiguous();
  const torch::Tensor residual =
      grad_residual.defined() ? grad_residual.to(x.scalar_type()).contiguous() : torch::Tensor();
  const int64_t rows = x.size(0), dim = x.size(1);
  torch::Tensor grad_x = torch::empty({rows, dim}, x.options());
  torch::Tensor partial =
      torch::empty({kernels::rms_norm_backward_partials(rows), dim}, x.options().dtype(torch::kFloat));
  int64_t partial_rows = 0;
  check_kernel_launch(kernels::launch_rms_norm_backward(
                          x.data_ptr(), x.stride(0), weight.data_ptr<float>(), rstd.data_ptr<float>(), grad_out.data_ptr(),
                          residual.defined() ? residual.data_ptr() : nullptr, grad_x.data_ptr(),
                          partial.data_ptr<float>(), &partial_rows, rows, dim, kernel_dtype_code(x),
                          kernel_dtype_code(out_dtype), current_stream_of(x)),
                      "rms_norm backward");
  torch::Tensor grad_w = torch::empty({dim}, x.options().dtype(torch::kFloat));
  check_kernel_launch(kernels::launch_column_sum(partial.data_ptr<float>(), partial_rows, dim, grad_w.data_ptr<float>(),
                                                 current_stream_of(x)),
                      "rms_norm weight gradient");
  return {grad_x, grad_w};
}

struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  // x: [R, D] contiguous, weight: [D] fp32 contiguous -> [R, D] out_dtype
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, double eps, torch::ScalarType out_dtype) {
    NormForward f = norm_forward(x, torch::Tensor(), weight, eps, out_dtype);
    ctx->save_for_backward({x, weight, f.rstd});
    ctx->saved_data["out_dtype"] = static_cast<int64_t>(out_dtype);
    return f.out;
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto out_dtype = static_cast<torch::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    auto [grad_x, grad_w] = norm_backward(saved[0], saved[1], saved[2], out_dtype, grads[0], torch::Tensor());
    return {grad_x, grad_w, torch::Tensor(), torch::Tensor()};
  }
};

struct AddRMSNormFunction : torch::autograd::Function<AddRMSNormFunction> {
  // x, delta: [R, D] contiguous, one dtype; weight: [D] fp32 -> {h = x + delta, norm(h)}
  static torch::autograd::tensor_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                              const torch::Tensor& delta, const torch::Tensor& weight, double eps,
                                              torch::ScalarType out_dtype) {
    NormForward f = norm_forward(x, delta, weight, eps, out_dtype);
    ctx->save_for_backward({f.sum, weight, f.rstd});
    ctx->saved_data["out_dtype"] = static_cast<int64_t>(out_dtype);
    return {f.sum, f.out};
  }

  // h's gradient is its other uses' (grads[0]) plus the norm's: one pass writes their sum,
  // which is the gradient of both x and delta.
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto out_dtype = static_cast<torch::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    if (!grads[1].defined())  // the norm's output is unused
      return {grads[0], grads[0], torch::Tensor(), torch::Tensor(), torch::Tensor()};
    auto [grad_h, grad_w] = norm_backward(saved[0], saved[1], saved[2], out_dtype, grads[1], grads[0]);
    return {grad_h, grad_h, grad_w, torch::Tensor(), torch::Tensor()};
  }
};

bool kernel_applies(const torch::Tensor& x, const torch::Tensor& weight, torch::ScalarType out_dtype) {
  return x.is_cuda() && weight.device() == x.device() && weight.scalar_type() == torch::kFloat && weight.dim() == 1 &&
         x.size(-1) == weight.size(0) && x.numel() > 0 && kernels::kernel_dtype_ok(x.scalar_type()) &&
         kernels::kernel_dtype_ok(out_dtype);
}

}  // namespace
#endif

torch::Tensor rms_norm_fused(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                             torch::ScalarType out_dtype) {
#ifdef MOETRAIN_WITH_CUDA
  if (kernel_applies(x, weight, out_dtype)) {
    // [R, D]: a column slice of a wider matrix (MLA's latents) stays a view, read in place
    torch::Tensor rows = x.reshape({-1, x.size(-1)});
    if (rows.stride(1) != 1 || rows.stride(0) < rows.size(1)) rows = rows.contiguous();
    return RMSNormFunction::apply(rows, weight.contiguous(), eps, out_dtype).view(x.sizes());
  }
#endif
  return rms_norm_reference(x, weight, eps).to(out_dtype);
}

std::pair<torch::Tensor, torch::Tensor> add_rms_norm_reference(const torch::Tensor& x, const torch::Tensor& delta,
                                                               const torch::Tensor& weight, double eps) {
  const torch::Tensor h = x + delta;
  return {h, rms_norm_reference(h, weight, eps)};
}

std::pair<torch::Tensor, torch::Tensor> add_rms_norm_fused(const torch::Tensor& x, const torch::Tensor& delta,
                                                           const torch::Tensor& weight, double eps,
                                                           torch::ScalarType out_dtype) {
#ifdef MOETRAIN_WITH_CUDA
  if (kernel_applies(x, weight, out_dtype) && delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type() &&
      delta.device() == x.device()) {
    const auto outs = AddRMSNormFunction::apply(x.reshape({-1, x.size(-1)}).contiguous(),
                                                delta.reshape({-1, x.size(-1)}).contiguous(), weight.contiguous(),
                                                eps, out_dtype);
    return {outs[0].view(x.sizes()), outs[1].view(x.sizes())};
  }
#endif
  auto [h, normed] = add_rms_norm_reference(x, delta, weight, eps);
  return {h, normed.to(out_dtype)};
}

}  // namespace moetrain
