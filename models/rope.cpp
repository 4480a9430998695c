#include "models/rope.h"

#include <algorithm>
#include <cmath>

namespace moetrain {

namespace {

constexpr double kPi = 3.14159265358979323846;

// YaRN's sqrt(t) = 0.1·mscale·ln(s) + 1 (DeepSeek-V3 §4.3), 1 for s <= 1.
double yarn_get_mscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// The rotary dimension at which a wavelength completes `num_rotations` turns
// over `max_pos` positions (YaRN's inverse dimension formula).
double yarn_correction_dim(double num_rotations, int64_t dim, double base, int64_t max_pos) {
  return static_cast<double>(dim) *
         std::log(static_cast<double>(max_pos) / (num_rotations * 2.0 * kPi)) /
         (2.0 * std::log(base));
}

}  // namespace

torch::Tensor rope_inv_freq(const ModelConfig& cfg, torch::Dtype dtype) {
  const int64_t dim = cfg.qk_rope_head_dim;
  TORCH_CHECK(dim % 2 == 0, "qk_rope_head_dim must be even, got ", dim);
  const auto opts = torch::TensorOptions().dtype(dtype);
  // Same arithmetic as the references (base ** (arange/dim) in the table dtype).
  const torch::Tensor pos_freqs = torch::pow(cfg.rope_theta, torch::arange(0, dim, 2, opts) / dim);
  const torch::Tensor extrapolation = 1.0 / pos_freqs;
  const RopeScalingConfig& ys = cfg.rope_scaling;
  if (!ys.enabled) return extrapolation;

  // YaRN (DeepSeek official `precompute_freqs_cis`, HF `_compute_yarn_parameters`
  // with truncate=True): keep high frequencies, interpolate low ones, ramp between.
  const torch::Tensor interpolation = 1.0 / (ys.factor * pos_freqs);
  double low = std::floor(yarn_correction_dim(ys.beta_fast, dim, cfg.rope_theta,
                                              ys.original_max_position_embeddings));
  double high = std::ceil(yarn_correction_dim(ys.beta_slow, dim, cfg.rope_theta,
                                              ys.original_max_position_embeddings));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp
  const torch::Tensor ramp = ((torch::arange(dim / 2, opts) - low) / (high - low)).clamp(0.0, 1.0);
  const torch::Tensor extrapolation_factor = 1.0 - ramp;
  return interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor;
}

double rope_attention_factor(const ModelConfig& cfg) {
  const RopeScalingConfig& ys = cfg.rope_scaling;
  if (!ys.enabled) return 1.0;
  if (ys.mscale != 0.0 && ys.mscale_all_dim != 0.0) {
    return yarn_get_mscale(ys.factor, ys.mscale) / yarn_get_mscale(ys.factor, ys.mscale_all_dim);
  }
  return yarn_get_mscale(ys.factor, 1.0);
}

double yarn_softmax_mscale(const ModelConfig& cfg) {
  const RopeScalingConfig& ys = cfg.rope_scaling;
  if (!ys.enabled || ys.mscale_all_dim == 0.0) return 1.0;
  const double m = yarn_get_mscale(ys.factor, ys.mscale_all_dim);
  return m * m;
}

RotaryEmbedding::RotaryEmbedding(const ModelConfig& cfg) : cfg_(cfg) {}

RopeTables RotaryEmbedding::tables(int64_t seq_len, torch::Device device, torch::Dtype dtype) {
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kDouble,
              "RoPE tables are fp32 or fp64, got ", dtype);
  const bool hit = cache_len_ >= seq_len && cache_.cos.defined() &&
                   cache_.cos.device() == device && cache_.cos.scalar_type() == dtype;
  if (!hit) {
    torch::NoGradGuard no_grad;
    const auto opts = torch::TensorOptions().dtype(dtype);
    const torch::Tensor inv_freq = rope_inv_freq(cfg_, dtype);                   // [R/2]
    const torch::Tensor angles = torch::outer(torch::arange(seq_len, opts), inv_freq);  // [T, R/2]
    const double attention_factor = rope_attention_factor(cfg_);
    cache_.cos = (angles.cos() * attention_factor).to(device);
    cache_.sin = (angles.sin() * attention_factor).to(device);
    cache_len_ = seq_len;
  }
  return {cache_.cos.narrow(0, 0, seq_len), cache_.sin.narrow(0, 0, seq_len)};
}

torch::Tensor apply_rope(const torch::Tensor& x, const RopeTables& rope) {
  // x: [B, T, H, R]; pair i of x is (x[..., 2i], x[..., 2i+1]).
  const int64_t seq_len = x.size(1);
  const torch::Tensor cos = rope.cos.narrow(0, 0, seq_len).unsqueeze(1);  // [T, 1, R/2]
  const torch::Tensor sin = rope.sin.narrow(0, 0, seq_len).unsqueeze(1);
  const torch::Tensor pairs = x.to(rope.cos.scalar_type()).unflatten(-1, {-1, 2});  // [B, T, H, R/2, 2]
  const torch::Tensor a = pairs.select(-1, 0);
  const torch::Tensor b = pairs.select(-1, 1);
  const torch::Tensor rotated = torch::stack({a * cos - b * sin, a * sin + b * cos}, -1);
  return rotated.flatten(-2).to(x.scalar_type());  // [B, T, H, R]
}

}  // namespace moetrain
