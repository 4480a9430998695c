// Analytic parameter counts against the published figures (algorithms.md §1.4)
// and the bench config's numbers (gpu.md).
#include <gtest/gtest.h>

#include "models/params.h"
#include "test_paths.h"
#include "trainer/experiment_config.h"

using namespace moetrain;

namespace {

ExperimentConfig load(const char* name) {
  return load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/" + name + ".yaml");
}

TEST(Params, DeepSeekV3_671B) {
  ExperimentConfig c = load("deepseek-v3-671b");
  ParamCounts p = count_params(c.model, c.train.seq_len);
  EXPECT_NEAR(static_cast<double>(p.total), 671.0e9, 0.5e9);
  EXPECT_NEAR(static_cast<double>(p.active), 37.5e9, 0.3e9);                 // incl. the input embedding
  EXPECT_NEAR(static_cast<double>(p.active - p.embedding), 36.6e9, 0.3e9);   // the paper's "37B"
  EXPECT_NEAR(static_cast<double>(p.mtp), 11.5e9, 0.2e9);                    // README_WEIGHTS: 11.5B unique
  EXPECT_EQ(p.embedding, 129280LL * 7168LL);
}

TEST(Params, Bench1B) {
  ExperimentConfig c = load("bench-1b");
  ParamCounts p = count_params(c.model, c.train.seq_len);
  EXPECT_NEAR(static_cast<double>(p.total), 1256.6e6, 0.05e6);
  EXPECT_NEAR(static_cast<double>(p.flop_params), 219.5e6, 0.5e6);
  EXPECT_NEAR(p.flops_per_token / 1e9, 1.69, 0.01);
  EXPECT_EQ(p.mtp, 0);
}

TEST(Params, FlopsFormula) {
  ModelConfig m;  // debug shape
  ParamCounts p = count_params(m, 64);
  double attention = 6.0 * m.num_hidden_layers * m.num_attention_heads * (m.qk_head_dim() + m.v_head_dim) * 64;
  EXPECT_DOUBLE_EQ(p.flops_per_token, 6.0 * p.flop_params + attention);
  EXPECT_LT(p.flop_params, p.active - p.embedding);  // norms are not matmul weights
}

TEST(Params, QueryCompressionChangesOnlyAttention) {
  ModelConfig a, b;
  b.q_lora_rank = 32;
  ParamCounts pa = count_params(a, 64), pb = count_params(b, 64);
  int64_t h = a.num_attention_heads, d = a.hidden_size, qk = a.qk_head_dim();
  EXPECT_EQ(pb.total - pa.total, a.num_hidden_layers * ((d * 32 + 32 + 32 * h * qk) - d * h * qk));
}

}  // namespace
