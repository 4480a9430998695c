// defines: ForwardOut, DecoderLayer, Transformer, lm_head_loss — the DeepSeek-V3
// decoder: token embedding, pre-norm blocks (MLA + dense SwiGLU for the first
// `first_k_dense_replace` layers, MLA + MoE after), final RMSNorm, and an untied
// LM head applied separately (chunked) by lm_head_loss / Transformer::logits.
//
// Parameter names are the contract of docs/model-contract.md (embed, layers.{i}.
// attn_norm / attn.* / ffn_norm / ffn.*, norm, head). Multi-token prediction
// modules are a later addition (ForwardOut grows an `mtp_hidden`).
#pragma once

#include <torch/torch.h>

#include <vector>

#include "models/mla.h"
#include "models/model_config.h"
#include "models/moe.h"
#include "models/rms_norm.h"
#include "models/rope.h"
#include "models/swiglu.h"

namespace moetrain {

struct ForwardOut {
  torch::Tensor hidden;               // [B, T, D], after the final norm
  std::vector<RoutingStats> routing;  // one per MoE layer, in layer order
};

struct DecoderLayerImpl : torch::nn::Module {
  DecoderLayerImpl(const ModelConfig& cfg, int64_t layer_id);

  // x: [B, T, D] -> [B, T, D]; an MoE layer appends its routing to `routing`.
  torch::Tensor forward(const torch::Tensor& x, const RopeTables& rope, std::vector<RoutingStats>& routing);

  bool is_moe() const { return !moe.is_empty(); }

  RMSNorm attn_norm{nullptr};
  MLA attn{nullptr};
  RMSNorm ffn_norm{nullptr};
  SwiGLU dense{nullptr};  // registered as "ffn" in dense layers
  MoE moe{nullptr};       // registered as "ffn" in MoE layers
};
TORCH_MODULE(DecoderLayer);

struct TransformerImpl : torch::nn::Module {
  explicit TransformerImpl(const ModelConfig& cfg);

  // tokens: [B, T] int64 -> hidden [B, T, D] (+ routing of every MoE layer)
  ForwardOut forward(const torch::Tensor& tokens);
  // hidden: [..., D] -> [..., V] full logits (eval / parity; training uses lm_head_loss)
  torch::Tensor logits(const torch::Tensor& hidden);
  // The routers of the MoE layers, in layer order (the balancer updates their bias).
  std::vector<Router> routers() const;

  DecoderLayerImpl& layer(int64_t i) const { return *layers->ptr(i)->as<DecoderLayerImpl>(); }

  ModelConfig cfg;
  torch::nn::Embedding embed{nullptr};  // [V, D]
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};                // [D]
  torch::nn::Linear head{nullptr};      // [V, D], untied

 private:
  RotaryEmbedding rope_;  // derived cos/sin tables: a plain member, not a buffer
};
TORCH_MODULE(Transformer);

// Mean cross-entropy of head(hidden) against targets over all positions, chunk_tokens
// rows of logits at a time (see chunked_cross_entropy; targets == -100 are skipped).
// hidden: [B, T, D], targets: [B, T] int64 -> scalar (fp32)
torch::Tensor lm_head_loss(Transformer& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                           int64_t chunk_tokens);

}  // namespace moetrain
