#include "models/lm_loss.h"

#include <algorithm>
#include <cstdlib>
#include <string>

#include "models/autocast.h"
#include "models/kernels/cross_entropy.h"
#include "models/kernels/swiglu.h"  // fused_kernels_available

namespace moetrain {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

torch::Dtype accumulate_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

// The matmul dtype: bf16 when the forward runs under CUDA bf16 autocast (as autocast would
// pick for the forward matmul; the backward runs outside autocast, so it is recorded here and
// reused there), else the inputs' own dtype. Logits, softmax and sums are always in `acc`.
torch::Dtype matmul_dtype(const torch::Tensor& hidden) {
  if (cuda_bf16_autocast(hidden)) return torch::kBFloat16;
  return hidden.scalar_type();
}

// a @ b in `acc`: on CUDA with bf16 operands cuBLAS writes fp32 directly (no bf16 result
// and no cast pass over the [n, V] logits); elsewhere the product cast to acc.
torch::Tensor mm_in(const torch::Tensor& a, const torch::Tensor& b, torch::Dtype acc) {
  if (a.is_cuda() && a.scalar_type() == torch::kBFloat16 && acc == torch::kFloat) return at::mm(a, b, acc);
  return torch::matmul(a, b).to(acc);
}

// The logits' storage: bf16 when asked for and the GEMM runs in bf16 (autocast; the head's
// output as HF transformers, torchtitan and Megatron-LM keep it: half the bytes of the [n, V]
// chunk written by the GEMM and read by both loss kernels), else the accumulation dtype. The
// loss math reads them into fp32 either way.
torch::Dtype logits_dtype_for(torch::Dtype mm, torch::Dtype acc, bool bf16_logits) {
  return bf16_logits && mm == torch::kBFloat16 ? torch::kBFloat16 : acc;
}

// The head's two gradient GEMMs for one chunk: grad_rows = g·W (cuBLAS writes the hidden
// gradient in place when the dtypes allow), grad_weight += gᵀ·h (accumulated inside the GEMM on
// CUDA: fp32 out, β = 1). g_low: [n, V] in the matmul dtype.
void head_chunk_grads(const torch::Tensor& g_low, const torch::Tensor& h, const torch::Tensor& w_mm,
                      torch::Tensor grad_rows, torch::Tensor& grad_weight, torch::Dtype mm, torch::Dtype acc) {
  if (grad_rows.scalar_type() == mm) {
    at::mm_out(grad_rows, g_low, w_mm);  // [n, D]
  } else {
    grad_rows.copy_(torch::matmul(g_low, w_mm));
  }
  if (g_low.is_cuda() && g_low.scalar_type() == torch::kBFloat16 && acc == torch::kFloat)
    at::addmm_out(grad_weight, grad_weight, g_low.t(), h, acc);
  else
    grad_weight += mm_in(g_low.t(), h, acc);  // [V, D]
}

// Two schedules, the same math. Fused CUDA path when a backward will follow (grads_in_forward):
// each chunk's logits give the loss and, while they are at hand, the gradients of the hidden
// rows and of the head for d(loss) = 1 (the loss is linear in its upstream gradient, so the
// backward only scales them) — no second logits GEMM and no second pass over them, as Liger
// Kernel's fused linear cross-entropy. Otherwise (CPU, fp64, evaluation, the reference twin):
// the forward keeps only the loss, and the backward recomputes each chunk's logits.
struct ChunkedLinearCrossEntropy : torch::autograd::Function<ChunkedLinearCrossEntropy> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& hidden, const torch::Tensor& weight,
                               const torch::Tensor& targets, int64_t chunk, int64_t ignore_index, bool bf16_logits,
                               bool grads_in_forward) {
    const int64_t N = hidden.size(0);
    const auto acc = accumulate_dtype(hidden);
    const auto mm = matmul_dtype(hidden);
    const auto logits_dtype = logits_dtype_for(mm, acc, bf16_logits);
    const torch::Tensor h_mm = hidden.to(mm), w_mm = weight.to(mm);
    torch::Tensor loss_sum = torch::zeros({}, hidden.options().dtype(acc));
    const torch::Tensor n_valid = (targets != ignore_index).sum().clamp_min(1).to(acc);
    // The fused kernels (fp32 logits on CUDA) write each row's loss and logsumexp; the
    // backward reuses the logsumexp. Elsewhere ATen's cross_entropy, the reference twin.
    const bool fused = hidden.is_cuda() && acc == torch::kFloat && fused_kernels_available();
    const bool grads_now = fused && grads_in_forward;
    torch::Tensor row_loss, lse;  // [N] fp32 (fused)
    if (fused) {
      row_loss = torch::empty({N}, hidden.options().dtype(torch::kFloat));
      lse = torch::empty({N}, hidden.options().dtype(torch::kFloat));
    }
    torch::Tensor grad_hidden, grad_weight, inv_n_valid;  // grads_now: for d(loss) = 1
    if (grads_now) {
      grad_hidden = torch::empty_like(hidden);
      grad_weight = torch::zeros(weight.sizes(), weight.options().dtype(acc));
      inv_n_valid = n_valid.reciprocal();
    }
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      const torch::Tensor h = h_mm.narrow(0, start, n), t = targets.narrow(0, start, n);
      torch::Tensor logits = mm_in(h, w_mm.t(), logits_dtype);  // [n, V]
      if (fused) {
        torch::Tensor loss_rows = row_loss.narrow(0, start, n), lse_rows = lse.narrow(0, start, n);
        if (grads_now) {  // one kernel, one read of the logits (the gradient over them when bf16)
          const torch::Tensor g_low =
              cross_entropy_rows_and_grad_fused(logits, t, inv_n_valid, ignore_index, loss_rows, lse_rows, mm);
          head_chunk_grads(g_low, h, w_mm, grad_hidden.narrow(0, start, n), grad_weight, mm, acc);
        } else {
          cross_entropy_rows_fused(logits, t, ignore_index, loss_rows, lse_rows);
        }
      } else {
        loss_sum += torch::nn::functional::cross_entropy(
            logits.to(acc), t,
            torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum).ignore_index(ignore_index));
      }
    }
    if (fused) loss_sum = row_loss.sum();
    ctx->saved_data["grads_in_forward"] = grads_now;
    if (grads_now) {
      ctx->save_for_backward({grad_hidden, grad_weight});
      ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    } else {
      ctx->save_for_backward({hidden, weight, targets, n_valid, fused ? lse : torch::Tensor()});
    }
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["matmul_dtype"] = static_cast<int64_t>(mm);
    ctx->saved_data["logits_dtype"] = static_cast<int64_t>(logits_dtype);
    return loss_sum / n_valid;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const tensor_list none{torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    if (ctx->saved_data["grads_in_forward"].toBool()) {  // scale the forward's gradients, in one pass each
      const torch::Tensor &grad_hidden = saved[0], &grad_weight = saved[1];
      const torch::Tensor g = grad_outputs[0].to(grad_weight.scalar_type());  // 0-dim
      const auto weight_dtype = static_cast<torch::Dtype>(ctx->saved_data["weight_dtype"].toInt());
      torch::Tensor dh = torch::empty_like(grad_hidden);
      torch::Tensor dw = torch::empty(grad_weight.sizes(), grad_weight.options().dtype(weight_dtype));
      at::mul_out(dh, grad_hidden, g);
      at::mul_out(dw, grad_weight, g);
      tensor_list out{dh, dw};
      out.insert(out.end(), none.begin(), none.end());
      return out;
    }
    const torch::Tensor &hidden = saved[0], &weight = saved[1], &targets = saved[2], &n_valid = saved[3];
    const torch::Tensor& lse = saved[4];  // defined: the forward took the fused kernels
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t N = hidden.size(0);
    const auto acc = accumulate_dtype(hidden);
    const auto mm = static_cast<torch::Dtype>(ctx->saved_data["matmul_dtype"].toInt());
    const auto logits_dtype = static_cast<torch::Dtype>(ctx->saved_data["logits_dtype"].toInt());
    const torch::Tensor h_mm = hidden.to(mm), w_mm = weight.to(mm);
    const torch::Tensor scale = grad_outputs[0].to(acc) / n_valid;  // d loss / d (row loss)

    torch::Tensor grad_hidden = torch::empty_like(hidden);
    torch::Tensor grad_weight = torch::zeros(weight.sizes(), weight.options().dtype(acc));
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      const torch::Tensor h = h_mm.narrow(0, start, n);
      const torch::Tensor t = targets.narrow(0, start, n);
      // d(row loss)/d(logits) = softmax - onehot(target); zero for ignored rows.
      torch::Tensor g_low;  // [n, V] in the matmul dtype
      if (lse.defined()) {
        // the same logits as the forward's (the same GEMM, the same dtype), so lse fits them
        g_low = cross_entropy_grad_fused(mm_in(h, w_mm.t(), logits_dtype), lse.narrow(0, start, n), t, scale,
                                         ignore_index, mm);
      } else {
        const torch::Tensor valid = t != ignore_index;
        torch::Tensor g = torch::softmax(mm_in(h, w_mm.t(), logits_dtype).to(acc), -1);  // [n, V]
        g.scatter_add_(1, t.clamp_min(0).unsqueeze(1), -torch::ones({n, 1}, g.options()));
        g = g * (valid.unsqueeze(1).to(acc) * scale);
        g_low = g.to(mm);
      }
      head_chunk_grads(g_low, h, w_mm, grad_hidden.narrow(0, start, n), grad_weight, mm, acc);
    }
    tensor_list out{grad_hidden, grad_weight.to(weight.scalar_type())};
    out.insert(out.end(), none.begin(), none.end());
    return out;
  }
};

}  // namespace

torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, int64_t chunk_tokens, int64_t ignore_index,
                                    bool bf16_logits, bool grads_in_forward) {
  TORCH_CHECK(hidden.dim() == 2 && targets.dim() == 1 && hidden.size(0) == targets.size(0),
              "chunked_cross_entropy: hidden [N, D] and targets [N] expected, got ", hidden.sizes(), " and ",
              targets.sizes());
  const int64_t chunk = chunk_tokens > 0 ? chunk_tokens : std::max<int64_t>(hidden.size(0), 1);
  // the gradients in the forward only when a backward will ask for them.
  // MOETRAIN_LM_GRADS_IN_FORWARD=0: always the recomputing backward (an A/B switch for benchmarks).
  static const bool allowed = [] {
    const char* v = std::getenv("MOETRAIN_LM_GRADS_IN_FORWARD");
    return v == nullptr || std::string(v) != "0";
  }();
  const bool backward_follows =
      allowed && torch::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  return ChunkedLinearCrossEntropy::apply(hidden, weight, targets.to(torch::kLong).contiguous(), chunk, ignore_index,
                                          bf16_logits, grads_in_forward && backward_follows);
}

}  // namespace moetrain
