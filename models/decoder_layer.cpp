#include "models/decoder_layer.h"

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

ResidualStream DecoderLayerImpl::ffn(const torch::Tensor& x, const torch::Tensor& attn_out,
                                     std::vector<RoutingStats>& routing) {
  auto [h, normed] = ffn_norm->forward_add(x, attn_out);  // h = x + attn_out, one kernel on CUDA
  if (!is_moe()) return {h, dense(normed)};
  MoEOutput out = moe(normed);
  routing.push_back(std::move(out.routing));
  return {h, out.y};
}

ResidualStream DecoderLayerImpl::forward_stream(const ResidualStream& in, const RopeTables& rope,
                                                std::vector<RoutingStats>& routing) {
  if (!in.delta.defined()) return ffn(in.h, attn(attn_norm(in.h), rope), routing);
  auto [x, normed] = attn_norm->forward_add(in.h, in.delta);  // the previous layer's residual add
  return ffn(x, attn(normed, rope), routing);
}

torch::Tensor DecoderLayerImpl::forward(const torch::Tensor& x, const RopeTables& rope,
                                        std::vector<RoutingStats>& routing) {
  return forward_stream({x, {}}, rope, routing).value();
}

torch::Tensor DecoderLayerImpl::forward_cached(const torch::Tensor& x, const RopeTables& rope, MLACache& cache) {
  std::vector<RoutingStats> unused;
  return ffn(x, attn->forward_absorbed(attn_norm(x), rope, cache), unused).value();
}

}  // namespace moetrain
