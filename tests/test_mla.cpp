// MLA: the scaled_dot_product_attention path equals the explicit-softmax reference
// (outputs and gradients), with and without query compression; causality; names.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>

#include "models/mla.h"

using namespace moetrain;

// Single-threaded and seeded: the tensors are tiny, and intra-op threads only
// contend with the tests CTest runs beside these (2 threads on a loaded 2-core
// machine made the debug step 5-30x slower).
class MLATest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

ModelConfig mla_config(int64_t q_lora_rank) {
  ModelConfig cfg;  // debug shape: D 256, 8 heads, kv_lora 64, nope 32, rope 16, v 32
  cfg.q_lora_rank = q_lora_rank;
  cfg.init_std = 0.05;  // larger than 0.006 so the attention pattern is far from uniform
  return cfg;
}

void check_sdpa_matches_reference(int64_t q_lora_rank) {
  torch::manual_seed(0);
  const ModelConfig cfg = mla_config(q_lora_rank);
  MLA attn(cfg);
  attn->to(torch::kDouble);
  RotaryEmbedding rope(cfg);
  const int64_t B = 2, T = 12;
  const RopeTables tables = rope.tables(T, torch::kCPU, torch::kDouble);
  const torch::Tensor x = torch::randn({B, T, cfg.hidden_size}, torch::kDouble).requires_grad_(true);

  const torch::Tensor y = attn->forward(x, tables);
  ASSERT_EQ(y.sizes(), x.sizes());
  const torch::Tensor probe = torch::randn_like(y);
  const auto grads = torch::autograd::grad({(y * probe).sum()}, {x, attn->wkv_b->weight, attn->wkv_a->weight});

  const torch::Tensor y_ref = attn->forward_reference(x, tables);
  const auto grads_ref =
      torch::autograd::grad({(y_ref * probe).sum()}, {x, attn->wkv_b->weight, attn->wkv_a->weight});

  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-10, 1e-12)) << (y - y_ref).abs().max();
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(grads[i], grads_ref[i], 1e-9, 1e-12)) << i << ": " << (grads[i] - grads_ref[i]).abs().max();
  }
}

}  // namespace

TEST_F(MLATest, SdpaMatchesReferenceNoQueryCompression) { check_sdpa_matches_reference(0); }

TEST_F(MLATest, SdpaMatchesReferenceWithQueryCompression) { check_sdpa_matches_reference(48); }

TEST_F(MLATest, SdpaMatchesReferenceFp32) {
  torch::manual_seed(1);
  const ModelConfig cfg = mla_config(32);
  MLA attn(cfg);
  RotaryEmbedding rope(cfg);
  const RopeTables tables = rope.tables(9, torch::kCPU, torch::kFloat);
  const torch::Tensor x = torch::randn({3, 9, cfg.hidden_size});
  const torch::Tensor y = attn->forward(x, tables), y_ref = attn->forward_reference(x, tables);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-4, 1e-6)) << (y - y_ref).abs().max();
}

TEST_F(MLATest, Causal) {
  torch::manual_seed(2);
  const ModelConfig cfg = mla_config(0);
  MLA attn(cfg);
  attn->to(torch::kDouble);
  RotaryEmbedding rope(cfg);
  const RopeTables tables = rope.tables(8, torch::kCPU, torch::kDouble);
  torch::Tensor x = torch::randn({1, 8, cfg.hidden_size}, torch::kDouble);
  const torch::Tensor y = attn->forward(x, tables);
  x.select(1, 7).add_(1.0);  // change only the last token
  const torch::Tensor y2 = attn->forward(x, tables);
  EXPECT_TRUE(torch::allclose(y.narrow(1, 0, 7), y2.narrow(1, 0, 7), 0, 1e-14));
  EXPECT_FALSE(torch::allclose(y.select(1, 7), y2.select(1, 7)));
}

TEST_F(MLATest, ParameterNamesAndShapes) {
  for (int64_t q_lora : {0, 48}) {
    const ModelConfig cfg = mla_config(q_lora);
    MLA attn(cfg);
    const int64_t D = cfg.hidden_size, H = cfg.num_attention_heads, qk = cfg.qk_head_dim();
    std::map<std::string, std::vector<int64_t>> expected = {
        {"wkv_a.weight", {cfg.kv_lora_rank + cfg.qk_rope_head_dim, D}},
        {"kv_norm.weight", {cfg.kv_lora_rank}},
        {"wkv_b.weight", {H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank}},
        {"wo.weight", {D, H * cfg.v_head_dim}}};
    if (q_lora == 0) {
      expected["wq.weight"] = {H * qk, D};
    } else {
      expected["wq_a.weight"] = {q_lora, D};
      expected["q_norm.weight"] = {q_lora};
      expected["wq_b.weight"] = {H * qk, q_lora};
    }
    const auto params = attn->named_parameters();
    EXPECT_EQ(params.size(), expected.size());
    for (const auto& [name, shape] : expected) {
      ASSERT_TRUE(params.contains(name)) << name;
      EXPECT_EQ(params[name].sizes().vec(), shape) << name;
    }
    EXPECT_EQ(attn->buffers().size(), 0u);  // no RoPE tables as buffers
  }
}
