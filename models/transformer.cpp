#include "models/transformer.h"

#include "models/checkpointing.h"
#include "models/linear.h"
#include "models/lm_loss.h"

namespace moetrain {

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
  // Registered last, so the main model's parameters keep their order (optimizer state
  // is positional) and a model without MTP has exactly the names it always had.
  mtp = torch::nn::ModuleList();
  if (cfg.num_nextn_predict_layers > 0) {
    mtp = register_module("mtp", mtp);
    for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) mtp->push_back(MTPModule(cfg, k));
  }
}

RopeTables TransformerImpl::rope_tables(int64_t n, const torch::Tensor& like) {
  const auto dtype = like.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  return rope_.tables(n, like.device(), dtype);
}

ForwardOut TransformerImpl::forward(const torch::Tensor& tokens, bool with_mtp) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be [B, T], got ", tokens.sizes());
  const int64_t T = tokens.size(1), D = cfg.num_nextn_predict_layers;
  ForwardOut out;
  const torch::Tensor emb = embed(tokens);  // [B, T, D]
  const RopeTables rope = rope_tables(T, emb);
  const bool checkpoint = activation_checkpointing && torch::GradMode::is_enabled();
  // Each layer hands on its last residual add pending (h + FFN output) and the next norm does
  // it (DecoderLayerImpl::forward_stream); checkpointed layers take and return whole values.
  ResidualStream stream{emb, {}};
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    if (checkpoint)
      stream = {checkpointed_layer_forward(layer(i), stream.value(), rope, out.routing), {}};
    else
      stream = layer(i).forward_stream(stream, rope, out.routing);
  }
  out.hidden = stream.delta.defined() ? norm->forward_add(stream.h, stream.delta).second : norm(stream.h);
  if (!with_mtp || D == 0) return out;

  TORCH_CHECK(T > D, "multi-token prediction with ", D, " module(s) needs sequences longer than ", D,
              " tokens, got T = ", T, " (pass with_mtp = false)");
  torch::Tensor prev = out.hidden;  // h^0: what the main head reads
  for (int64_t k = 1; k <= D; ++k) {
    const int64_t n = T - k;  // positions i = 0..T-k-1 have their t_{i+k} inside the window
    const torch::Tensor hk = mtp_module(k - 1).forward(prev.narrow(1, 0, n), emb.narrow(1, k, n), rope, out.routing);
    out.mtp_hidden.push_back(mtp_module(k - 1).norm(hk));
    prev = hk;
  }
  return out;
}

torch::Tensor TransformerImpl::logits(const torch::Tensor& hidden) { return head(hidden); }

std::vector<Router> TransformerImpl::routers() const {
  std::vector<Router> out;
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    if (layer(i).is_moe()) out.push_back(layer(i).moe->gate);
  }
  for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
    if (mtp_module(k).block->is_moe()) out.push_back(mtp_module(k).block->moe->gate);
  }
  return out;
}

torch::Tensor TransformerImpl::forward_cached(const torch::Tensor& tokens, KVCache& cache) {
  TORCH_CHECK(tokens.dim() == 2, "tokens must be [B, T], got ", tokens.sizes());
  TORCH_CHECK(static_cast<int64_t>(cache.layers.size()) == cfg.num_hidden_layers, "KVCache has ",
              cache.layers.size(), " layers, the model ", cfg.num_hidden_layers);
  const int64_t P = cache.length(), T = tokens.size(1);
  torch::Tensor h = embed(tokens);
  const RopeTables all = rope_tables(P + T, h);
  const RopeTables rope{all.cos.narrow(0, P, T), all.sin.narrow(0, P, T)};  // row t = position P+t
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i)
    h = layer(i).forward_cached(h, rope, cache.layers[static_cast<size_t>(i)]);
  return norm(h);
}

torch::Tensor TransformerImpl::mtp_forward_cached(int64_t depth_index, const torch::Tensor& h_prev,
                                                  const torch::Tensor& next_tokens, MLACache& cache) {
  TORCH_CHECK(depth_index >= 0 && depth_index < cfg.num_nextn_predict_layers, "MTP module ", depth_index,
              " does not exist (num_nextn_predict_layers = ", cfg.num_nextn_predict_layers, ")");
  const int64_t P = cache.length(), T = next_tokens.size(1);
  const torch::Tensor emb = embed(next_tokens);
  const RopeTables all = rope_tables(P + T, emb);
  const RopeTables rope{all.cos.narrow(0, P, T), all.sin.narrow(0, P, T)};
  MTPModuleImpl& m = mtp_module(depth_index);
  return m.norm(m.forward_cached(h_prev, emb, rope, cache));
}

torch::Tensor lm_head_loss(Transformer& model, const torch::Tensor& hidden, const torch::Tensor& targets,
                           int64_t chunk_tokens, bool bf16_logits) {
  return chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), model->head->weight, targets.reshape({-1}),
                               chunk_tokens, kIgnoreIndex, bf16_logits);
}

std::vector<torch::Tensor> mtp_head_losses(Transformer& model, const ForwardOut& out, const torch::Tensor& targets,
                                           int64_t chunk_tokens, bool bf16_logits) {
  std::vector<torch::Tensor> losses;
  const int64_t T = targets.size(1);
  for (size_t j = 0; j < out.mtp_hidden.size(); ++j) {
    const int64_t k = static_cast<int64_t>(j) + 1;
    const torch::Tensor& h = out.mtp_hidden[j];  // [B, T-k, D]
    TORCH_CHECK(h.size(1) == T - k, "mtp_head_losses: depth ", k, " has ", h.size(1), " positions, expected ", T - k);
    losses.push_back(lm_head_loss(model, h, targets.narrow(1, k, T - k), chunk_tokens, bf16_logits));
  }
  return losses;
}

}  // namespace moetrain
