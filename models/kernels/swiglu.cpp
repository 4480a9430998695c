#include "models/kernels/swiglu.h"

#include <vector>

#include <fmt/format.h>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/swiglu_kernels.h"
#endif

namespace moetrain {

torch::Tensor swiglu_reference(const torch::Tensor& gate, const torch::Tensor& up) {
  return torch::silu(gate) * up;
}

torch::Tensor swiglu_packed_reference(const torch::Tensor& gu) {
  const int64_t f = gu.size(-1) / 2;
  return swiglu_reference(gu.narrow(-1, 0, f), gu.narrow(-1, f, f));
}

bool fused_kernels_available() {
#ifdef MOETRAIN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

using kernels::check_kernel_launch;
using kernels::current_stream_of;
using kernels::kernel_dtype_code;

struct SwiGLUPackedFunction : torch::autograd::Function<SwiGLUPackedFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gu) {
    ctx->save_for_backward({gu});
    const int64_t f = gu.size(-1) / 2, rows = gu.numel() / gu.size(-1);
    std::vector<int64_t> shape = gu.sizes().vec();
    shape.back() = f;
    torch::Tensor out = torch::empty(shape, gu.options());
    check_kernel_launch(kernels::launch_swiglu_packed_forward(gu.data_ptr(), nullptr, out.data_ptr(), rows, f,
                                                              kernel_dtype_code(gu), current_stream_of(gu)),
                        "swiglu packed forward");
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    return {swiglu_packed_backward(ctx->get_saved_variables()[0], grads[0])};
  }
};

bool swiglu_kernel_ok(const torch::Tensor& gu) {
  return gu.is_cuda() && (gu.scalar_type() == torch::kFloat32 || gu.scalar_type() == torch::kBFloat16);
}

bool swiglu_scaled_kernel_ok(const torch::Tensor& gu, const torch::Tensor& scale) {
  return swiglu_kernel_ok(gu) && scale.device() == gu.device() && scale.scalar_type() == torch::kFloat32;
}

struct SwiGLUScaledFunction : torch::autograd::Function<SwiGLUScaledFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gu,
                               const torch::Tensor& scale) {
    ctx->save_for_backward({gu, scale});
    const int64_t f = gu.size(-1) / 2, rows = gu.numel() / gu.size(-1);
    std::vector<int64_t> shape = gu.sizes().vec();
    shape.back() = f;
    torch::Tensor out = torch::empty(shape, gu.options());
    check_kernel_launch(kernels::launch_swiglu_packed_forward(gu.data_ptr(), scale.data_ptr<float>(), out.data_ptr(),
                                                              rows, f, kernel_dtype_code(gu), current_stream_of(gu)),
                        "swiglu scaled forward");
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_gu, grad_scale] = swiglu_packed_scaled_backward(saved[0], saved[1], grads[0]);
    return {grad_gu, grad_scale};
  }
};

}  // namespace
#endif

torch::Tensor swiglu_packed(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, "swiglu_packed: the last dimension (gate ‖ up) must be even, got ",
              gu.sizes());
#ifdef MOETRAIN_WITH_CUDA
  if (swiglu_kernel_ok(gu)) return SwiGLUPackedFunction::apply(gu.contiguous());
#endif
  return swiglu_packed_reference(gu);
}

torch::Tensor swiglu_packed_backward(const torch::Tensor& gu, const torch::Tensor& grad_out) {
  const int64_t f = gu.size(-1) / 2;
#ifdef MOETRAIN_WITH_CUDA
  if (swiglu_kernel_ok(gu)) {
    const torch::Tensor g = gu.contiguous(), go = grad_out.to(gu.scalar_type()).contiguous();
    torch::Tensor grad_gu = torch::empty_like(g);
    check_kernel_launch(kernels::launch_swiglu_packed_backward(g.data_ptr(), go.data_ptr(), grad_gu.data_ptr(),
                                                               g.numel() / g.size(-1), f, kernel_dtype_code(g),
                                                               current_stream_of(g)),
                        "swiglu packed backward");
    return grad_gu;
  }
#endif
  // d/dgate silu(g)·u = u·σ(g)·(1 + g·(1 − σ(g))), d/dup = silu(g)
  const torch::Tensor gate = gu.narrow(-1, 0, f), up = gu.narrow(-1, f, f), s = torch::sigmoid(gate);
  return torch::cat({grad_out * up * s * (1 + gate * (1 - s)), grad_out * gate * s}, -1);
}

torch::Tensor swiglu_packed_scaled_reference(const torch::Tensor& gu, const torch::Tensor& scale) {
  const auto acc = at::promote_types(gu.scalar_type(), torch::kFloat32);
  return (swiglu_packed_reference(gu.to(acc)) * scale.to(acc).unsqueeze(-1)).to(gu.scalar_type());
}

namespace {
void check_scaled_shapes(const torch::Tensor& gu, const torch::Tensor& scale) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0, "swiglu_packed_scaled: the last dimension (gate ‖ up) must be even, got ",
              gu.sizes());
  TORCH_CHECK(scale.sizes() == gu.sizes().slice(0, gu.dim() - 1), "swiglu_packed_scaled: scale must be ",
              gu.sizes().slice(0, gu.dim() - 1), " (one weight a row), got ", scale.sizes());
}
}  // namespace

torch::Tensor swiglu_packed_scaled(const torch::Tensor& gu, const torch::Tensor& scale) {
  check_scaled_shapes(gu, scale);
#ifdef MOETRAIN_WITH_CUDA
  if (swiglu_scaled_kernel_ok(gu, scale)) return SwiGLUScaledFunction::apply(gu.contiguous(), scale.contiguous());
#endif
  return swiglu_packed_scaled_reference(gu, scale);
}

std::pair<torch::Tensor, torch::Tensor> swiglu_packed_scaled_backward(const torch::Tensor& gu,
                                                                      const torch::Tensor& scale,
                                                                      const torch::Tensor& grad_out) {
  check_scaled_shapes(gu, scale);
  const int64_t f = gu.size(-1) / 2;
  std::vector<int64_t> out_shape = gu.sizes().vec();
  out_shape.back() = f;
  TORCH_CHECK(grad_out.sizes() == torch::IntArrayRef(out_shape), "swiglu_packed_scaled_backward: grad_out must be ",
              torch::IntArrayRef(out_shape), ", got ", grad_out.sizes());
#ifdef MOETRAIN_WITH_CUDA
  if (swiglu_scaled_kernel_ok(gu, scale)) {
    const torch::Tensor g = gu.contiguous(), s = scale.contiguous(), go = grad_out.to(gu.scalar_type()).contiguous();
    torch::Tensor grad_gu = torch::empty_like(g), grad_scale = torch::empty_like(s);
    check_kernel_launch(kernels::launch_swiglu_scaled_backward(g.data_ptr(), go.data_ptr(), s.data_ptr<float>(),
                                                               grad_gu.data_ptr(), grad_scale.data_ptr<float>(),
                                                               g.numel() / g.size(-1), f, kernel_dtype_code(g),
                                                               current_stream_of(g)),
                        "swiglu scaled backward");
    return {grad_gu, grad_scale};
  }
#endif
  // out = s·silu(g)·u: grad_gu = swiglu'(grad_out·s), grad_s = Σ grad_out·silu(g)·u
  const auto acc = at::promote_types(gu.scalar_type(), torch::kFloat32);
  const torch::Tensor g = gu.to(acc), go = grad_out.to(acc), s = scale.to(acc).unsqueeze(-1);
  const torch::Tensor grad_gu = swiglu_packed_backward(g, go * s).to(gu.scalar_type());
  const torch::Tensor grad_scale = (go * swiglu_packed_reference(g)).sum(-1).to(scale.scalar_type());
  return {grad_gu, grad_scale};
}

}  // namespace moetrain
