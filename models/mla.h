// defines: MLA — Multi-head Latent Attention (DeepSeek-V3 §2.1.1, eqs. 1–11) in
// two forms:
//   naive    (training, `forward`): the latent is expanded to per-head K/V and
//            attention runs through scaled_dot_product_attention, with an explicit
//            softmax twin (`forward_reference`) that the tests hold it to;
//   absorbed (decoding, `forward_absorbed`): W^UK is folded into the query and W^UV
//            applied after attending over the cached normalized latent c_kv plus the
//            shared k_rope (DeepSeek-V2 §2.1.2 / appendix C; the official code's
//            attn_impl "absorb"), so the cache holds kv_lora_rank + qk_rope_head_dim
//            numbers per token. The naive form is its obviously-correct twin
//            (tests/test_mla.cpp, tests/test_decoding.cpp).
#pragma once

#include <torch/torch.h>

#include "models/kv_cache.h"
#include "models/model_config.h"
#include "models/rms_norm.h"
#include "models/rope.h"

namespace moetrain {

struct MLAImpl : torch::nn::Module {
  explicit MLAImpl(const ModelConfig& cfg);

  // x: [B, T, D] -> [B, T, D]; causal, positions 0..T-1.
  torch::Tensor forward(const torch::Tensor& x, const RopeTables& rope);
  // Same math with an explicit matmul + causal mask + softmax (the reference twin).
  torch::Tensor forward_reference(const torch::Tensor& x, const RopeTables& rope);
  // Absorbed form over a latent cache. x: [B, T, D] are the tokens at positions
  // P..P+T-1, P = cache.length(); rope: tables whose row t is position P+t. Appends
  // their [kv_norm(c_kv) | k_rope] to `cache`, attends causally over all cached
  // positions and returns [B, T, D]. With an empty cache it equals forward().
  torch::Tensor forward_absorbed(const torch::Tensor& x, const RopeTables& rope, MLACache& cache);

  // x: [B, T, D] -> q [B, H, T, nope+rope], k [B, H, T, nope+rope], v [B, H, T, v]
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> project_qkv(const torch::Tensor& x,
                                                                      const RopeTables& rope);
  // o: [B, H, T, v] -> [B, T, D]
  torch::Tensor project_out(const torch::Tensor& o);

  int64_t n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim;
  double softmax_scale;  // 1/sqrt(nope+rope), times YaRN's mscale^2 when enabled

  torch::nn::Linear wq{nullptr};    // q_lora_rank == 0: [H·(nope+rope), D]
  torch::nn::Linear wq_a{nullptr};  // q_lora_rank > 0:  [q_lora, D]
  RMSNorm q_norm{nullptr};          //                   [q_lora]
  torch::nn::Linear wq_b{nullptr};  //                   [H·(nope+rope), q_lora]
  torch::nn::Linear wkv_a{nullptr}; // [kv_lora + rope, D]: rows [latent | shared k_rope]
  RMSNorm kv_norm{nullptr};         // [kv_lora]
  torch::nn::Linear wkv_b{nullptr}; // [H·(nope+v), kv_lora]: per head [k_nope | v]
  torch::nn::Linear wo{nullptr};    // [D, H·v]
};
TORCH_MODULE(MLA);

}  // namespace moetrain
