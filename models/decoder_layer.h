// defines: DecoderLayer — one pre-norm DeepSeek-V3 block: x + MLA(attn_norm(x)),
// then + FFN(ffn_norm(·)) with a dense SwiGLU (layer < first_k_dense_replace) or
// an MoE. The main model stacks L of them; every MTP module holds one more
// (models/mtp.h), built with the layer index L + k so that the dense/MoE choice
// follows the same rule.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "models/kv_cache.h"
#include "models/mla.h"
#include "models/model_config.h"
#include "models/moe.h"
#include "models/rms_norm.h"
#include "models/rope.h"
#include "models/swiglu.h"

namespace moetrain {

// The residual stream between layers as a pending sum h + delta (delta undefined: just h).
// Handing the last add on lets the next norm do it in its own pass (RMSNormImpl::forward_add):
// one kernel instead of an add and a norm forward, and in the backward no separate sum of the
// stream's two gradients.
struct ResidualStream {
  torch::Tensor h, delta;
  torch::Tensor value() const { return delta.defined() ? h + delta : h; }
};

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const ModelConfig& cfg, int64_t layer_id);

  // x: [B, T, D] -> [B, T, D]; an MoE layer appends its routing to `routing`.
  torch::Tensor forward(const torch::Tensor& x, const RopeTables& rope, std::vector<RoutingStats>& routing);
  // The same block on a pending sum: in.h + in.delta -> {h, FFN output} (its value is the same
  // as forward's; the stack keeps the residual add pending into the next norm).
  ResidualStream forward_stream(const ResidualStream& in, const RopeTables& rope, std::vector<RoutingStats>& routing);
  // Decoding: the same block with absorbed attention over `cache` (see
  // MLAImpl::forward_absorbed for x / rope). Routing is not kept.
  torch::Tensor forward_cached(const torch::Tensor& x, const RopeTables& rope, MLACache& cache);

  bool is_moe() const { return !moe.is_empty(); }

  RMSNorm attn_norm{nullptr};
  MLA attn{nullptr};
  RMSNorm ffn_norm{nullptr};
  SwiGLU dense{nullptr};  // registered as "ffn" in dense layers
  MoE moe{nullptr};       // registered as "ffn" in MoE layers

 private:
  // x + attn_out -> {x + attn_out, FFN output}: the residual add fused with ffn_norm, then the FFN.
  ResidualStream ffn(const torch::Tensor& x, const torch::Tensor& attn_out, std::vector<RoutingStats>& routing);
};
TORCH_MODULE(DecoderLayer);

}  // namespace moetrain
