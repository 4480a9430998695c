#include "models/kernels/mla_rope.h"

#include <stdexcept>

#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/launch.h"
#include "models/kernels/mla_rope_kernels.h"
#endif

namespace moetrain {

bool mla_rope_kernel_ok(const torch::Tensor& x, const RopeTables& rope) {
#ifdef MOETRAIN_WITH_CUDA
  return x.is_cuda() && (x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16) &&
         rope.cos.defined() && rope.cos.scalar_type() == torch::kFloat && rope.cos.device() == x.device();
#else
  (void)x, (void)rope;
  return false;
#endif
}

#ifdef MOETRAIN_WITH_CUDA
namespace {

using kernels::check_kernel_launch;
using kernels::current_stream_of;
using kernels::kernel_dtype_code;

// The [T, R/2] tables of a sequence of length t_len, contiguous.
std::pair<torch::Tensor, torch::Tensor> tables_for(const torch::Tensor& cos, const torch::Tensor& sin, int64_t t_len) {
  return {cos.narrow(0, 0, t_len).contiguous(), sin.narrow(0, 0, t_len).contiguous()};
}

struct RopeQFunction : torch::autograd::Function<RopeQFunction> {
  // q: [B, T, H, qk] contiguous
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& cos,
                               const torch::Tensor& sin, int64_t nope) {
    torch::Tensor out = torch::empty_like(q);
    run(q, out, cos, sin, nope, /*inverse=*/false);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["nope"] = nope;
    return out;
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor grad_out = grads[0].contiguous();
    torch::Tensor grad_q = torch::empty_like(grad_out);
    run(grad_out, grad_q, saved[0], saved[1], ctx->saved_data["nope"].toInt(), /*inverse=*/true);
    return {grad_q, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
  static void run(const torch::Tensor& in, torch::Tensor& out, const torch::Tensor& cos, const torch::Tensor& sin,
                  int64_t nope, bool inverse) {
    const int64_t T = in.size(1), H = in.size(2), rope = in.size(3) - nope;
    check_kernel_launch(kernels::launch_mla_rope_q(in.data_ptr(), out.data_ptr(), cos.data_ptr<float>(),
                                                   sin.data_ptr<float>(), in.numel() / in.size(3), T, H, nope, rope,
                                                   inverse, kernel_dtype_code(in), current_stream_of(in)),
                        inverse ? "mla_rope_q backward" : "mla_rope_q forward");
  }
};

struct RopeKVFunction : torch::autograd::Function<RopeKVFunction> {
  // kv: [B, T, H, nope + v] contiguous; k_rope: [B, T, R], last dim contiguous, rows evenly strided
  // -> {k [B, T, H, nope + R], v [B, T, H, v]}, both contiguous
  static torch::autograd::tensor_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& kv,
                                              const torch::Tensor& k_rope, const torch::Tensor& cos,
                                              const torch::Tensor& sin, int64_t nope) {
    const int64_t B = kv.size(0), T = kv.size(1), H = kv.size(2), v_dim = kv.size(3) - nope, rope = k_rope.size(2);
    torch::Tensor k = torch::empty({B, T, H, nope + rope}, kv.options());
    torch::Tensor v = torch::empty({B, T, H, v_dim}, kv.options());
    check_kernel_launch(kernels::launch_mla_rope_kv_forward(kv.data_ptr(), k_rope.data_ptr(), k_rope.stride(1),
                                                            k.data_ptr(), v.data_ptr(), cos.data_ptr<float>(),
                                                            sin.data_ptr<float>(), B * T, T, H, nope, v_dim, rope,
                                                            kernel_dtype_code(kv), current_stream_of(kv)),
                        "mla_rope_kv forward");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["nope"] = nope;
    ctx->saved_data["v_dim"] = v_dim;
    return {k, v};
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t nope = ctx->saved_data["nope"].toInt(), v_dim = ctx->saved_data["v_dim"].toInt();
    const int64_t rope = saved[0].size(1) * 2;  // cos: [T, R/2]
    // an output that took no part in the loss comes back undefined: its gradient is zero
    const torch::Tensor& like = grads[0].defined() ? grads[0] : grads[1];
    const int64_t B = like.size(0), T = like.size(1), H = like.size(2);
    const torch::Tensor grad_k =
        grads[0].defined() ? grads[0].contiguous() : torch::zeros({B, T, H, nope + rope}, like.options());
    torch::Tensor grad_v = grads[1].defined() ? grads[1] : torch::zeros({B, T, H, v_dim}, like.options());
    if (grad_v.stride(3) != 1) grad_v = grad_v.contiguous();
    torch::Tensor grad_kv = torch::empty({B, T, H, nope + v_dim}, like.options());
    torch::Tensor grad_k_rope = torch::empty({B, T, rope}, like.options());
    const int64_t v_strides[3] = {grad_v.stride(0), grad_v.stride(1), grad_v.stride(2)};
    check_kernel_launch(kernels::launch_mla_rope_kv_backward(
                            grad_k.data_ptr(), grad_v.data_ptr(), v_strides, grad_kv.data_ptr(), grad_k_rope.data_ptr(),
                            saved[0].data_ptr<float>(), saved[1].data_ptr<float>(), B * T, T, H, nope, v_dim, rope,
                            kernel_dtype_code(grad_k), current_stream_of(grad_k)),
                        "mla_rope_kv backward");
    return {grad_kv, grad_k_rope, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace
#endif

torch::Tensor mla_rope_q_fused(const torch::Tensor& q, const RopeTables& rope, int64_t nope) {
#ifdef MOETRAIN_WITH_CUDA
  if (mla_rope_kernel_ok(q, rope) && q.dim() == 4) {
    auto [cos, sin] = tables_for(rope.cos, rope.sin, q.size(1));
    return RopeQFunction::apply(q.contiguous(), cos, sin, nope);
  }
#endif
  (void)nope;
  throw std::invalid_argument("mla_rope_q_fused: needs fp32/bf16 CUDA activations, fp32 tables and a CUDA build");
}

std::pair<torch::Tensor, torch::Tensor> mla_rope_kv_fused(const torch::Tensor& kv, const torch::Tensor& k_rope,
                                                          const RopeTables& rope, int64_t nope) {
#ifdef MOETRAIN_WITH_CUDA
  if (mla_rope_kernel_ok(kv, rope) && kv.dim() == 4 && k_rope.dim() == 3 &&
      k_rope.scalar_type() == kv.scalar_type()) {
    auto [cos, sin] = tables_for(rope.cos, rope.sin, kv.size(1));
    // The kernel reads k_rope rows at a fixed stride (a slice of wkv_a's output is fine).
    const bool rows_ok = k_rope.stride(2) == 1 && k_rope.stride(0) == k_rope.size(1) * k_rope.stride(1);
    auto kv_out = RopeKVFunction::apply(kv.contiguous(), rows_ok ? k_rope : k_rope.contiguous(), cos, sin, nope);
    return {kv_out[0], kv_out[1]};
  }
#endif
  (void)k_rope, (void)nope;
  throw std::invalid_argument("mla_rope_kv_fused: needs fp32/bf16 CUDA activations, fp32 tables and a CUDA build");
}

}  // namespace moetrain
