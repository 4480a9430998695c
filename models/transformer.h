// defines: ForwardOut, Transformer, lm_head_loss, mtp_head_losses — the
// DeepSeek-V3 decoder: token embedding, pre-norm blocks (models/decoder_layer.h:
// MLA + dense SwiGLU for the first `first_k_dense_replace` layers, MLA + MoE
// after), final RMSNorm, an untied LM head applied separately (chunked) by
// lm_head_loss / Transformer::logits, and `num_nextn_predict_layers` MTP modules
// (models/mtp.h) that share the embedding and the head.
//
// Parameter names are the contract of docs/model-contract.md (embed, layers.{i}.
// attn_norm / attn.* / ffn_norm / ffn.*, norm, head, mtp.{k}.enorm / hnorm /
// eh_proj / block.* / norm).
//
// Routing order: ForwardOut::routing[j] and routers()[j] are the same MoE layer —
// the main model's MoE layers in layer order, then the MoE blocks of the MTP
// modules in depth order. A forward without MTP gives the main-model prefix.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "models/decoder_layer.h"
#include "models/kv_cache.h"
#include "models/model_config.h"
#include "models/mtp.h"
#include "models/rms_norm.h"
#include "models/rope.h"

namespace moetrain {

struct ForwardOut {
  torch::Tensor hidden;               // [B, T, D], after the final norm
  // MTP depth k = 1..D (entry k-1): [B, T-k, D] after module k's norm; row i
  // predicts token t_{i+k+1}, i.e. targets[:, k + i] (empty without MTP).
  std::vector<torch::Tensor> mtp_hidden;
  std::vector<RoutingStats> routing;  // one per MoE layer, in routers() order
};

struct TransformerImpl : torch::nn::Module {
  explicit TransformerImpl(const ModelConfig& cfg);

  // tokens: [B, T] int64 -> hidden [B, T, D] (+ routing of the main model's MoE
  // layers). With with_mtp and num_nextn_predict_layers = D > 0 (then T > D is
  // required) also the MTP modules' hidden states and routing: what training needs.
  ForwardOut forward(const torch::Tensor& tokens, bool with_mtp = false);
  // hidden: [..., D] -> [..., V] full logits (eval / parity; training uses lm_head_loss)
  torch::Tensor logits(const torch::Tensor& hidden);
  // The routers of all MoE layers in routing order (the balancer updates their bias).
  std::vector<Router> routers() const;

  // Decoding with the latent KV cache (absorbed MLA). tokens: [B, T] at positions
  // cache.length()..+T-1 -> hidden [B, T, D] after the final norm; appends to every
  // layer's cache. A prefill is one call with the prompt, then one call per token.
  torch::Tensor forward_cached(const torch::Tensor& tokens, KVCache& cache);
  KVCache new_cache() const { return KVCache(cfg.num_hidden_layers); }
  // MTP module `depth_index` (0-based) over its block's cache: h_prev [B, T, D]
  // (h^{k-1} at positions cache.length()..), next_tokens [B, T] (t_{i+k}) ->
  // [B, T, D] after the module's norm (ready for logits()).
  torch::Tensor mtp_forward_cached(int64_t depth_index, const torch::Tensor& h_prev, const torch::Tensor& next_tokens,
                                   MLACache& cache);

  DecoderLayerImpl& layer(int64_t i) const { return *layers->ptr(i)->as<DecoderLayerImpl>(); }
  MTPModuleImpl& mtp_module(int64_t k) const { return *mtp->ptr(k)->as<MTPModuleImpl>(); }

  ModelConfig cfg;
  // Training memory: recompute each main-model decoder layer in the backward instead of
  // keeping its activations (models/checkpointing.h). Only when gradients are on.
  bool activation_checkpointing = false;
  torch::nn::Embedding embed{nullptr};  // [V, D]
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};                // [D]
  torch::nn::Linear head{nullptr};      // [V, D], untied
  torch::nn::ModuleList mtp{nullptr};   // D MTPModule (registered only when D > 0)

 private:
  // Tables for positions 0..n-1 in the compute dtype of `like`.
  RopeTables rope_tables(int64_t n, const torch::Tensor& like);
  RotaryEmbedding rope_;  // derived cos/sin tables: a plain member, not a buffer
};
TORCH_MODULE(Transformer);

// Mean cross-entropy of head(hidden) against targets over all positions, chunk_tokens
// rows of logits at a time (see chunked_cross_entropy; targets == -100 are skipped).
// hidden: [B, T, D], targets: [B, T] int64 -> scalar (fp32). bf16_logits: see chunked_cross_entropy.
torch::Tensor lm_head_loss(Transformer& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                           int64_t chunk_tokens, bool bf16_logits = false);

// The MTP losses L^k_MTP, k = 1..D, of a forward with MTP: depth k scores
// head(out.mtp_hidden[k-1]) against targets[:, k:] (token t_{i+k+1} for input
// position i), averaged over its B·(T−k) predictions (eq. 24 writes 1/T; moetrain
// divides by the T−k tokens actually predicted, as transformers' MtpModel does).
// targets: [B, T] (the inputs shifted by one) -> D scalars (fp32).
std::vector<torch::Tensor> mtp_head_losses(Transformer& model, const ForwardOut& out, const torch::Tensor& targets,
                                           int64_t chunk_tokens, bool bf16_logits = false);

}  // namespace moetrain
