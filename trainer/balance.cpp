#include "trainer/balance.h"

#include <algorithm>

#include <fmt/format.h>

namespace moetrain {

namespace {

// Per token, the scores renormalized over all experts (eq. 19); softmax scores already sum to 1.
torch::Tensor normalized_scores(const torch::Tensor& scores) {
  return scores / (scores.sum(-1, true) + 1e-20);
}

// [N, E] one-hot sum of the unbiased plain top-k of scores (no grad).
torch::Tensor unbiased_topk_mask(const torch::Tensor& scores, int64_t top_k) {
  torch::NoGradGuard no_grad;
  auto idx = std::get<1>(scores.topk(top_k, -1));
  return torch::zeros_like(scores).scatter_(-1, idx, 1.0);
}

}  // namespace

torch::Tensor aux_loss(const RoutingStats& r, int64_t top_k) {
  const int64_t n = r.scores.size(0), e = r.scores.size(1);
  torch::Tensor f = unbiased_topk_mask(r.scores, top_k).sum(0) / static_cast<double>(n * top_k);  // [E] fraction of picks
  torch::Tensor p = normalized_scores(r.scores).mean(0);                                          // [E]
  return static_cast<double>(e) * (f * p).sum();
}

torch::Tensor seq_aux_loss(const RoutingStats& r, int64_t top_k, int64_t seq_len) {
  const int64_t n = r.scores.size(0), e = r.scores.size(1);
  TORCH_CHECK(n % seq_len == 0, "seq_aux_loss: ", n, " tokens is not a whole number of sequences of ", seq_len);
  const int64_t b = n / seq_len;
  torch::Tensor mask = unbiased_topk_mask(r.scores, top_k).view({b, seq_len, e});
  torch::Tensor f = mask.sum(1) * (static_cast<double>(e) / static_cast<double>(top_k * seq_len));  // [B, E], eq. 18
  torch::Tensor p = normalized_scores(r.scores).view({b, seq_len, e}).mean(1);                    // [B, E], eq. 20
  return (f * p).sum(-1).mean();  // eq. 17 without α, averaged over sequences
}

torch::Tensor z_loss(const RoutingStats& r) {
  return torch::logsumexp(r.logits, -1).pow(2).mean();
}

double max_violation(const torch::Tensor& counts) {
  torch::Tensor c = counts.to(torch::kFloat64);
  double mean = c.mean().item<double>();
  if (mean <= 0.0) return 0.0;
  return (c.max().item<double>() - mean) / mean;
}

Balancer::Balancer(const BalanceConfig& cfg, const ModelConfig& model, std::vector<Router> routers)
    : cfg_(cfg), top_k_(model.num_experts_per_tok), routers_(std::move(routers)) {
  // On the routers' device: counting and the bias update never wait for the GPU.
  const torch::Device device = routers_.empty() ? torch::Device(torch::kCPU) : routers_[0]->bias.device();
  counts_ = torch::zeros({static_cast<int64_t>(routers_.size()), model.n_routed_experts},
                         torch::TensorOptions().dtype(torch::kInt64).device(device));
}

BalanceLosses Balancer::losses(const std::vector<RoutingStats>& routing, int64_t seq_len) const {
  BalanceLosses out;
  torch::TensorOptions opts = torch::TensorOptions().dtype(torch::kFloat32);
  if (!routing.empty()) opts = opts.device(routing[0].scores.device()).dtype(routing[0].scores.scalar_type());
  out.aux = torch::zeros({}, opts);
  out.seq_aux = torch::zeros({}, opts);
  out.z = torch::zeros({}, opts);
  for (const auto& r : routing) {
    if (cfg_.has("aux_loss")) out.aux = out.aux + cfg_.aux_loss_coef * aux_loss(r, top_k_);
    // An MTP layer's rows are sequences of T-k tokens: its own seq_len wins.
    const int64_t layer_seq_len = r.seq_len > 0 ? r.seq_len : seq_len;
    if (cfg_.has("seq_aux_loss"))
      out.seq_aux = out.seq_aux + cfg_.seq_aux_loss_coef * seq_aux_loss(r, top_k_, layer_seq_len);
    if (cfg_.has("z_loss")) out.z = out.z + cfg_.z_loss_coef * z_loss(r);
  }
  return out;
}

void Balancer::accumulate(const std::vector<RoutingStats>& routing) {
  TORCH_CHECK(static_cast<int64_t>(routing.size()) == counts_.size(0), "Balancer: expected ", counts_.size(0),
              " MoE layers of routing, got ", routing.size());
  for (size_t l = 0; l < routing.size(); ++l)
    counts_[static_cast<int64_t>(l)] += routing[l].counts.to(counts_.device(), torch::kInt64);
}

double Balancer::rate_at(int64_t step, int64_t tokens) const {
  if (!cfg_.has("loss_free")) return 0.0;
  if (cfg_.bias_freeze_step && step >= *cfg_.bias_freeze_step) return 0.0;
  if (cfg_.bias_freeze_tokens && tokens >= *cfg_.bias_freeze_tokens) return 0.0;
  return cfg_.bias_update_rate;
}

void Balancer::after_step(int64_t step, int64_t tokens) {
  const double gamma = rate_at(step, tokens);
  if (gamma > 0.0 && !routers_.empty()) {
    // All layers at once: a handful of kernels instead of seven per layer, which left the GPU
    // idle between launches (≈ 1.5 ms a step at 11 layers; bench/NOTES.md 23).
    torch::NoGradGuard no_grad;
    const torch::Tensor load = counts_.to(torch::kFloat64);  // [L, E]
    const torch::Tensor mean = load.mean(1, /*keepdim=*/true);  // [L, 1]
    torch::Tensor delta = cfg_.bias_update == "sign" ? gamma * torch::sign(mean - load)
                                                     : gamma * (mean - load) / torch::clamp_min(mean, 1e-20);
    if (cfg_.bias_center) delta = delta - delta.mean(1, /*keepdim=*/true);
    std::vector<torch::Tensor> biases;
    for (const auto& r : routers_) biases.push_back(r->bias);
    const torch::Tensor& b0 = biases.front();
    torch::_foreach_add_(biases, delta.to(b0.device(), b0.scalar_type()).unbind(0));
  }
  counts_.zero_();
}

void Balancer::discard_step() { counts_.zero_(); }

std::vector<double> max_violation_per_row(const torch::Tensor& counts) {
  const torch::Tensor host = counts.to(torch::kCPU);  // one copy for all rows
  std::vector<double> out;
  for (int64_t l = 0; l < host.size(0); ++l) out.push_back(max_violation(host[l]));
  return out;
}

std::vector<double> Balancer::maxvio_per_layer() const { return max_violation_per_row(counts_); }

torch::Tensor Balancer::biases() const {
  std::vector<torch::Tensor> rows;
  for (const auto& r : routers_) rows.push_back(r->bias.detach().to(torch::kCPU, torch::kFloat32));
  if (rows.empty()) return torch::zeros({0}, torch::kFloat32);
  return torch::stack(rows);
}

}  // namespace moetrain
