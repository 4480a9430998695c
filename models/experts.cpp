#include "models/experts.h"

#include "models/autocast.h"
#include "models/kernels/grouped_gemm.h"
#include "models/kernels/grouped_wgrad.h"
#include "models/kernels/swiglu.h"
#include "models/weight_grad_stream.h"

#include <ATen/ops/_grouped_mm.h>

#include <tuple>
#include <vector>

namespace moetrain {

GroupedExpertsImpl::GroupedExpertsImpl(int64_t n_experts, int64_t dim, int64_t inter, double init_std)
    : n_experts(n_experts), dim(dim), inter(inter) {
  w13 = register_parameter("w13", torch::empty({n_experts, 2 * inter, dim}));
  w2 = register_parameter("w2", torch::empty({n_experts, dim, inter}));
  torch::NoGradGuard no_grad;
  for (auto* w : {&w13, &w2}) w->normal_(0.0, init_std);
}

bool GroupedExpertsImpl::uses_grouped_mm(const torch::Tensor& x) const {
  // at::_grouped_mm (CUTLASS, sm90+) wants bf16 operands whose rows are 16-byte aligned.
  if (!x.is_cuda() || dim % 8 != 0 || inter % 8 != 0) return false;
  return cuda_bf16_autocast(x) || (x.scalar_type() == torch::kBFloat16 && w13.scalar_type() == torch::kBFloat16);
}

torch::Tensor GroupedExpertsImpl::expert_forward(int64_t e, const torch::Tensor& x) {
  // The textbook form, plain ATen: the twin of forward's grouped path and its packed kernel.
  const torch::Tensor h = torch::silu(torch::matmul(x, gate_weight()[e].t())) * torch::matmul(x, up_weight()[e].t());  // [n, I]
  return torch::matmul(h, w2[e].t());  // [n, D]
}

torch::Tensor GroupedExpertsImpl::forward(const torch::Tensor& x, const torch::Tensor& counts,
                                          const torch::Tensor& row_scale) {
  if (uses_grouped_mm(x)) {
    // offs[j] = end row of expert j (int32, cumulative); empty groups are fine.
    const torch::Tensor offs = counts.cumsum(0).to(torch::kInt);
    auto bf16 = [](const torch::Tensor& t) { return t.to(torch::kBFloat16); };  // differentiable; no-op if bf16
    return grouped_swiglu_experts(bf16(x).contiguous(), bf16(w13), bf16(w2), offs, row_scale);
  }
  // Portable path: one slice per expert. Reads the counts on the host.
  const torch::Tensor host_counts = counts.to(torch::kCPU, torch::kLong);
  const int64_t* n = host_counts.data_ptr<int64_t>();
  std::vector<torch::Tensor> outs;
  int64_t start = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    if (n[e] == 0) continue;
    outs.push_back(expert_forward(e, x.narrow(0, start, n[e])));
    start += n[e];
  }
  TORCH_CHECK(start == x.size(0), "expert counts sum to ", start, " but x has ", x.size(0), " rows");
  if (outs.empty()) return x * 0;  // no rows at all: keep the graph connected to x
  const torch::Tensor out = torch::cat(outs, 0);  // [M, D]
  // w2 is linear: scaling its output equals scaling its input h
  return row_scale.defined() ? (out * row_scale.unsqueeze(1)).to(out.scalar_type()) : out;
}

torch::Tensor grouped_swiglu_experts_reference(const torch::Tensor& x, const torch::Tensor& w13,
                                               const torch::Tensor& w2, const torch::Tensor& offs,
                                               const torch::Tensor& row_scale) {
  const torch::Tensor h13 = at::_grouped_mm(x, w13.transpose(-2, -1), offs);  // [M, 2I]
  const torch::Tensor h = row_scale.defined() ? swiglu_packed_scaled_reference(h13, row_scale) : swiglu_packed(h13);  // [M, I]
  return at::_grouped_mm(h, w2.transpose(-2, -1), offs);  // [M, D]
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

struct GroupedSwiGLUFunction : torch::autograd::Function<GroupedSwiGLUFunction> {
  // row_scale: [M] fp32 when scaled, else an empty placeholder (never undefined: autograd's
  // apply asks every tensor argument for its device).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w13,
                               const torch::Tensor& w2, const torch::Tensor& offs, const torch::Tensor& row_scale,
                               bool scaled) {
    const torch::Tensor h13 = grouped_linear(x, w13, offs);                                    // [M, 2I]
    const torch::Tensor h = scaled ? swiglu_packed_scaled(h13, row_scale) : swiglu_packed(h13);  // [M, I]
    ctx->save_for_backward({x, w13, w2, offs, h13, h, row_scale});
    ctx->saved_data["scaled"] = scaled;
    return grouped_linear(h, w2, offs);  // [M, D]
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &w13 = saved[1], &w2 = saved[2], &offs = saved[3], &h13 = saved[4],
                        &h = saved[5], &row_scale = saved[6];
    const torch::Tensor grad_y = grads[0].to(x.scalar_type()).contiguous();  // [M, D]
    // main: dh = grad_y·w2 -> dh13 = swiglu'(dh) -> dx = dh13·w13 -> join
    // side: dw2 = grad_yᵀ·h  -> (after dh13) dw13 = dh13ᵀ·x  (grouped_weight_grad: ATen's grouped
    // GEMM beside the main chain, our split-row kernel when all runs on one stream; NOTES.md 44).
    // Each main GEMM is queued before the side GEMM beside it (WeightGradOverlap::beside).
    const bool two_streams = weight_grad_overlap(/*for_experts=*/true);
    WeightGradOverlap side(x.device(), two_streams);
    const auto [dw2, dh] = side.beside([&] { return grouped_weight_grad(grad_y, h, offs, two_streams); },  // [E, D, I]
                                       [&] { return grouped_linear_input_grad(grad_y, w2, offs); });      // [M, I]
    torch::Tensor dh13, grad_scale;  // [M, 2I], [M]
    if (ctx->saved_data["scaled"].toBool()) {
      std::tie(dh13, grad_scale) = swiglu_packed_scaled_backward(h13, row_scale, dh);
    } else {
      dh13 = swiglu_packed_backward(h13, dh);
    }
    auto [dw13, dx] = side.beside([&] { return grouped_weight_grad(dh13, x, offs, two_streams); },  // [E, 2I, D]
                                  [&] { return grouped_linear_input_grad(dh13, w13, offs); });     // [M, D]
    side.join();
    return {dx, dw13, dw2, torch::Tensor(), grad_scale, torch::Tensor()};
  }
};

}  // namespace
#endif

torch::Tensor grouped_swiglu_experts(const torch::Tensor& x, const torch::Tensor& w13, const torch::Tensor& w2,
                                     const torch::Tensor& offs, const torch::Tensor& row_scale) {
  TORCH_CHECK(!row_scale.defined() || (row_scale.dim() == 1 && row_scale.size(0) == x.size(0) &&
                                       row_scale.scalar_type() == torch::kFloat32 && row_scale.device() == x.device()),
              "grouped_swiglu_experts: row_scale must be fp32 [", x.size(0), "] on ", x.device(), ", got ",
              row_scale.sizes(), " ", row_scale.scalar_type(), " on ", row_scale.device());
#ifdef MOETRAIN_WITH_CUDA
  if (x.is_cuda())
    return GroupedSwiGLUFunction::apply(
        x, w13, w2, offs, row_scale.defined() ? row_scale.contiguous() : torch::empty({0}, x.options().dtype(torch::kFloat)),
        row_scale.defined());
#endif
  return grouped_swiglu_experts_reference(x, w13, w2, offs, row_scale);
}

torch::Tensor moe_experts_reference(GroupedExpertsImpl& experts, const torch::Tensor& x,
                                    const torch::Tensor& topk_idx, const torch::Tensor& topk_weight) {
  const auto acc = topk_weight.scalar_type();
  torch::Tensor out = torch::zeros(x.sizes(), x.options().dtype(acc));  // [N, D]
  for (int64_t e = 0; e < experts.n_experts; ++e) {
    const torch::Tensor hit = (topk_idx == e).nonzero();  // [n, 2]: (token, k)
    if (hit.size(0) == 0) continue;
    const torch::Tensor token = hit.select(1, 0), slot = hit.select(1, 1);
    const torch::Tensor y = experts.expert_forward(e, x.index_select(0, token));  // [n, D]
    const torch::Tensor w = topk_weight.index({token, slot}).unsqueeze(1);         // [n, 1]
    out = out.index_add(0, token, y.to(acc) * w);
  }
  return out.to(x.scalar_type());
}

}  // namespace moetrain
