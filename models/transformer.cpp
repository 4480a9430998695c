#include "models/transformer.h"

#include "models/linear.h"
#include "models/lm_loss.h"

namespace moetrain {

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& cfg, int64_t layer_id) {
  attn_norm = register_module("attn_norm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
  attn = register_module("attn", MLA(cfg));
  ffn_norm = register_module("ffn_norm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
  if (cfg.is_moe_layer(layer_id)) {
    moe = register_module("ffn", MoE(cfg));
  } else {
    dense = register_module("ffn", SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.init_std));
  }
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const RopeTables& rope,
                                        std::vector<RoutingStats>& routing) {
  torch::Tensor h = x + attn(attn_norm(x), rope);
  if (!is_moe()) return h + dense(ffn_norm(h));
  MoEOutput ffn = moe(ffn_norm(h));
  routing.push_back(std::move(ffn.routing));
  return h + ffn.y;
}

TransformerImpl::TransformerImpl(const ModelConfig& config) : cfg(config), rope_(config) {
  embed = register_module("embed", torch::nn::Embedding(cfg.vocab_size, cfg.hidden_size));
  {
    torch::NoGradGuard no_grad;
    embed->weight.normal_(0.0, cfg.init_std);
  }
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) layers->push_back(DecoderLayer(cfg, i));
  norm = register_module("norm", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps));
  head = register_module("head", make_linear(cfg.hidden_size, cfg.vocab_size, cfg.init_std));
}

ForwardOut TransformerImpl::forward(const torch::Tensor& tokens) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be [B, T], got ", tokens.sizes());
  ForwardOut out;
  torch::Tensor h = embed(tokens);  // [B, T, D]
  const auto table_dtype = h.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  const RopeTables rope = rope_.tables(tokens.size(1), h.device(), table_dtype);
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) h = layer(i).forward(h, rope, out.routing);
  out.hidden = norm(h);
  return out;
}

torch::Tensor TransformerImpl::logits(const torch::Tensor& hidden) { return head(hidden); }

std::vector<Router> TransformerImpl::routers() const {
  std::vector<Router> out;
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    if (layer(i).is_moe()) out.push_back(layer(i).moe->gate);
  }
  return out;
}

torch::Tensor lm_head_loss(Transformer& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                           int64_t chunk_tokens) {
  return chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), model->head->weight, targets.reshape({-1}),
                               chunk_tokens);
}

}  // namespace moetrain
