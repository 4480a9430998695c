// defines: ModelConfig, RopeScalingConfig, ScoringFunc — the architecture of a
// DeepSeek-V3-style model. Field names follow Hugging Face's DeepseekV3Config so
// config.json import/export is a straight copy. Defaults are the small
// "debug" shape (torchtitan's debug model), not the 671B model.
#pragma once

#include <cstdint>
#include <string>

namespace moetrain {

enum class ScoringFunc { kSigmoid, kSoftmax };

// YaRN context extension (DeepSeek-V3 §4.3). `enabled == false` means plain RoPE
// (HF `rope_scaling: null`).
struct RopeScalingConfig {
  bool enabled = false;
  double factor = 1.0;                              // s
  int64_t original_max_position_embeddings = 4096;  // L before extension
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct ModelConfig {
  int64_t vocab_size = 2048;
  int64_t hidden_size = 256;             // D
  int64_t num_hidden_layers = 6;         // L (main model, MTP excluded)
  int64_t num_attention_heads = 8;       // n_h
  int64_t intermediate_size = 1024;      // dense FFN width (first_k_dense_replace layers)
  int64_t moe_intermediate_size = 128;   // width of one routed / shared expert
  // MLA
  int64_t q_lora_rank = 0;               // 0: plain q projection (HF null)
  int64_t kv_lora_rank = 64;             // d_c
  int64_t qk_nope_head_dim = 32;         // d_h
  int64_t qk_rope_head_dim = 16;         // d_h^R
  int64_t v_head_dim = 32;
  // DeepSeekMoE
  int64_t n_routed_experts = 8;          // N_r
  int64_t n_shared_experts = 2;          // N_s
  int64_t num_experts_per_tok = 3;       // K_r
  int64_t n_group = 1;                   // expert groups for group-limited routing
  int64_t topk_group = 1;                // groups kept per token
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  ScoringFunc scoring_func = ScoringFunc::kSigmoid;
  int64_t first_k_dense_replace = 1;     // leading layers with a dense FFN
  int64_t num_nextn_predict_layers = 0;  // MTP depth D
  // positions and numerics
  double rope_theta = 10000.0;
  RopeScalingConfig rope_scaling;
  double rms_norm_eps = 1e-6;
  double init_std = 0.006;               // DeepSeek-V3 (HF's default is 0.02)
  int64_t max_position_embeddings = 4096;

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace; }
  int64_t num_moe_layers() const { return num_hidden_layers - first_k_dense_replace; }
};

const char* scoring_func_name(ScoringFunc f);

}  // namespace moetrain
