// defines: MTPModule — one multi-token-prediction module (DeepSeek-V3 §2.2, eqs.
// 21–23). Module k (1-based; registered as `mtp.{k-1}`) at position i combines
// the previous depth's representation h^{k-1}_i with the embedding of token
// t_{i+k}:
//     h'^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])   (embedding first:
//              the released checkpoints' order, as vLLM / SGLang / transformers apply it)
//     h^k    = block(h'^k)                                          (one decoder layer)
//     P^k    = head(norm(h^k))   predicts t_{i+k+1}                 (head and Emb shared
//              with the main model; `norm` is the module's own `shared_head.norm`)
// h^0 is the main model's final-normed hidden state (what the main head reads,
// as the serving engines feed it); depth k+1 chains on the block output h^k.
// The block is dense or MoE by the main model's rule at layer index L + k - 1
// (DeepSeek-V3: MoE); MoE blocks route and balance like every other MoE layer.
#pragma once

#include <torch/torch.h>

#include <vector>

#include "models/decoder_layer.h"
#include "models/kv_cache.h"
#include "models/model_config.h"
#include "models/rms_norm.h"
#include "models/rope.h"

namespace moetrain {

struct MTPModuleImpl : torch::nn::Module {
  // depth_index: k - 1 (0-based); the block is built as layer num_hidden_layers + k - 1.
  MTPModuleImpl(const ModelConfig& cfg, int64_t depth_index);

  // h_prev: [B, T', D] h^{k-1} at positions 0..T'-1, emb: [B, T', D] Emb(t_{i+k})
  // -> h^k [B, T', D] (the block output, before `norm`); MoE routing appended.
  torch::Tensor forward(const torch::Tensor& h_prev, const torch::Tensor& emb, const RopeTables& rope,
                        std::vector<RoutingStats>& routing);
  // Decoding: the same over the block's latent cache (positions cache.length()..).
  torch::Tensor forward_cached(const torch::Tensor& h_prev, const torch::Tensor& emb, const RopeTables& rope,
                               MLACache& cache);

  RMSNorm enorm{nullptr};            // [D]
  RMSNorm hnorm{nullptr};            // [D]
  torch::nn::Linear eh_proj{nullptr};  // [D, 2D]: input [enorm(emb) | hnorm(h)]
  DecoderLayer block{nullptr};       // same parameter names as layers.{i}
  RMSNorm norm{nullptr};             // [D], HF shared_head.norm

 private:
  torch::Tensor project(const torch::Tensor& h_prev, const torch::Tensor& emb);
};
TORCH_MODULE(MTPModule);

}  // namespace moetrain
