// MoE: the sort -> grouped GEMM -> scatter path equals the per-expert loop
// (outputs and gradients), including experts that receive no token.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "models/moe.h"
#include "models/swiglu.h"

using namespace moetrain;

// Single-threaded and seeded: the tensors are tiny, and intra-op threads only
// contend with the tests CTest runs beside these (2 threads on a loaded 2-core
// machine made the debug step 5-30x slower).
class MoETest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

ModelConfig moe_config() {
  ModelConfig cfg;
  cfg.hidden_size = 16;
  cfg.moe_intermediate_size = 12;
  cfg.n_routed_experts = 8;
  cfg.num_experts_per_tok = 3;
  cfg.n_shared_experts = 2;
  cfg.n_group = 4;
  cfg.topk_group = 3;
  cfg.routed_scaling_factor = 2.5;
  cfg.init_std = 0.2;
  return cfg;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST_F(MoETest, SortByExpertIsStableAndCounted) {
  const torch::Tensor topk_idx = torch::tensor({2, 0, 1, 2, 0, 3}, torch::kLong).view({3, 2});
  const torch::Tensor counts = torch::bincount(topk_idx.flatten(), {}, 5);
  const ExpertPermutation p = moe_sort_by_expert(topk_idx, counts);
  // flat pairs: (t0: 2, 0) (t1: 1, 2) (t2: 0, 3) -> expert 0: flat 1, 4; expert 1: 2; expert 2: 0, 3; expert 3: 5
  EXPECT_TRUE(torch::equal(p.order, torch::tensor({1, 4, 2, 0, 3, 5}, torch::kLong)));
  EXPECT_TRUE(torch::equal(p.token_idx, torch::tensor({0, 2, 1, 0, 1, 2}, torch::kLong)));
  const torch::Tensor x = torch::arange(3, torch::kDouble).unsqueeze(1).expand({3, 4});
  EXPECT_TRUE(torch::equal(moe_permute(x, p).select(1, 0), p.token_idx.to(torch::kDouble)));
  // unpermute with unit weights of the identity "experts" gives K·x.
  const torch::Tensor back = moe_unpermute(moe_permute(x, p), p, torch::ones({3, 2}, torch::kDouble), 3);
  EXPECT_TRUE(torch::allclose(back, 2 * x));
  // no weights (the gates applied inside the experts): the plain sum
  EXPECT_TRUE(torch::allclose(moe_unpermute(moe_permute(x, p), p, torch::Tensor(), 3), 2 * x));
}

TEST_F(MoETest, GroupedMatchesLoopOutputsAndGradients) {
  torch::manual_seed(0);
  const ModelConfig cfg = moe_config();
  MoE moe(cfg);
  moe->to(torch::kDouble);
  {
    // Experts 5 and 6 never win: they receive no tokens.
    torch::NoGradGuard no_grad;
    moe->gate->bias[5] = -10.0;
    moe->gate->bias[6] = -10.0;
  }
  const int64_t N = 40;
  const torch::Tensor x = torch::randn({N, cfg.hidden_size}, torch::kDouble).requires_grad_(true);
  const torch::Tensor probe = torch::randn({N, cfg.hidden_size}, torch::kDouble);
  GroupedExpertsImpl& ex = *moe->experts;
  const std::vector<torch::Tensor> wrt = {x, ex.w13, ex.w2, moe->gate->weight};

  const RoutingStats r = moe->gate(x);
  ASSERT_EQ(r.counts[5].item<int64_t>(), 0);
  ASSERT_EQ(r.counts[6].item<int64_t>(), 0);
  ASSERT_GT(r.counts.gt(0).sum().item<int64_t>(), 4);
  const torch::Tensor y = moe_routed_experts(ex, x, r.topk_idx, r.topk_weight, r.counts);
  const auto g = torch::autograd::grad({(y * probe).sum()}, wrt);

  const RoutingStats r2 = moe->gate(x);
  const torch::Tensor y_ref = moe_experts_reference(ex, x, r2.topk_idx, r2.topk_weight);
  const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, wrt);

  EXPECT_LT(max_diff(y, y_ref), 1e-12);
  const char* names[] = {"x", "w13", "w2", "gate.weight"};
  for (size_t i = 0; i < wrt.size(); ++i) {
    ASSERT_TRUE(g[i].defined() && g_ref[i].defined()) << names[i];
    EXPECT_LT(max_diff(g[i], g_ref[i]), 1e-12) << names[i];
    EXPECT_GT(g[i].abs().max().item<double>(), 0.0) << names[i];
  }
  // Empty experts get exactly zero gradient.
  for (int64_t e : {5, 6}) {
    EXPECT_EQ(g[1][e].abs().max().item<double>(), 0.0);
    EXPECT_EQ(g[2][e].abs().max().item<double>(), 0.0);
  }
}

TEST_F(MoETest, ModuleOutputIsRoutedPlusShared) {
  torch::manual_seed(1);
  const ModelConfig cfg = moe_config();
  MoE moe(cfg);
  moe->to(torch::kDouble);
  const torch::Tensor x = torch::randn({2, 5, cfg.hidden_size}, torch::kDouble);
  const MoEOutput out = moe(x);
  ASSERT_EQ(out.y.sizes(), x.sizes());
  const torch::Tensor flat = x.view({10, cfg.hidden_size});
  const torch::Tensor expected =
      moe_experts_reference(*moe->experts, flat, out.routing.topk_idx, out.routing.topk_weight) +
      moe->shared_experts(flat);
  EXPECT_LT(max_diff(out.y.view({10, cfg.hidden_size}), expected), 1e-12);
  EXPECT_EQ(out.routing.counts.sum().item<int64_t>(), 10 * cfg.num_experts_per_tok);

  const auto names = moe->named_parameters();
  EXPECT_EQ(names["experts.w13"].sizes().vec(), (std::vector<int64_t>{8, 24, 16}));
  EXPECT_EQ(names["experts.w2"].sizes().vec(), (std::vector<int64_t>{8, 16, 12}));
  EXPECT_EQ(names["shared_experts.w1.weight"].sizes().vec(), (std::vector<int64_t>{24, 16}));
  EXPECT_EQ(names["shared_experts.w2.weight"].sizes().vec(), (std::vector<int64_t>{16, 24}));
  EXPECT_EQ(names["gate.weight"].sizes().vec(), (std::vector<int64_t>{8, 16}));
  EXPECT_TRUE(moe->named_buffers().contains("gate.bias"));
}

TEST_F(MoETest, SwiGLUStacksGateAndUpIntoOneGemm) {
  // The module runs x @ [w1; w3]ᵀ and the packed activation; the textbook form is the twin.
  torch::manual_seed(3);
  SwiGLU mlp(16, 24, 0.1);
  mlp->to(torch::kDouble);
  const torch::Tensor x = torch::randn({2, 5, 16}, torch::kDouble).requires_grad_(true);
  const torch::Tensor probe = torch::randn({2, 5, 16}, torch::kDouble);
  const std::vector<torch::Tensor> wrt = {x, mlp->w1->weight, mlp->w2->weight, mlp->w3->weight};
  const torch::Tensor y = mlp(x);
  const auto g = torch::autograd::grad({(y * probe).sum()}, wrt);
  const torch::Tensor y_ref = torch::linear(
      torch::silu(torch::linear(x, mlp->w1->weight)) * torch::linear(x, mlp->w3->weight), mlp->w2->weight);
  const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, wrt);
  EXPECT_LT(max_diff(y, y_ref), 1e-12);
  for (size_t i = 0; i < wrt.size(); ++i) EXPECT_LT(max_diff(g[i], g_ref[i]), 1e-12) << i;
}

TEST_F(MoETest, NoSharedExperts) {
  ModelConfig cfg = moe_config();
  cfg.n_shared_experts = 0;
  MoE moe(cfg);
  EXPECT_TRUE(moe->shared_experts.is_empty());
  EXPECT_EQ(moe(torch::randn({1, 3, cfg.hidden_size})).y.sizes(), (std::vector<int64_t>{1, 3, 16}));
}

TEST_F(MoETest, Fp32MatchesFp64) {
  torch::manual_seed(2);
  const ModelConfig cfg = moe_config();
  MoE moe(cfg);
  const torch::Tensor x = torch::randn({3, 7, cfg.hidden_size});
  const torch::Tensor y32 = moe(x).y;
  moe->to(torch::kDouble);
  const torch::Tensor y64 = moe(x.to(torch::kDouble)).y;
  EXPECT_LT(max_diff(y32.to(torch::kDouble), y64), 1e-5);
}
