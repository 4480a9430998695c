#include "models/kernels/moe_permute.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/moe_permute_kernels.h"
#endif

namespace moetrain {

torch::Tensor moe_inverse_order(const torch::Tensor& order) {
  return torch::empty_like(order).scatter_(0, order, torch::arange(order.numel(), order.options()));
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

using kernels::check_kernel_launch;
using kernels::current_stream_of;
using kernels::kernel_dtype_code;

struct PermuteFunction : torch::autograd::Function<PermuteFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& inv, int64_t top_k, torch::ScalarType rows_dtype) {
    const int64_t n = x.size(0), dim = x.size(1);
    torch::Tensor rows = torch::empty({n * top_k, dim}, x.options().dtype(rows_dtype));
    check_kernel_launch(kernels::launch_moe_permute_forward(x.data_ptr(), inv.data_ptr<int64_t>(), rows.data_ptr(), n,
                                                            top_k, dim, kernel_dtype_code(x),
                                                            kernel_dtype_code(rows_dtype), current_stream_of(x)),
                        "moe_permute forward");
    ctx->save_for_backward({inv});
    ctx->saved_data["top_k"] = top_k;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return rows;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const torch::Tensor inv = ctx->get_saved_variables()[0];
    const int64_t top_k = ctx->saved_data["top_k"].toInt();
    const auto x_dtype = static_cast<torch::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    torch::Tensor grad_rows = grads[0].contiguous();
    if (!kernels::kernel_dtype_ok(grad_rows.scalar_type())) grad_rows = grad_rows.to(torch::kFloat);
    const int64_t n = inv.numel() / top_k, dim = grad_rows.size(1);
    torch::Tensor grad_x = torch::empty({n, dim}, grad_rows.options().dtype(x_dtype));
    check_kernel_launch(kernels::launch_moe_permute_backward(grad_rows.data_ptr(), inv.data_ptr<int64_t>(),
                                                             grad_x.data_ptr(), n, top_k, dim,
                                                             kernel_dtype_code(grad_rows), kernel_dtype_code(x_dtype),
                                                             current_stream_of(grad_rows)),
                        "moe_permute backward");
    return {grad_x, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct UnpermuteFunction : torch::autograd::Function<UnpermuteFunction> {
  // topk_weight: [N, K] fp32, or empty for the unweighted sum (then y is not saved: the backward
  // only gathers). base: empty (none), or [N, D] in y's dtype (its gradient is grad_out itself).
  // Never undefined: autograd's apply asks every tensor argument for its device.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& y,
                               const torch::Tensor& topk_weight, const torch::Tensor& inv, const torch::Tensor& base,
                               int64_t top_k) {
    const bool weighted = topk_weight.numel() > 0;
    const int64_t n = inv.numel() / top_k, dim = y.size(1);
    torch::Tensor out = torch::empty({n, dim}, y.options());
    check_kernel_launch(kernels::launch_moe_unpermute_forward(
                            y.data_ptr(), weighted ? topk_weight.data_ptr<float>() : nullptr, inv.data_ptr<int64_t>(),
                            base.numel() > 0 ? base.data_ptr() : nullptr, out.data_ptr(), n, top_k, dim,
                            kernel_dtype_code(y), current_stream_of(y)),
                        "moe_unpermute forward");
    ctx->save_for_backward({weighted ? y : torch::Tensor(), topk_weight, inv});
    ctx->saved_data["has_base"] = base.numel() > 0;
    ctx->saved_data["weighted"] = weighted;
    ctx->saved_data["top_k"] = top_k;
    ctx->saved_data["rows"] = y.size(0);
    ctx->saved_data["y_dtype"] = static_cast<int64_t>(y.scalar_type());
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &y = saved[0], &topk_weight = saved[1], &inv = saved[2];
    const bool weighted = ctx->saved_data["weighted"].toBool();
    const int64_t top_k = ctx->saved_data["top_k"].toInt(), n = inv.numel() / top_k;
    const auto y_dtype = static_cast<torch::ScalarType>(ctx->saved_data["y_dtype"].toInt());
    const torch::Tensor grad_out = grads[0].to(y_dtype).contiguous();
    const int64_t dim = grad_out.size(1);
    torch::Tensor grad_y = torch::empty({ctx->saved_data["rows"].toInt(), dim}, grad_out.options());
    torch::Tensor grad_w = weighted ? torch::empty_like(topk_weight) : torch::Tensor();
    check_kernel_launch(kernels::launch_moe_unpermute_backward(
                            weighted ? y.data_ptr() : nullptr, weighted ? topk_weight.data_ptr<float>() : nullptr,
                            inv.data_ptr<int64_t>(), grad_out.data_ptr(), grad_y.data_ptr(),
                            weighted ? grad_w.data_ptr<float>() : nullptr, n, top_k, dim, kernel_dtype_code(y_dtype),
                            current_stream_of(grad_out)),
                        "moe_unpermute backward");
    return {grad_y, grad_w, torch::Tensor(), ctx->saved_data["has_base"].toBool() ? grads[0] : torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace
#endif

bool moe_expert_order_kernel_ok(const torch::Tensor& topk_idx, int64_t n_experts) {
#ifdef MOETRAIN_WITH_CUDA
  return topk_idx.is_cuda() && topk_idx.dim() == 2 && topk_idx.scalar_type() == torch::kLong && n_experts > 0 &&
         n_experts <= kernels::kMoeSortMaxExperts && topk_idx.numel() < (int64_t{1} << 31);
#else
  (void)topk_idx, (void)n_experts;
  return false;
#endif
}

ExpertOrder moe_expert_order_fused(const torch::Tensor& topk_idx, int64_t n_experts) {
#ifdef MOETRAIN_WITH_CUDA
  if (moe_expert_order_kernel_ok(topk_idx, n_experts)) {
    const torch::Tensor expert = topk_idx.contiguous();
    const int64_t m = expert.numel();
    ExpertOrder o;
    o.order = torch::empty({m}, expert.options());
    o.token_idx = torch::empty({m}, expert.options());
    o.inv = torch::empty({m}, expert.options());
    torch::Tensor scratch =
        torch::empty({kernels::moe_expert_sort_scratch(m, n_experts)}, expert.options().dtype(torch::kInt));
    check_kernel_launch(kernels::launch_moe_expert_sort(expert.data_ptr<int64_t>(), m, n_experts, expert.size(1),
                                                        scratch.data_ptr<int>(), o.order.data_ptr<int64_t>(),
                                                        o.token_idx.data_ptr<int64_t>(), o.inv.data_ptr<int64_t>(),
                                                        current_stream_of(expert)),
                        "moe expert sort");
    return o;
  }
#endif
  (void)n_experts;
  throw std::invalid_argument("moe_expert_order_fused: needs int64 [N, K] CUDA indices, at most 1024 experts and a CUDA build");
}

bool moe_permute_kernel_ok(const torch::Tensor& x) {
#ifdef MOETRAIN_WITH_CUDA
  return x.is_cuda() && x.dim() == 2 && kernels::kernel_dtype_ok(x.scalar_type());
#else
  (void)x;
  return false;
#endif
}

bool moe_unpermute_kernel_ok(const torch::Tensor& y, const torch::Tensor& topk_weight) {
  return moe_permute_kernel_ok(y) && (!topk_weight.defined() || (topk_weight.device() == y.device() &&
                                                                  topk_weight.dim() == 2 &&
                                                                  topk_weight.scalar_type() == torch::kFloat));
}

torch::Tensor moe_permute_fused(const torch::Tensor& x, const torch::Tensor& inv, int64_t top_k,
                                torch::ScalarType rows_dtype) {
#ifdef MOETRAIN_WITH_CUDA
  if (moe_permute_kernel_ok(x) && kernels::kernel_dtype_ok(rows_dtype))
    return PermuteFunction::apply(x.contiguous(), inv.contiguous(), top_k, rows_dtype);
#endif
  (void)inv, (void)top_k, (void)rows_dtype;
  throw std::invalid_argument("moe_permute_fused: needs an fp32/bf16 CUDA tensor and a CUDA build");
}

torch::Tensor moe_unpermute_fused(const torch::Tensor& y, const torch::Tensor& inv, int64_t top_k,
                                  const torch::Tensor& topk_weight, const torch::Tensor& base) {
#ifdef MOETRAIN_WITH_CUDA
  if (moe_unpermute_kernel_ok(y, topk_weight)) {
    TORCH_CHECK(top_k > 0 && inv.numel() == y.size(0) && inv.numel() % top_k == 0,
                "moe_unpermute_fused: inv must hold N·top_k = ", y.size(0), " rows, got ", inv.numel(), " (top_k ",
                top_k, ")");
    const int64_t n = inv.numel() / top_k;
    TORCH_CHECK(!topk_weight.defined() || topk_weight.sizes() == torch::IntArrayRef({n, top_k}),
                "moe_unpermute_fused: topk_weight must be [", n, ", ", top_k, "], got ", topk_weight.sizes());
    const bool base_ok = !base.defined() || (base.dim() == 2 && base.size(0) == n && base.size(1) == y.size(1) &&
                                             base.device() == y.device());
    TORCH_CHECK(base_ok, "moe_unpermute_fused: base must be [N, D] on y's device, got ", base.sizes());
    const torch::Tensor empty = torch::empty({0}, y.options());
    const torch::Tensor b = base.defined() ? base.to(y.scalar_type()).contiguous() : empty;
    const torch::Tensor w = topk_weight.defined() ? topk_weight.contiguous() : empty.to(torch::kFloat);
    return UnpermuteFunction::apply(y.contiguous(), w, inv.contiguous(), b, top_k);
  }
#endif
  (void)inv, (void)top_k, (void)base;
  throw std::invalid_argument("moe_unpermute_fused: needs fp32/bf16 CUDA rows, fp32 gates and a CUDA build");
}

}  // namespace moetrain
