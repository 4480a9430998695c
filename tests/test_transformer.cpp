// Transformer: the tensor-name contract, parameter counts against count_params,
// init, forward outputs, the chunked LM-head loss (vs full logits and finite
// differences), and the debug model's forward + backward time on CPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>

#include "models/lm_loss.h"
#include "models/params.h"
#include "models/transformer.h"

using namespace moetrain;

// Single-threaded and seeded: the tensors are tiny, and intra-op threads only
// contend with the tests CTest runs beside these (2 threads on a loaded 2-core
// machine made the debug step 5-30x slower).
class TransformerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

class LmHeadLossTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

using Shapes = std::map<std::string, std::vector<int64_t>>;

// docs/model-contract.md, spelled out for one config.
Shapes contract_shapes(const ModelConfig& c) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, V = c.vocab_size, E = c.n_routed_experts;
  const int64_t I = c.moe_intermediate_size, F = c.intermediate_size, S = c.n_shared_experts * I;
  Shapes s = {{"embed.weight", {V, D}}, {"norm.weight", {D}}, {"head.weight", {V, D}}};
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    s[p + "attn_norm.weight"] = {D};
    s[p + "ffn_norm.weight"] = {D};
    if (c.q_lora_rank == 0) {
      s[p + "attn.wq.weight"] = {H * c.qk_head_dim(), D};
    } else {
      s[p + "attn.wq_a.weight"] = {c.q_lora_rank, D};
      s[p + "attn.q_norm.weight"] = {c.q_lora_rank};
      s[p + "attn.wq_b.weight"] = {H * c.qk_head_dim(), c.q_lora_rank};
    }
    s[p + "attn.wkv_a.weight"] = {c.kv_lora_rank + c.qk_rope_head_dim, D};
    s[p + "attn.kv_norm.weight"] = {c.kv_lora_rank};
    s[p + "attn.wkv_b.weight"] = {H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank};
    s[p + "attn.wo.weight"] = {D, H * c.v_head_dim};
    if (c.is_moe_layer(i)) {
      s[p + "ffn.gate.weight"] = {E, D};
      s[p + "ffn.experts.w13"] = {E, 2 * I, D};
      s[p + "ffn.experts.w2"] = {E, D, I};
      if (S > 0) {
        s[p + "ffn.shared_experts.w1.weight"] = {S, D};
        s[p + "ffn.shared_experts.w3.weight"] = {S, D};
        s[p + "ffn.shared_experts.w2.weight"] = {D, S};
      }
    } else {
      s[p + "ffn.w1.weight"] = {F, D};
      s[p + "ffn.w3.weight"] = {F, D};
      s[p + "ffn.w2.weight"] = {D, F};
    }
  }
  return s;
}

std::vector<ModelConfig> test_configs() {
  std::vector<ModelConfig> out(5);  // [0]: the debug defaults
  out[1].q_lora_rank = 48;
  out[1].n_group = 4;
  out[1].topk_group = 2;
  out[2].n_shared_experts = 0;
  out[2].first_k_dense_replace = 0;
  out[3].first_k_dense_replace = out[3].num_hidden_layers;  // all dense
  out[4].num_hidden_layers = 3;
  out[4].hidden_size = 64;
  out[4].num_attention_heads = 4;
  out[4].n_routed_experts = 16;
  out[4].num_experts_per_tok = 6;
  out[4].n_shared_experts = 1;
  out[4].vocab_size = 300;
  return out;
}

}  // namespace

TEST_F(TransformerTest, NamesAndShapesFollowTheContract) {
  for (const ModelConfig& cfg : test_configs()) {
    Transformer model(cfg);
    const Shapes expected = contract_shapes(cfg);
    const auto params = model->named_parameters();
    EXPECT_EQ(params.size(), expected.size());
    for (const auto& [name, shape] : expected) {
      ASSERT_TRUE(params.contains(name)) << name;
      EXPECT_EQ(params[name].sizes().vec(), shape) << name;
    }
    // The only buffers are the routers' fp32 biases.
    const auto buffers = model->named_buffers();
    EXPECT_EQ(static_cast<int64_t>(buffers.size()), cfg.num_moe_layers());
    for (int64_t i = cfg.first_k_dense_replace; i < cfg.num_hidden_layers; ++i) {
      const std::string name = "layers." + std::to_string(i) + ".ffn.gate.bias";
      ASSERT_TRUE(buffers.contains(name)) << name;
      EXPECT_EQ(buffers[name].scalar_type(), torch::kFloat);
      EXPECT_EQ(buffers[name].sizes().vec(), std::vector<int64_t>{cfg.n_routed_experts});
    }
    EXPECT_EQ(static_cast<int64_t>(model->routers().size()), cfg.num_moe_layers());
  }
}

TEST_F(TransformerTest, ParameterCountMatchesCountParams) {
  for (const ModelConfig& cfg : test_configs()) {
    Transformer model(cfg);
    int64_t total = 0;
    for (const auto& p : model->parameters()) total += p.numel();
    const ParamCounts counts = count_params(cfg, 128);
    EXPECT_EQ(total, counts.total);
    int64_t bias = 0;
    for (const auto& b : model->buffers()) bias += b.numel();
    EXPECT_EQ(bias, counts.router_bias);
  }
}

TEST_F(TransformerTest, Init) {
  torch::manual_seed(0);
  ModelConfig cfg;
  cfg.init_std = 0.02;
  Transformer model(cfg);
  for (const auto& item : model->named_parameters()) {
    const torch::Tensor& p = item.value();
    if (p.dim() == 1) {
      EXPECT_TRUE(torch::equal(p, torch::ones_like(p))) << item.key();  // norms
    } else if (p.numel() > 4096) {
      EXPECT_NEAR(p.std().item<double>(), 0.02, 0.002) << item.key();
      EXPECT_NEAR(p.mean().item<double>(), 0.0, 0.002) << item.key();
    }
  }
  for (const auto& b : model->buffers()) EXPECT_EQ(b.abs().max().item<double>(), 0.0);
}

TEST_F(TransformerTest, ForwardOutputs) {
  torch::manual_seed(1);
  ModelConfig cfg = test_configs()[1];
  Transformer model(cfg);
  const int64_t B = 2, T = 10;
  const torch::Tensor tokens = torch::randint(cfg.vocab_size, {B, T}, torch::kLong);
  const ForwardOut out = model(tokens);
  EXPECT_EQ(out.hidden.sizes(), (std::vector<int64_t>{B, T, cfg.hidden_size}));
  ASSERT_EQ(static_cast<int64_t>(out.routing.size()), cfg.num_moe_layers());
  for (const RoutingStats& r : out.routing) {
    EXPECT_EQ(r.topk_idx.sizes(), (std::vector<int64_t>{B * T, cfg.num_experts_per_tok}));
    EXPECT_EQ(r.scores.sizes(), (std::vector<int64_t>{B * T, cfg.n_routed_experts}));
    EXPECT_EQ(r.counts.sum().item<int64_t>(), B * T * cfg.num_experts_per_tok);
  }
  EXPECT_EQ(model->logits(out.hidden).sizes(), (std::vector<int64_t>{B, T, cfg.vocab_size}));
  // Causal end to end: a change at the last position leaves earlier hidden states alone
  // (in fp64: not bitwise, as the changed token's routing changes the experts' row counts).
  model->to(torch::kDouble);
  const torch::Tensor h1 = model(tokens).hidden;
  torch::Tensor changed = tokens.clone();
  changed[0][T - 1] = (tokens[0][T - 1].item<int64_t>() + 1) % cfg.vocab_size;
  const torch::Tensor h2 = model(changed).hidden;
  EXPECT_LT((h1[0].narrow(0, 0, T - 1) - h2[0].narrow(0, 0, T - 1)).abs().max().item<double>(), 1e-12);
  EXPECT_GT((h1[0][T - 1] - h2[0][T - 1]).abs().max().item<double>(), 1e-3);
  EXPECT_LT((h1[1] - h2[1]).abs().max().item<double>(), 1e-12);
}

TEST_F(LmHeadLossTest, ChunkedMatchesFullLogits) {
  torch::manual_seed(2);
  ModelConfig cfg = test_configs()[4];
  Transformer model(cfg);
  const torch::Tensor hidden = torch::randn({3, 7, cfg.hidden_size}, torch::requires_grad());
  torch::Tensor targets = torch::randint(cfg.vocab_size, {3, 7}, torch::kLong);
  targets[1][2] = kIgnoreIndex;
  const torch::Tensor w = model->head->weight;

  const torch::Tensor full = torch::nn::functional::cross_entropy(model->logits(hidden).view({21, -1}),
                                                                  targets.view({21}));
  const auto g_full = torch::autograd::grad({full}, {hidden, w});
  for (int64_t chunk : {0, 1, 5, 21, 64}) {
    const torch::Tensor loss = lm_head_loss(model, hidden, targets, chunk);
    EXPECT_NEAR(loss.item<double>(), full.item<double>(), 1e-5) << chunk;
    const auto g = torch::autograd::grad({loss}, {hidden, w});
    EXPECT_TRUE(torch::allclose(g[0], g_full[0], 1e-4, 1e-6)) << chunk;
    EXPECT_TRUE(torch::allclose(g[1], g_full[1], 1e-4, 1e-6)) << chunk;
  }
}

TEST_F(LmHeadLossTest, GradcheckFp64) {
  // Finite differences on the custom autograd function (chunks of 4 rows, 10 rows).
  torch::manual_seed(3);
  const torch::Tensor hidden = torch::randn({10, 5}, torch::kDouble).requires_grad_(true);
  const torch::Tensor weight = torch::randn({7, 5}, torch::kDouble).requires_grad_(true);
  torch::Tensor targets = torch::randint(7, {10}, torch::kLong);
  targets[3] = kIgnoreIndex;
  const auto loss_of = [&] { return chunked_cross_entropy(hidden, weight, targets, 4); };
  const auto analytic = torch::autograd::grad({loss_of() * 1.7}, {hidden, weight});
  const double eps = 1e-6;
  torch::NoGradGuard no_grad;
  for (int which = 0; which < 2; ++which) {
    const torch::Tensor& p = which == 0 ? hidden : weight;
    torch::Tensor flat = p.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const double orig = flat[i].item<double>();
      flat[i] = orig + eps;
      const double up = loss_of().item<double>();
      flat[i] = orig - eps;
      const double down = loss_of().item<double>();
      flat[i] = orig;
      const double numeric = 1.7 * (up - down) / (2 * eps);
      EXPECT_NEAR(analytic[which].view({-1})[i].item<double>(), numeric, 1e-8) << which << "[" << i << "]";
    }
  }
  // The ignored row contributes no gradient.
  EXPECT_EQ(analytic[0][3].abs().max().item<double>(), 0.0);
}

TEST_F(TransformerTest, DebugModelForwardBackwardTime) {
  torch::manual_seed(4);
  const ModelConfig cfg;  // the debug shape
  Transformer model(cfg);
  const int64_t B = 4, T = 64;
  const torch::Tensor tokens = torch::randint(cfg.vocab_size, {B, T + 1}, torch::kLong);
  const torch::Tensor x = tokens.narrow(1, 0, T), y = tokens.narrow(1, 1, T);
  const auto step = [&] {
    model->zero_grad();
    const ForwardOut out = model(x);
    const torch::Tensor loss = lm_head_loss(model, out.hidden, y, 128);
    loss.backward();
    return loss.item<double>();
  };
  step();  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  const double loss = step();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("debug model (B=%ld, T=%ld) forward+backward: %.1f ms, loss %.4f\n", static_cast<long>(B),
              static_cast<long>(T), ms, loss);
  EXPECT_NEAR(loss, std::log(static_cast<double>(cfg.vocab_size)), 0.1);  // small init: near uniform
  EXPECT_LT(ms, 5000.0);
  for (const auto& item : model->named_parameters()) {
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
  }
  for (const auto& b : model->buffers()) EXPECT_FALSE(b.grad().defined());
}

TEST_F(TransformerTest, Bf16Forward) {
  torch::manual_seed(5);
  ModelConfig cfg = test_configs()[4];
  Transformer model(cfg);
  model->to(torch::kBFloat16);
  for (const auto& b : model->buffers()) EXPECT_EQ(b.scalar_type(), torch::kFloat);
  const ForwardOut out = model(torch::randint(cfg.vocab_size, {2, 8}, torch::kLong));
  EXPECT_EQ(out.hidden.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::isfinite(out.hidden).all().item<bool>());
  const torch::Tensor loss = lm_head_loss(model, out.hidden, torch::randint(cfg.vocab_size, {2, 8}, torch::kLong), 5);
  EXPECT_EQ(loss.scalar_type(), torch::kFloat);
  loss.backward();
  EXPECT_EQ(model->head->weight.grad().scalar_type(), torch::kBFloat16);
}
