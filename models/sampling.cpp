#include "models/sampling.h"

#include <limits>

namespace moetrain {

torch::Tensor sampling_probs(const torch::Tensor& logits, const SamplingOptions& opt) {
  TORCH_CHECK(logits.dim() == 1, "sampling_probs: logits must be [V], got ", logits.sizes());
  TORCH_CHECK(opt.temperature > 0.0, "sampling_probs: temperature must be > 0 (0 means greedy)");
  TORCH_CHECK(opt.top_p > 0.0 && opt.top_p <= 1.0, "sampling_probs: top_p must be in (0, 1], got ", opt.top_p);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  torch::Tensor scaled = logits.to(torch::kCPU, torch::kDouble) / opt.temperature;  // [V]
  const int64_t V = scaled.size(0);
  if (opt.top_k > 0 && opt.top_k < V) {
    // Keep every token at least as likely as the k-th (ties at the boundary stay).
    const torch::Tensor kth = std::get<0>(scaled.topk(opt.top_k)).select(0, opt.top_k - 1);
    scaled = scaled.masked_fill(scaled < kth, neg_inf);
  }
  torch::Tensor probs = torch::softmax(scaled, 0);
  if (opt.top_p < 1.0) {
    auto [sorted, order] = probs.sort(0, /*descending=*/true);
    // Drop a token when the tokens before it already reach top_p: the kept set is the
    // smallest prefix of the sorted tokens whose mass is >= top_p (never empty).
    const torch::Tensor mass_before = sorted.cumsum(0) - sorted;
    const torch::Tensor drop_sorted = (mass_before >= opt.top_p).to(torch::kDouble);
    const torch::Tensor drop = torch::zeros_like(drop_sorted).scatter(0, order, drop_sorted) > 0.5;  // unsort
    probs = probs.masked_fill(drop, 0.0);
    probs = probs / probs.sum();
  }
  return probs;
}

int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& opt, at::Generator& gen) {
  if (opt.temperature <= 0.0) return logits.argmax(-1).item<int64_t>();
  const torch::Tensor probs = sampling_probs(logits, opt);
  return torch::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

}  // namespace moetrain
