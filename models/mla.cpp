#include "models/mla.h"

#include <cmath>
#include <limits>
#include <tuple>

#include "models/kernels/mla_rope.h"
#include "models/linear.h"

namespace moetrain {

namespace {
// The latent norms use a fixed eps in both references (official RMSNorm's default,
// HF builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps).
constexpr double kLatentNormEps = 1e-6;

// The down-projections of x: the query latent (undefined without q_lora_rank), the KV latent
// and k_rope, as column slices of one GEMM against [wq_a; wkv_a] stacked per call (≤ a few MB):
// one matmul each way and no sum of two input gradients. The slices feed the norms in place.
struct DownProjections {
  torch::Tensor q_latent, kv_latent, k_rope;  // [B, T, q_lora_rank], [B, T, kv_lora_rank], [B, T, rope]
};
DownProjections down_project(MLAImpl& m, const torch::Tensor& x) {
  if (m.q_lora_rank == 0) {
    auto kv = apply_linear(x, m.wkv_a->weight).split({m.kv_lora_rank, m.qk_rope_head_dim}, -1);
    return {torch::Tensor(), kv[0], kv[1]};
  }
  const torch::Tensor w = torch::cat({m.wq_a->weight, m.wkv_a->weight});  // [q_lora + kv_lora + rope, D]
  auto parts = apply_linear(x, w).split({m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim}, -1);
  return {parts[0], parts[1], parts[2]};
}
}  // namespace

MLAImpl::MLAImpl(const ModelConfig& cfg)
    : n_heads(cfg.num_attention_heads),
      q_lora_rank(cfg.q_lora_rank),
      kv_lora_rank(cfg.kv_lora_rank),
      qk_nope_head_dim(cfg.qk_nope_head_dim),
      qk_rope_head_dim(cfg.qk_rope_head_dim),
      v_head_dim(cfg.v_head_dim) {
  const int64_t d = cfg.hidden_size, qk = cfg.qk_head_dim();
  const double std = cfg.init_std;
  softmax_scale = yarn_softmax_mscale(cfg) / std::sqrt(static_cast<double>(qk));
  if (q_lora_rank == 0) {
    wq = register_module("wq", make_linear(d, n_heads * qk, std));
  } else {
    wq_a = register_module("wq_a", make_linear(d, q_lora_rank, std));
    q_norm = register_module("q_norm", RMSNorm(q_lora_rank, kLatentNormEps));
    wq_b = register_module("wq_b", make_linear(q_lora_rank, n_heads * qk, std));
  }
  wkv_a = register_module("wkv_a", make_linear(d, kv_lora_rank + qk_rope_head_dim, std));
  kv_norm = register_module("kv_norm", RMSNorm(kv_lora_rank, kLatentNormEps));
  wkv_b = register_module("wkv_b", make_linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), std));
  wo = register_module("wo", make_linear(n_heads * v_head_dim, d, std));
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> MLAImpl::project_qkv(
    const torch::Tensor& x, const RopeTables& rope) {
  const int64_t B = x.size(0), T = x.size(1), H = n_heads;
  const DownProjections down = down_project(*this, x);
  // Queries: per head [q_nope | q_rope], RoPE on the rope part (eqs. 6–9).
  torch::Tensor q =
      q_lora_rank == 0 ? apply_linear(x, wq->weight) : apply_linear(q_norm(down.q_latent), wq_b->weight);
  q = q.view({B, T, H, qk_nope_head_dim + qk_rope_head_dim});
  // Keys/values: latent c_kv and one k_rope shared by all heads (eqs. 1–5).
  const torch::Tensor kv =
      apply_linear(kv_norm(down.kv_latent), wkv_b->weight).view({B, T, H, qk_nope_head_dim + v_head_dim});
  torch::Tensor k, v;
  if (mla_rope_kernel_ok(q, rope) && kv.scalar_type() == q.scalar_type()) {
    // CUDA: [nope | rotated rope] per head in one kernel each, v split off in k's pass (the
    // ATen path below is its twin)
    q = mla_rope_q_fused(q, rope, qk_nope_head_dim);
    std::tie(k, v) = mla_rope_kv_fused(kv, down.k_rope, rope, qk_nope_head_dim);
  } else {
    v = kv.narrow(-1, qk_nope_head_dim, v_head_dim);
    auto q_parts = q.split({qk_nope_head_dim, qk_rope_head_dim}, -1);
    q = torch::cat({q_parts[0], apply_rope(q_parts[1], rope)}, -1);            // [B, T, H, qk]
    const torch::Tensor k_rope = apply_rope(down.k_rope.unsqueeze(2), rope);  // [B, T, 1, rope]
    k = torch::cat({kv.narrow(-1, 0, qk_nope_head_dim), k_rope.expand({B, T, H, qk_rope_head_dim})}, -1);
  }

  // [B, T, H, d] -> [B, H, T, d]
  return {q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)};
}

torch::Tensor MLAImpl::project_out(const torch::Tensor& o) {
  const int64_t B = o.size(0), T = o.size(2);
  return apply_linear(o.transpose(1, 2).reshape({B, T, n_heads * v_head_dim}), wo->weight);  // eq. 11
}

torch::Tensor MLAImpl::forward(const torch::Tensor& x, const RopeTables& rope) {
  auto [q, k, v] = project_qkv(x, rope);
  // qk dim != v dim is allowed; backends that need equal dims fall back to others.
  const torch::Tensor o = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                           /*is_causal=*/true, softmax_scale);
  return project_out(o);
}

torch::Tensor MLAImpl::forward_reference(const torch::Tensor& x, const RopeTables& rope) {
  auto [q, k, v] = project_qkv(x, rope);
  const int64_t T = x.size(1);
  const auto compute = q.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  // scores: [B, H, T, T], in fp32 (fp64 for fp64 models)
  torch::Tensor scores = torch::matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * softmax_scale;
  const torch::Tensor future = torch::ones({T, T}, torch::dtype(torch::kBool).device(x.device())).triu(1);
  scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  const torch::Tensor probs = torch::softmax(scores, -1).to(q.scalar_type());
  return project_out(torch::matmul(probs, v));  // eq. 10
}

torch::Tensor MLAImpl::forward_absorbed(const torch::Tensor& x, const RopeTables& rope, MLACache& cache) {
  const int64_t B = x.size(0), T = x.size(1), H = n_heads, P = cache.length();
  const int64_t C = kv_lora_rank, nope = qk_nope_head_dim;
  // Queries exactly as in project_qkv: [B, T, H, nope] and the rotated [B, T, H, rope].
  const DownProjections down = down_project(*this, x);
  torch::Tensor q = q_lora_rank == 0 ? wq(x) : wq_b(q_norm(down.q_latent));
  auto q_parts = q.view({B, T, H, nope + qk_rope_head_dim}).split({nope, qk_rope_head_dim}, -1);
  const torch::Tensor q_nope = q_parts[0];
  const torch::Tensor q_rope = apply_rope(q_parts[1], rope);

  // What gets cached: the normalized latent and the rotated shared key, per token.
  cache.append(kv_norm(down.kv_latent), apply_rope(down.k_rope.unsqueeze(2), rope).squeeze(2));
  const int64_t S = cache.length();

  // Attention in fp32 (fp64 for fp64 models); per head, wkv_b's rows are [W^UK (nope) | W^UV (v)].
  const auto acc = x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const torch::Tensor w = wkv_b->weight.view({H, nope + v_head_dim, C}).to(acc);
  const torch::Tensor w_uk = w.narrow(1, 0, nope);          // [H, nope, C]
  const torch::Tensor w_uv = w.narrow(1, nope, v_head_dim);  // [H, v, C]
  const torch::Tensor c_kv = cache.latent().to(acc);         // [B, S, C]
  const torch::Tensor k_pe = cache.k_rope().to(acc);         // [B, S, R]
  // q_nope·k_nope = q_nope·(W^UK c) = (q_nope W^UK)·c: the query moves into latent space.
  const torch::Tensor q_lat = torch::einsum("bthd,hdc->bhtc", {q_nope.to(acc), w_uk});  // [B, H, T, C]
  torch::Tensor scores = torch::matmul(q_lat, c_kv.unsqueeze(1).transpose(-2, -1)) +     // [B, H, T, S]
                         torch::matmul(q_rope.to(acc).transpose(1, 2), k_pe.unsqueeze(1).transpose(-2, -1));
  scores = scores * softmax_scale;
  // Query t sits at position P+t and sees cached positions s <= P+t.
  const auto idx = torch::TensorOptions().dtype(torch::kLong).device(x.device());
  const torch::Tensor future = torch::arange(S, idx).unsqueeze(0) > (torch::arange(T, idx) + P).unsqueeze(1);  // [T, S]
  scores = scores.masked_fill(future, -std::numeric_limits<double>::infinity());
  const torch::Tensor probs = torch::softmax(scores, -1);
  const torch::Tensor o_lat = torch::matmul(probs, c_kv.unsqueeze(1));              // [B, H, T, C]
  const torch::Tensor o = torch::einsum("bhtc,hvc->bhtv", {o_lat, w_uv});            // [B, H, T, v]: W^UV after
  return project_out(o.to(x.scalar_type()));
}

}  // namespace moetrain
