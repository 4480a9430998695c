#include "models/params.h"

#include <algorithm>

namespace moetrain {

namespace {

// One SwiGLU MLP of width `inter`: gate, up (D→inter) and down (inter→D).
int64_t swiglu_params(int64_t hidden, int64_t inter) { return 3 * hidden * inter; }

// MLA projections and the two latent norms (DeepSeek-V3 eqs. 1–11).
int64_t attention_params(const ModelConfig& c) {
  const int64_t d = c.hidden_size, h = c.num_attention_heads;
  int64_t q = 0;
  if (c.q_lora_rank > 0) {
    q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim();  // wq_a, q_norm, wq_b
  } else {
    q = d * h * c.qk_head_dim();  // wq
  }
  const int64_t kv = d * (c.kv_lora_rank + c.qk_rope_head_dim)               // wkv_a (latent + shared k_rope)
                     + c.kv_lora_rank                                        // kv_norm
                     + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim);  // wkv_b
  const int64_t out = h * c.v_head_dim * d;  // wo
  return q + kv + out;
}

int64_t attention_matmul_params(const ModelConfig& c) {
  int64_t norms = c.kv_lora_rank + (c.q_lora_rank > 0 ? c.q_lora_rank : 0);
  return attention_params(c) - norms;
}

}  // namespace

ParamCounts count_params(const ModelConfig& c, int64_t seq_len) {
  ParamCounts p;
  const int64_t d = c.hidden_size, v = c.vocab_size;
  p.embedding = v * d;
  p.attention_per_layer = attention_params(c);
  p.dense_ffn_per_layer = swiglu_params(d, c.intermediate_size);
  p.expert = swiglu_params(d, c.moe_intermediate_size);
  const int64_t shared = swiglu_params(d, c.n_shared_experts * c.moe_intermediate_size);
  const int64_t router = c.n_routed_experts * d;
  p.moe_per_layer = router + c.n_routed_experts * p.expert + shared;
  const int64_t moe_active = router + c.num_experts_per_tok * p.expert + shared;

  const int64_t layer_norms = 2 * d;  // input_layernorm, post_attention_layernorm
  const int64_t n_dense = std::min(c.first_k_dense_replace, c.num_hidden_layers);
  const int64_t n_moe = c.num_hidden_layers - n_dense;
  const int64_t head = v * d;

  p.total = p.embedding + head + d /*final norm*/ +
            c.num_hidden_layers * (p.attention_per_layer + layer_norms) +
            n_dense * p.dense_ffn_per_layer + n_moe * p.moe_per_layer;
  p.active = p.embedding + head + d + c.num_hidden_layers * (p.attention_per_layer + layer_norms) +
             n_dense * p.dense_ffn_per_layer + n_moe * moe_active;
  p.flop_params = head + c.num_hidden_layers * attention_matmul_params(c) +
                  n_dense * p.dense_ffn_per_layer + n_moe * moe_active;
  p.router_bias = n_moe * c.n_routed_experts;

  // MTP module k (DeepSeek-V3 §2.2): enorm, hnorm, eh_proj [D, 2D], one decoder
  // block (MoE unless every layer is dense), shared_head.norm. Embedding and
  // output head are shared with the main model and not counted here.
  if (c.num_nextn_predict_layers > 0) {
    const bool mtp_moe = c.first_k_dense_replace < c.num_hidden_layers + 1;
    const int64_t ffn = mtp_moe ? p.moe_per_layer : p.dense_ffn_per_layer;
    const int64_t ffn_active = mtp_moe ? moe_active : p.dense_ffn_per_layer;
    const int64_t eh_proj = 2 * d * d;
    const int64_t block = p.attention_per_layer + layer_norms;
    p.mtp = c.num_nextn_predict_layers * (3 * d + eh_proj + block + ffn);
    p.mtp_active = c.num_nextn_predict_layers * (3 * d + eh_proj + block + ffn_active);
    p.mtp_flop_params = c.num_nextn_predict_layers * (eh_proj + attention_matmul_params(c) + ffn_active + head);
  }

  const double attention_flops = 6.0 * static_cast<double>(c.num_hidden_layers) *
                                 static_cast<double>(c.num_attention_heads) *
                                 static_cast<double>(c.qk_head_dim() + c.v_head_dim) *
                                 static_cast<double>(seq_len);
  p.flops_per_token = 6.0 * static_cast<double>(p.flop_params) + attention_flops;
  return p;
}

double activation_elements_per_token(const ModelConfig& c) {
  const double d = static_cast<double>(c.hidden_size), h = static_cast<double>(c.num_attention_heads);
  const double qk = static_cast<double>(c.qk_head_dim()), vd = static_cast<double>(c.v_head_dim);
  // attention: norm input + output, q path, latent path, q/k/v, attention output, wo input
  double q_path = c.q_lora_rank > 0 ? 2.0 * static_cast<double>(c.q_lora_rank) + h * qk : h * qk;
  double kv_path = 2.0 * static_cast<double>(c.kv_lora_rank + c.qk_rope_head_dim) + h * (c.qk_nope_head_dim + vd);
  double attention = 2.0 * d + q_path + kv_path + h * qk * 2.0 + h * vd * 2.0 + 1.0 /*logsumexp per head*/ * h;
  // SwiGLU: input, gate and up outputs, their product
  auto swiglu = [&](double width) { return d + 3.0 * width; };
  double dense = 2.0 * d + swiglu(static_cast<double>(c.intermediate_size));
  const double k = static_cast<double>(c.num_experts_per_tok), e = static_cast<double>(c.n_routed_experts);
  double moe = 2.0 * d + 2.0 * e /*logits, scores*/ + k * swiglu(static_cast<double>(c.moe_intermediate_size)) +
               k * d /*expert outputs*/ + swiglu(static_cast<double>(c.n_shared_experts * c.moe_intermediate_size));
  const int64_t n_dense = std::min(c.first_k_dense_replace, c.num_hidden_layers);
  const int64_t n_moe = c.num_hidden_layers - n_dense;
  return static_cast<double>(c.num_hidden_layers) * attention + static_cast<double>(n_dense) * dense +
         static_cast<double>(n_moe) * moe + 2.0 * d /*final norm*/;
}

}  // namespace moetrain
