// defines: ParamCounts, count_params — analytic parameter and FLOP counts of a
// ModelConfig, computed from the shapes alone (nothing is allocated).
#pragma once

#include <cstdint>

#include "models/model_config.h"

namespace moetrain {

struct ParamCounts {
  int64_t total = 0;             // main model: every parameter (MTP excluded)
  int64_t active = 0;            // per token, including the input embedding
  int64_t embedding = 0;         // input embedding (V·D)
  int64_t flop_params = 0;       // every matmul weight a token touches (LM head in, input embedding out)
  int64_t mtp = 0;               // all MTP modules, unique (shared embedding and head excluded)
  int64_t mtp_active = 0;        // MTP modules' weights a token touches
  int64_t mtp_flop_params = 0;   // MTP matmul weights a token touches
  // per piece, for --memory and the docs
  int64_t attention_per_layer = 0;
  int64_t dense_ffn_per_layer = 0;
  int64_t moe_per_layer = 0;     // router + all routed + shared experts
  int64_t expert = 0;            // one routed expert
  int64_t router_bias = 0;       // e_score_correction_bias entries (buffers, not in total)
  double flops_per_token = 0.0;  // training FLOPs: 6·flop_params + 6·L·n_h·(d_qk + d_v)·T
};

// Activations kept for the backward pass, in elements per token (a documented
// estimate: the tensors autograd saves in the training form of every layer,
// without recomputation; the LM head is chunked so its logits are not counted).
double activation_elements_per_token(const ModelConfig& cfg);

// seq_len: T in the attention term of flops_per_token (no causal halving).
ParamCounts count_params(const ModelConfig& cfg, int64_t seq_len);

}  // namespace moetrain
