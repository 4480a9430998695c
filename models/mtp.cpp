#include "models/mtp.h"

#include "models/linear.h"

namespace moetrain {

MTPModuleImpl::MTPModuleImpl(const ModelConfig& cfg, int64_t depth_index) {
  const int64_t d = cfg.hidden_size;
  enorm = register_module("enorm", RMSNorm(d, cfg.rms_norm_eps));
  hnorm = register_module("hnorm", RMSNorm(d, cfg.rms_norm_eps));
  eh_proj = register_module("eh_proj", make_linear(2 * d, d, cfg.init_std));
  block = register_module("block", DecoderLayer(cfg, cfg.num_hidden_layers + depth_index));
  norm = register_module("norm", RMSNorm(d, cfg.rms_norm_eps));
}

torch::Tensor MTPModuleImpl::project(const torch::Tensor& h_prev, const torch::Tensor& emb) {
  TORCH_CHECK(h_prev.sizes() == emb.sizes(), "MTP: h_prev ", h_prev.sizes(), " and emb ", emb.sizes(),
              " must have one shape");
  return eh_proj(torch::cat({enorm(emb), hnorm(h_prev)}, -1));  // [B, T', 2D] -> [B, T', D]
}

torch::Tensor MTPModuleImpl::forward(const torch::Tensor& h_prev, const torch::Tensor& emb, const RopeTables& rope,
                                     std::vector<RoutingStats>& routing) {
  return block->forward(project(h_prev, emb), rope, routing);
}

torch::Tensor MTPModuleImpl::forward_cached(const torch::Tensor& h_prev, const torch::Tensor& emb,
                                            const RopeTables& rope, MLACache& cache) {
  return block->forward_cached(project(h_prev, emb), rope, cache);
}

}  // namespace moetrain
