#include "models/kernels/fan_out.h"

#include "models/kernels/swiglu.h"  // fused_kernels_available

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/fan_out_kernels.h"
#include "models/kernels/launch.h"
#endif

namespace moetrain {

namespace {

bool sum_kernel_ok(const torch::Tensor& t) {
  return t.is_cuda() && t.is_contiguous() && (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kBFloat16);
}

struct FanOut3 : torch::autograd::Function<FanOut3> {
  static torch::autograd::tensor_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x) {
    ctx->set_materialize_grads(false);  // an unused branch contributes nothing, not a zero tensor
    // detach(): new tensors on x's storage (not autograd views), each wired to this node
    return {x.detach(), x.detach(), x.detach()};
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext*, torch::autograd::tensor_list grads) {
    bool any = false;
    for (const auto& g : grads) any = any || g.defined();
    return {any ? sum_gradients(grads) : torch::Tensor()};
  }
};

}  // namespace

torch::Tensor sum_gradients(const std::vector<torch::Tensor>& grads) {
  std::vector<torch::Tensor> defined;
  for (const auto& g : grads)
    if (g.defined()) defined.push_back(g);
  TORCH_CHECK(!defined.empty(), "sum_gradients: no gradient");
  if (defined.size() == 1) return defined[0];
#ifdef MOETRAIN_WITH_CUDA
  bool kernel = defined.size() <= 3;
  for (const auto& g : defined)
    kernel = kernel && sum_kernel_ok(g) && g.scalar_type() == defined[0].scalar_type() && g.sizes() == defined[0].sizes();
  if (kernel) {
    torch::Tensor out = torch::empty_like(defined[0]);
    kernels::check_kernel_launch(
        kernels::launch_sum3(defined[0].data_ptr(), defined[1].data_ptr(),
                             defined.size() == 3 ? defined[2].data_ptr() : nullptr, out.data_ptr(), out.numel(),
                             kernels::kernel_dtype_code(out), kernels::current_stream_of(out)),
        "gradient sum");
    return out;
  }
#endif
  torch::Tensor out = defined[0] + defined[1];
  for (size_t i = 2; i < defined.size(); ++i) out.add_(defined[i]);
  return out;
}

std::array<torch::Tensor, 3> fan_out3(const torch::Tensor& x) {
  if (!fused_kernels_available() || !sum_kernel_ok(x) || !x.requires_grad() || !torch::GradMode::is_enabled())
    return {x, x, x};
  const torch::autograd::tensor_list out = FanOut3::apply(x);
  return {out[0], out[1], out[2]};
}

}  // namespace moetrain
