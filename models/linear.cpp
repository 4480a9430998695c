#include "models/linear.h"

#include "models/autocast.h"
#include "models/weight_grad_stream.h"

namespace moetrain {

namespace {

struct LinearFunction : torch::autograd::Function<LinearFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w) {
    ctx->save_for_backward({x, w});
    return torch::matmul(x, w.t());  // [..., out]
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w = saved[1];
    const torch::Tensor grad_y = grads[0].to(x.scalar_type());  // [..., out]
    const int64_t in = w.size(1), out = w.size(0);
    WeightGradOverlap side(x.device());
    auto [dw, dx] = side.beside([&] { return grad_y.reshape({-1, out}).t().mm(x.reshape({-1, in})); },  // [out, in]
                                [&] { return torch::matmul(grad_y, w); });                             // [..., in]
    side.join();
    return {dx, dw};
  }
};

}  // namespace

torch::Tensor apply_linear(const torch::Tensor& x, const torch::Tensor& w) {
  if (!x.is_cuda() || !weight_grad_overlap(/*for_experts=*/false)) return torch::linear(x, w);
  if (cuda_bf16_autocast(x)) {
    // autocast would cast a matmul's operands; these casts are differentiable (fp32 masters get
    // fp32 gradients), and inside the node both are bf16 already
    return LinearFunction::apply(x.to(torch::kBFloat16), w.to(torch::kBFloat16));
  }
  return LinearFunction::apply(x, w);
}

}  // namespace moetrain
