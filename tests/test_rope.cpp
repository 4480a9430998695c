// RoPE: DeepSeek's interleaved pair layout, the relative-position property, and
// YaRN frequencies against Hugging Face's _compute_yarn_parameters.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "models/rope.h"

using namespace moetrain;

// Single-threaded and seeded: the tensors are tiny, and intra-op threads only
// contend with the tests CTest runs beside these (2 threads on a loaded 2-core
// machine made the debug step 5-30x slower).
class RopeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

ModelConfig rope_config(int64_t rope_dim) {
  ModelConfig cfg;
  cfg.qk_rope_head_dim = rope_dim;
  return cfg;
}

}  // namespace

TEST_F(RopeTest, InterleavedPairsHandExample) {
  // R = 4: pairs (x0, x1) with inv_freq 1 and (x2, x3) with inv_freq 10000^(-2/4) = 0.01.
  RotaryEmbedding rope(rope_config(4));
  const RopeTables tables = rope.tables(2, torch::kCPU, torch::kDouble);
  const torch::Tensor x = torch::tensor({1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0}, torch::kDouble).view({1, 2, 1, 4});
  const torch::Tensor y = apply_rope(x, tables);
  // Position 0: identity.
  EXPECT_TRUE(torch::allclose(y[0][0][0], x[0][0][0]));
  // Position 1: pair 0 rotated by 1 rad, pair 1 by 0.01 rad.
  const double c0 = std::cos(1.0), s0 = std::sin(1.0), c1 = std::cos(0.01), s1 = std::sin(0.01);
  const torch::Tensor expected =
      torch::tensor({1 * c0 - 2 * s0, 1 * s0 + 2 * c0, 3 * c1 - 4 * s1, 3 * s1 + 4 * c1}, torch::kDouble);
  EXPECT_TRUE(torch::allclose(y[0][1][0], expected, 1e-12, 1e-12)) << y[0][1][0] << expected;
}

TEST_F(RopeTest, MatchesComplexMultiplication) {
  // The official code: view_as_complex(x pairs) * polar(1, t·inv_freq).
  const ModelConfig cfg = rope_config(16);
  RotaryEmbedding rope(cfg);
  const int64_t T = 7;
  const torch::Tensor x = torch::randn({2, T, 3, 16}, torch::kDouble);
  const torch::Tensor y = apply_rope(x, rope.tables(T, torch::kCPU, torch::kDouble));
  const torch::Tensor angles = torch::outer(torch::arange(T, torch::kDouble), rope_inv_freq(cfg, torch::kDouble));
  const torch::Tensor rot = torch::polar(torch::ones_like(angles), angles).view({1, T, 1, 8});
  const torch::Tensor expected = torch::view_as_real(torch::view_as_complex(x.view({2, T, 3, 8, 2})) * rot).flatten(-2);
  EXPECT_TRUE(torch::allclose(y, expected, 1e-12, 1e-12));
}

TEST_F(RopeTest, DotProductDependsOnlyOnRelativePosition) {
  RotaryEmbedding rope(rope_config(32));
  const int64_t T = 24;
  const RopeTables tables = rope.tables(T, torch::kCPU, torch::kDouble);
  // The same q and k vectors at every position.
  const torch::Tensor q = apply_rope(torch::randn({1, 1, 1, 32}, torch::kDouble).expand({1, T, 1, 32}), tables);
  const torch::Tensor k = apply_rope(torch::randn({1, 1, 1, 32}, torch::kDouble).expand({1, T, 1, 32}), tables);
  const torch::Tensor dots = torch::matmul(q[0].squeeze(1), k[0].squeeze(1).t());  // [T, T]: q_t · k_s
  for (int64_t t = 0; t + 5 < T; ++t) {
    for (int64_t s = 0; s + 5 < T; ++s) {
      EXPECT_NEAR(dots[t][s].item<double>(), dots[t + 5][s + 5].item<double>(), 1e-10) << t << "," << s;
    }
  }
  // ... and it does depend on the offset.
  EXPECT_GT(std::abs(dots[3][0].item<double>() - dots[0][0].item<double>()), 1e-6);
}

TEST_F(RopeTest, TablesCachedAndSliced) {
  RotaryEmbedding rope(rope_config(8));
  const RopeTables long_tables = rope.tables(16, torch::kCPU, torch::kFloat);
  const RopeTables short_tables = rope.tables(5, torch::kCPU, torch::kFloat);
  EXPECT_EQ(short_tables.cos.size(0), 5);
  EXPECT_EQ(short_tables.cos.size(1), 4);
  EXPECT_TRUE(torch::equal(short_tables.sin, long_tables.sin.narrow(0, 0, 5)));
  EXPECT_EQ(rope.tables(5, torch::kCPU, torch::kDouble).cos.scalar_type(), torch::kDouble);
  // bf16 input: computed in fp32, returned in bf16.
  const torch::Tensor x = torch::randn({1, 5, 2, 8}).to(torch::kBFloat16);
  EXPECT_EQ(apply_rope(x, short_tables).scalar_type(), torch::kBFloat16);
}

TEST_F(RopeTest, YarnMatchesHuggingFace) {
  // transformers 5.17 _compute_yarn_parameters: head dim 64, theta 1e4, factor 40,
  // original 4096, beta 32/1.
  ModelConfig cfg = rope_config(64);
  cfg.rope_scaling.enabled = true;
  cfg.rope_scaling.factor = 40.0;
  cfg.rope_scaling.original_max_position_embeddings = 4096;
  cfg.rope_scaling.mscale = 1.0;
  cfg.rope_scaling.mscale_all_dim = 1.0;
  const torch::Tensor inv = rope_inv_freq(cfg, torch::kFloat);
  const std::vector<std::pair<int64_t, double>> expected = {
      {0, 1.0}, {5, 0.23713736236095428}, {10, 0.05623412877321243}, {15, 0.0083345090970397},
      {20, 0.0007905694073997438}, {25, 1.8747354260995053e-05}, {31, 3.3338035336782923e-06}};
  for (const auto& [i, v] : expected) EXPECT_NEAR(inv[i].item<double>() / v, 1.0, 1e-6) << "index " << i;
  // mscale == mscale_all_dim: no cos/sin factor, softmax scale times (0.1 ln 40 + 1)^2.
  EXPECT_DOUBLE_EQ(rope_attention_factor(cfg), 1.0);
  EXPECT_NEAR(yarn_softmax_mscale(cfg), 1.3688879454113936 * 1.3688879454113936, 1e-12);
  // No mscale_all_dim: HF puts mscale(factor) on cos/sin instead.
  cfg.rope_scaling.mscale_all_dim = 0.0;
  EXPECT_NEAR(rope_attention_factor(cfg), 1.3688879454113936, 1e-12);
  EXPECT_DOUBLE_EQ(yarn_softmax_mscale(cfg), 1.0);
  // Disabled: plain frequencies, no factors.
  cfg.rope_scaling.enabled = false;
  EXPECT_NEAR(rope_inv_freq(cfg)[31].item<double>(), std::pow(10000.0, -62.0 / 64.0), 1e-9);
  EXPECT_DOUBLE_EQ(rope_attention_factor(cfg), 1.0);
  EXPECT_DOUBLE_EQ(yarn_softmax_mscale(cfg), 1.0);
}

TEST_F(RopeTest, YarnMatchesTheFormulasOfAlgorithmsMd) {
  // algorithms.md §4 (official precompute_freqs_cis) with DeepSeek-V3's values: d = 64,
  // θ = 1e4, s = 40, original length 4096, β_fast 32, β_slow 1; computed here in plain
  // doubles, independently of rope.cpp.
  const int64_t d = 64;
  const double theta = 10000.0, s = 40.0, beta_fast = 32.0, beta_slow = 1.0;
  const int64_t original = 4096;
  const double kPi = 3.14159265358979323846;
  auto correction_dim = [&](double rotations) {
    return d * std::log(original / (rotations * 2 * kPi)) / (2 * std::log(theta));
  };
  const double low = std::max(std::floor(correction_dim(beta_fast)), 0.0);
  const double high = std::min(std::ceil(correction_dim(beta_slow)), static_cast<double>(d - 1));
  EXPECT_EQ(low, 10.0);  // 64·ln(4096/(64π))/(2 ln 1e4) = 10.47
  EXPECT_EQ(high, 23.0);  // 64·ln(4096/(2π))/(2 ln 1e4) = 22.50

  ModelConfig cfg = rope_config(d);
  cfg.rope_theta = theta;
  cfg.rope_scaling.enabled = true;
  cfg.rope_scaling.factor = s;
  cfg.rope_scaling.original_max_position_embeddings = original;
  cfg.rope_scaling.beta_fast = beta_fast;
  cfg.rope_scaling.beta_slow = beta_slow;
  cfg.rope_scaling.mscale = 1.0;
  cfg.rope_scaling.mscale_all_dim = 1.0;
  const torch::Tensor inv = rope_inv_freq(cfg, torch::kDouble);
  ASSERT_EQ(inv.size(0), d / 2);
  for (int64_t i = 0; i < d / 2; ++i) {
    const double freq = std::pow(theta, -2.0 * static_cast<double>(i) / d);
    const double ramp = std::min(std::max((static_cast<double>(i) - low) / (high - low), 0.0), 1.0);
    const double smooth = 1.0 - ramp;  // 1: keep the original frequency, 0: interpolate (÷ s)
    const double expected = freq / s * (1.0 - smooth) + freq * smooth;
    EXPECT_NEAR(inv[i].item<double>() / expected, 1.0, 1e-12) << "i = " << i;
  }
  // High frequencies (i <= low) untouched, low ones (i >= high) divided by s.
  EXPECT_NEAR(inv[5].item<double>(), std::pow(theta, -10.0 / 64), 1e-15);
  EXPECT_NEAR(inv[31].item<double>(), std::pow(theta, -62.0 / 64) / s, 1e-15);

  // √t = 0.1·ln s + 1 (§1.5 / §4): softmax scale × mscale² = 1.3689² ≈ 1.874, and no
  // cos/sin factor when mscale == mscale_all_dim.
  const double mscale = 0.1 * std::log(s) + 1.0;
  EXPECT_NEAR(mscale, 1.3689, 1e-4);
  EXPECT_NEAR(yarn_softmax_mscale(cfg), mscale * mscale, 1e-12);
  EXPECT_NEAR(yarn_softmax_mscale(cfg), 1.874, 1e-3);
  EXPECT_DOUBLE_EQ(rope_attention_factor(cfg), 1.0);
  // DeepSeek-V2-Lite's mscale 0.707 (config_16B.json) on cos/sin: mscale(s, 0.707) / mscale(s, 1).
  cfg.rope_scaling.mscale = 0.707;
  EXPECT_NEAR(rope_attention_factor(cfg), (0.1 * 0.707 * std::log(s) + 1.0) / mscale, 1e-12);
  // The tables carry the factor: cos(0) = factor at position 0.
  RotaryEmbedding rope(cfg);
  EXPECT_NEAR(rope.tables(3, torch::kCPU, torch::kDouble).cos[0][0].item<double>(), rope_attention_factor(cfg), 1e-15);
}
