// defines: RopeTables, RotaryEmbedding, apply_rope, rope_inv_freq,
// rope_attention_factor, yarn_softmax_mscale — rotary position embedding in
// DeepSeek's interleaved pair layout (dims 2i and 2i+1 form one complex number,
// as the official view_as_complex code; Hugging Face `rope_interleave: true`),
// with optional YaRN frequencies (ModelConfig::rope_scaling, HF semantics).
//
// The cos/sin tables are recomputed on demand and cached in a plain member, never
// registered as buffers (Module::save would write them and load would demand them).
#pragma once

#include <torch/torch.h>

#include "models/model_config.h"

namespace moetrain {

// cos/sin of angle t·inv_freq[i] (times the YaRN attention factor) for positions
// t = 0..T-1. Both [T, R/2], R = qk_rope_head_dim; fp32, or fp64 for fp64 models.
struct RopeTables {
  torch::Tensor cos;
  torch::Tensor sin;
};

// [R/2] inverse frequencies theta^(-2i/R); with rope_scaling.enabled, YaRN's blend of
// interpolated (÷factor) and original frequencies over the beta_fast..beta_slow ramp.
torch::Tensor rope_inv_freq(const ModelConfig& cfg, torch::Dtype dtype = torch::kFloat);
// Multiplier on cos/sin (HF `attention_factor`): 1 without YaRN.
double rope_attention_factor(const ModelConfig& cfg);
// Multiplier on the attention softmax scale: mscale(factor, mscale_all_dim)^2 with
// YaRN and mscale_all_dim != 0, else 1 (HF yarn_apply_mscale; official code likewise).
double yarn_softmax_mscale(const ModelConfig& cfg);

class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const ModelConfig& cfg);

  // Tables for positions 0..seq_len-1 on `device`, in `dtype` (kFloat or kDouble).
  // Cached: a later call with the same device/dtype and seq_len <= the cached
  // length returns a slice of the cached tables.
  RopeTables tables(int64_t seq_len, torch::Device device, torch::Dtype dtype);

 private:
  ModelConfig cfg_;
  RopeTables cache_;
  int64_t cache_len_ = 0;
};

// x: [B, T, H, R] -> [B, T, H, R] (rope.cos/sin: [T', R/2] with T' >= T; positions 0..T-1).
// Pairs (x[2i], x[2i+1]) are rotated: (a, b) -> (a·cos - b·sin, a·sin + b·cos).
// Computed in the tables' precision, returned in x's dtype.
torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& rope);

}  // namespace moetrain
