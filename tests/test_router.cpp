// Router: bias selects but never weighs, gets no gradient and stays fp32;
// group-limited routing on hand examples; normalization, scaling, softmax, counts.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <set>
#include <vector>

#include "models/moe.h"
#include "models/router.h"

using namespace moetrain;

// Single-threaded and seeded: the tensors are tiny, and intra-op threads only
// contend with the tests CTest runs beside these (2 threads on a loaded 2-core
// machine made the debug step 5-30x slower).
class RouterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

ModelConfig router_config(int64_t experts, int64_t k, int64_t n_group = 1, int64_t topk_group = 1) {
  ModelConfig cfg;
  cfg.hidden_size = 16;
  cfg.n_routed_experts = experts;
  cfg.num_experts_per_tok = k;
  cfg.n_group = n_group;
  cfg.topk_group = topk_group;
  cfg.init_std = 0.5;
  return cfg;
}

// A router whose logits are the input itself (D = E, W = I), so the sigmoid scores
// of a token are exactly `scores` when x = logit(scores).
RoutingStats route_scores(Router& router, const std::vector<double>& scores, const std::vector<double>& bias) {
  const int64_t E = router->n_experts;
  {
    torch::NoGradGuard no_grad;
    router->weight.set_data(torch::eye(E));
    router->bias.copy_(torch::tensor(bias, torch::kFloat));
  }
  const torch::Tensor s = torch::tensor(scores, torch::kFloat).view({1, E});
  return router(torch::log(s / (1 - s)));
}

std::set<int64_t> as_set(const torch::Tensor& idx_row) {
  std::set<int64_t> out;
  for (int64_t i = 0; i < idx_row.size(0); ++i) out.insert(idx_row[i].item<int64_t>());
  return out;
}

}  // namespace

TEST_F(RouterTest, BiasChangesSelectionNotGateValues) {
  torch::manual_seed(0);
  ModelConfig cfg = router_config(8, 2);
  cfg.norm_topk_prob = false;
  Router router(cfg);
  const torch::Tensor x = torch::randn({64, cfg.hidden_size});
  const RoutingStats plain = router(x);

  // A large bias on expert 7 puts it in every token's top-2 ...
  {
    torch::NoGradGuard no_grad;
    router->bias[7] = 10.0;
  }
  const RoutingStats biased = router(x);
  EXPECT_TRUE((biased.topk_idx == 7).any(1).all().item<bool>());
  EXPECT_FALSE(torch::equal(plain.topk_idx, biased.topk_idx));
  // ... yet its gate value is the unbiased sigmoid score, not score + 10.
  EXPECT_TRUE(torch::allclose(biased.topk_weight, biased.scores.gather(1, biased.topk_idx)));
  EXPECT_TRUE((biased.topk_weight < 1.0).all().item<bool>());
  EXPECT_TRUE(torch::equal(biased.scores, plain.scores));

  // A bias that keeps the choice (the same shift for all experts) changes nothing.
  {
    torch::NoGradGuard no_grad;
    router->bias.fill_(0.3);
  }
  const RoutingStats shifted = router(x);
  EXPECT_TRUE(torch::equal(shifted.topk_idx, plain.topk_idx));
  EXPECT_TRUE(torch::equal(shifted.topk_weight, plain.topk_weight));
}

TEST_F(RouterTest, BiasGetsNoGradient) {
  torch::manual_seed(1);
  Router router(router_config(8, 3, 4, 2));
  {
    torch::NoGradGuard no_grad;
    router->bias.uniform_(-0.1, 0.1);
  }
  EXPECT_FALSE(router->bias.requires_grad());
  const auto buffers = router->named_buffers();
  ASSERT_TRUE(buffers.contains("bias"));
  EXPECT_FALSE(router->named_parameters().contains("bias"));

  const torch::Tensor x = torch::randn({32, 16}, torch::requires_grad());
  const RoutingStats r = router(x);
  (r.topk_weight.sum() + r.scores.pow(2).sum() + r.logits.logsumexp(-1).pow(2).mean()).backward();
  EXPECT_FALSE(router->bias.grad().defined());
  ASSERT_TRUE(router->weight.grad().defined());
  EXPECT_GT(router->weight.grad().abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(r.counts.requires_grad());
  EXPECT_FALSE(r.topk_idx.requires_grad());
}

TEST_F(RouterTest, GroupLimitedHandExample) {
  // 8 experts in 4 groups {0,1} {2,3} {4,5} {6,7}; biased scores (s + b):
  //   0.9 -0.8 | 0.5 0.4 | 0.6 -0.9 | 0.3 0.35   -> group top-2 sums 0.1, 0.9, -0.3, 0.65
  // topk_group 2 keeps groups 1 and 3; top-2 of {2,3,6,7} = {2, 3}.
  // Without groups the top-2 would be {0, 4}.
  const std::vector<double> s = {0.9, 0.2, 0.5, 0.4, 0.6, 0.1, 0.3, 0.35};
  const std::vector<double> b = {0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0};
  {
    ModelConfig cfg = router_config(8, 2, 4, 2);
    Router router(cfg);
    const RoutingStats r = route_scores(router, s, b);
    EXPECT_EQ(as_set(r.topk_idx[0]), (std::set<int64_t>{2, 3}));
    // norm_topk_prob: unbiased 0.5 and 0.4 normalized.
    const auto w = r.topk_weight[0];
    const int64_t first = r.topk_idx[0][0].item<int64_t>();
    EXPECT_NEAR(w[0].item<double>(), (first == 2 ? 0.5 : 0.4) / 0.9, 1e-6);
    EXPECT_NEAR(w.sum().item<double>(), 1.0, 1e-6);
  }
  {
    Router router(router_config(8, 2, 1, 1));
    EXPECT_EQ(as_set(route_scores(router, s, b).topk_idx[0]), (std::set<int64_t>{0, 4}));
  }
  // Masked groups are -inf, not 0: keep one group {2, 3} whose second expert has a
  // NEGATIVE biased score (0.45 - 0.5); it is still chosen over masked experts.
  //   0.9 -0.8 | 0.5 -0.05 | 0.2 -0.9 | 0.1 0.2   -> sums 0.1, 0.45, -0.7, 0.3
  {
    Router router(router_config(8, 2, 4, 1));
    const RoutingStats r = route_scores(router, {0.9, 0.2, 0.5, 0.45, 0.2, 0.1, 0.1, 0.2},
                                        {0.0, -1.0, 0.0, -0.5, 0.0, -1.0, 0.0, 0.0});
    EXPECT_EQ(as_set(r.topk_idx[0]), (std::set<int64_t>{2, 3}));
    EXPECT_NEAR(r.topk_weight[0].sum().item<double>(), 1.0, 1e-6);
  }
}

TEST_F(RouterTest, NormalizationAndScaling) {
  torch::manual_seed(2);
  ModelConfig cfg = router_config(16, 4, 4, 2);
  cfg.routed_scaling_factor = 2.5;
  const torch::Tensor x = torch::randn({40, cfg.hidden_size});
  cfg.norm_topk_prob = true;
  Router normed(cfg);
  const RoutingStats a = normed(x);
  EXPECT_TRUE(torch::allclose(a.topk_weight.sum(-1), torch::full({40}, 2.5), 1e-5, 1e-6));
  const torch::Tensor picked = a.scores.gather(1, a.topk_idx);
  EXPECT_TRUE(torch::allclose(a.topk_weight, 2.5 * picked / picked.sum(-1, true), 1e-5, 1e-7));

  cfg.norm_topk_prob = false;
  Router raw(cfg);
  {
    torch::NoGradGuard no_grad;
    raw->weight.copy_(normed->weight);
  }
  const RoutingStats b = raw(x);
  EXPECT_TRUE(torch::equal(b.topk_idx, a.topk_idx));
  EXPECT_TRUE(torch::allclose(b.topk_weight, 2.5 * torch::sigmoid(b.logits).gather(1, b.topk_idx)));
}

TEST_F(RouterTest, SoftmaxScoring) {
  torch::manual_seed(3);
  ModelConfig cfg = router_config(8, 2);
  cfg.scoring_func = ScoringFunc::kSoftmax;
  cfg.norm_topk_prob = false;
  Router router(cfg);
  const torch::Tensor x = torch::randn({20, cfg.hidden_size});
  const RoutingStats r = router(x);
  EXPECT_TRUE(torch::allclose(r.scores.sum(-1), torch::ones({20})));
  EXPECT_TRUE(torch::allclose(r.scores, torch::softmax(r.logits, -1)));
  EXPECT_TRUE(torch::equal(r.topk_idx, std::get<1>(r.scores.topk(2, -1))));
  EXPECT_TRUE(torch::allclose(r.topk_weight, std::get<0>(r.scores.topk(2, -1))));
}

TEST_F(RouterTest, CountsAreBincountOfChoices) {
  torch::manual_seed(4);
  Router router(router_config(16, 3, 4, 3));
  {
    torch::NoGradGuard no_grad;
    router->bias.uniform_(-0.2, 0.2);
  }
  const RoutingStats r = router(torch::randn({100, 16}));
  EXPECT_EQ(r.topk_idx.sizes(), (std::vector<int64_t>{100, 3}));
  EXPECT_EQ(r.topk_idx.scalar_type(), torch::kLong);
  EXPECT_EQ(r.counts.scalar_type(), torch::kLong);
  EXPECT_TRUE(torch::equal(r.counts, torch::bincount(r.topk_idx.flatten(), {}, 16)));
  EXPECT_EQ(r.counts.sum().item<int64_t>(), 300);
  // Every token's K experts are distinct.
  const torch::Tensor sorted = std::get<0>(r.topk_idx.sort(1));
  EXPECT_TRUE((sorted.narrow(1, 1, 2) != sorted.narrow(1, 0, 2)).all().item<bool>());
}

TEST_F(RouterTest, BiasStaysFp32UnderModuleCasts) {
  ModelConfig cfg = router_config(8, 2);
  MoE moe(cfg);  // the router inside a parent: casts reach it through the parent
  {
    torch::NoGradGuard no_grad;
    moe->gate->bias.fill_(0.1234567);  // not representable in bf16
  }
  const torch::Tensor before = moe->gate->bias.clone();
  moe->to(torch::kBFloat16);
  EXPECT_EQ(moe->gate->weight.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(moe->experts->w13.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(moe->gate->bias.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(moe->gate->bias, before));
  moe->to(torch::kCPU, torch::kDouble);
  EXPECT_EQ(moe->gate->weight.scalar_type(), torch::kDouble);
  EXPECT_EQ(moe->gate->bias.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(moe->gate->bias, before));
  // bf16 inputs still route in fp32.
  moe->to(torch::kBFloat16);
  const RoutingStats r = moe->gate(torch::randn({4, 16}).to(torch::kBFloat16));
  EXPECT_EQ(r.scores.scalar_type(), torch::kFloat);
  EXPECT_EQ(r.topk_weight.scalar_type(), torch::kFloat);
}
