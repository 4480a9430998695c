// Load balancing: the loss-free bias update (sign / proportional, centring,
// freeze, accumulation, skipped steps), the auxiliary losses against hand-computed
// values, where their gradients flow, and MaxVio.
#include <gtest/gtest.h>

#include <cmath>

#include "models/router.h"
#include "trainer/balance.h"

using namespace moetrain;

namespace {

RoutingStats stats_from_scores(torch::Tensor scores, torch::Tensor logits = {}) {
  RoutingStats r;
  r.scores = scores;
  r.logits = logits.defined() ? logits : scores;
  return r;
}

ModelConfig tiny_moe(int64_t experts = 4, int64_t k = 1) {
  ModelConfig m;
  m.hidden_size = 8;
  m.n_routed_experts = experts;
  m.num_experts_per_tok = k;
  m.num_hidden_layers = 2;
  m.first_k_dense_replace = 1;
  return m;
}

TEST(BalanceLosses, AuxLossHandComputed) {
  // top-1 picks: token 0 → e0, token 1 → e1: f = [1/2, 1/2, 0]; P = [0.4, 0.4, 0.2]
  auto s = torch::tensor({{0.6, 0.3, 0.1}, {0.2, 0.5, 0.3}}, torch::kFloat64);
  EXPECT_NEAR(aux_loss(stats_from_scores(s), 1).item<double>(), 3 * (0.5 * 0.4 + 0.5 * 0.4), 1e-12);
}

TEST(BalanceLosses, SigmoidScoresAreNormalizedPerToken) {
  // s' = s / Σ s = [0.5, 1/3, 1/6]; top-1 → e0; f = [1, 0, 0]
  auto s = torch::tensor({{0.9, 0.6, 0.3}}, torch::kFloat64);
  EXPECT_NEAR(aux_loss(stats_from_scores(s), 1).item<double>(), 3 * 0.5, 1e-12);
}

TEST(BalanceLosses, SeqAuxLossHandComputed) {
  auto s = torch::tensor({{0.6, 0.3, 0.1}, {0.2, 0.5, 0.3}}, torch::kFloat64);
  // one sequence of 2: f = 3/(1·2)·[1,1,0], P = [0.4, 0.4, 0.2] → 1.2
  EXPECT_NEAR(seq_aux_loss(stats_from_scores(s), 1, 2).item<double>(), 1.2, 1e-12);
  // two sequences of 1: (3·0.6 + 3·0.5) / 2 = 1.65
  EXPECT_NEAR(seq_aux_loss(stats_from_scores(s), 1, 1).item<double>(), 1.65, 1e-12);
}

TEST(BalanceLosses, ZLossHandComputed) {
  auto logits = torch::tensor({{1.0, 2.0, 3.0}, {0.0, 0.0, 0.0}}, torch::kFloat64);
  double lse0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)), lse1 = std::log(3.0);
  EXPECT_NEAR(z_loss(stats_from_scores(logits, logits)).item<double>(), (lse0 * lse0 + lse1 * lse1) / 2, 1e-12);
}

TEST(BalanceLosses, AuxGradientFlowsOnlyThroughP) {
  // d(aux)/ds = E · Σ_i f_i · dP_i/ds with f constant: for normalized rows the
  // gradient w.r.t. s[t, j] is (E/N)·(f_j − Σ_i f_i s'_i)/Σ s_t.
  auto s = torch::tensor({{0.6, 0.3, 0.1}, {0.2, 0.5, 0.3}}, torch::kFloat64).requires_grad_(true);
  aux_loss(stats_from_scores(s), 1).backward();
  auto f = torch::tensor({0.5, 0.5, 0.0}, torch::kFloat64);
  auto sn = s.detach() / s.detach().sum(-1, true);
  auto expected = (3.0 / 2.0) * (f.unsqueeze(0) - (sn * f).sum(-1, true)) / s.detach().sum(-1, true);
  EXPECT_TRUE(torch::allclose(s.grad(), expected, 1e-12, 1e-12)) << s.grad() << expected;
}

TEST(BalanceLosses, WeightedAndSummedOverLayers) {
  BalanceConfig cfg;
  cfg.strategy = {"aux_loss", "z_loss"};
  cfg.aux_loss_coef = 0.01;
  cfg.z_loss_coef = 0.001;
  ModelConfig m = tiny_moe(3, 1);
  Balancer b(cfg, m, {});
  auto s = torch::tensor({{0.6, 0.3, 0.1}, {0.2, 0.5, 0.3}}, torch::kFloat64);
  auto r = stats_from_scores(s, s);
  BalanceLosses l = b.losses({r, r}, 2);
  EXPECT_NEAR(l.aux.item<double>(), 2 * 0.01 * 1.2, 1e-12);
  EXPECT_NEAR(l.z.item<double>(), 2 * 0.001 * z_loss(r).item<double>(), 1e-12);
  EXPECT_EQ(l.seq_aux.item<double>(), 0.0);
}

TEST(MaxVio, Definition) {
  EXPECT_DOUBLE_EQ(max_violation(torch::tensor({10, 10, 10, 10})), 0.0);
  EXPECT_DOUBLE_EQ(max_violation(torch::tensor({40, 0, 0, 0})), 3.0);  // (40 − 10) / 10
}

// Routers whose weights favour experts 0 and 1 for every input with a positive mean.
std::vector<Router> skewed_routers(const ModelConfig& m) {
  std::vector<Router> routers;
  for (int l = 0; l < 2; ++l) {
    Router r(m);
    torch::NoGradGuard ng;
    r->weight.zero_();
    r->weight.index_put_({0}, 1.0);
    r->weight.index_put_({1}, 0.8);
    routers.push_back(r);
  }
  return routers;
}

std::vector<RoutingStats> route(std::vector<Router>& routers, const torch::Tensor& x) {
  std::vector<RoutingStats> out;
  for (auto& r : routers) out.push_back(r->forward(x));
  return out;
}

TEST(LossFree, SignUpdateMovesEachBiasByExactlyGammaAndBalances) {
  torch::set_num_threads(1);
  ModelConfig m = tiny_moe(4, 1);
  BalanceConfig cfg;
  cfg.bias_update_rate = 0.01;
  auto routers = skewed_routers(m), none_routers = skewed_routers(m);
  Balancer lf(cfg, m, routers);
  BalanceConfig none_cfg;
  none_cfg.strategy = {};
  Balancer none(none_cfg, m, none_routers);
  torch::manual_seed(0);
  double first = -1, last = -1, none_last = -1;
  for (int step = 1; step <= 300; ++step) {
    auto x = torch::randn({64, 8}) * 0.1 + 0.2;
    auto before = lf.biases();
    lf.accumulate(route(routers, x));
    none.accumulate(route(none_routers, x));
    double mv = lf.maxvio_per_layer()[0];
    if (step == 1) first = mv;
    last = mv;
    none_last = none.maxvio_per_layer()[0];
    auto counts = lf.counts()[0].to(torch::kFloat64);
    auto expected_sign = torch::sign(counts.mean() - counts);
    lf.after_step(step, step * 64);
    none.after_step(step, step * 64);
    auto delta = (lf.biases() - before)[0].to(torch::kFloat64);
    ASSERT_TRUE(torch::allclose(delta, 0.01 * expected_sign, 0, 1e-6)) << "step " << step << delta;
  }
  EXPECT_GT(first, 2.0);       // all tokens on expert 0: MaxVio = 3
  EXPECT_LT(last, 0.5 * first);
  EXPECT_GT(none_last, 2.0);   // without balancing nothing changes
  EXPECT_TRUE(torch::equal(none.biases(), torch::zeros({2, 4})));
}

TEST(LossFree, AccumulationUpdatesOncePerStepOnSummedCounts) {
  ModelConfig m = tiny_moe(4, 1);
  BalanceConfig cfg;
  auto routers = skewed_routers(m);
  Balancer b(cfg, m, routers);
  RoutingStats a, c;
  a.counts = torch::tensor({3, 0, 0, 1});
  c.counts = torch::tensor({0, 0, 2, 2});
  b.accumulate({a, a});
  b.accumulate({c, c});
  EXPECT_TRUE(torch::equal(b.counts()[0], torch::tensor({3, 0, 2, 3})));  // summed over micro-steps
  b.after_step(1, 8);  // mean 2: [−γ, +γ, 0, −γ]
  auto expected = torch::tensor({-1e-3, 1e-3, 0.0, -1e-3}, torch::kFloat32);
  EXPECT_TRUE(torch::allclose(b.biases()[0], expected, 0, 1e-9));
  EXPECT_EQ(b.counts().sum().item<int64_t>(), 0);  // reset after the update
}

TEST(LossFree, ProportionalCentredFrozenAndSkipped) {
  ModelConfig m = tiny_moe(4, 1);
  RoutingStats r;
  r.counts = torch::tensor({6, 2, 0, 0});  // mean 2
  {
    BalanceConfig cfg;
    cfg.bias_update = "proportional";
    auto routers = skewed_routers(m);
    Balancer b(cfg, m, routers);
    b.accumulate({r, r});
    b.after_step(1, 8);
    EXPECT_TRUE(torch::allclose(b.biases()[0], torch::tensor({-2e-3, 0.0, 1e-3, 1e-3}), 0, 1e-9));
  }
  {
    BalanceConfig cfg;
    cfg.bias_center = true;  // signs [−1, 0, +1, +1] minus their mean 0.25
    auto routers = skewed_routers(m);
    Balancer b(cfg, m, routers);
    b.accumulate({r, r});
    b.after_step(1, 8);
    EXPECT_TRUE(torch::allclose(b.biases()[0], torch::tensor({-1.25e-3, -0.25e-3, 0.75e-3, 0.75e-3}), 0, 1e-9));
  }
  {
    BalanceConfig cfg;
    cfg.bias_freeze_step = 5;
    auto routers = skewed_routers(m);
    Balancer b(cfg, m, routers);
    EXPECT_EQ(b.rate_at(4, 0), 1e-3);
    EXPECT_EQ(b.rate_at(5, 0), 0.0);
    b.accumulate({r, r});
    b.after_step(5, 8);
    EXPECT_TRUE(torch::equal(b.biases(), torch::zeros({2, 4})));
    b.accumulate({r, r});
    b.discard_step();  // a skipped step moves nothing and drops its counts
    EXPECT_EQ(b.counts().sum().item<int64_t>(), 0);
  }
}

TEST(LossFree, BiasGetsNoGradient) {
  ModelConfig m = tiny_moe(4, 2);
  auto routers = skewed_routers(m);
  auto x = torch::randn({16, 8}, torch::requires_grad());
  auto st = routers[0]->forward(x);
  (st.topk_weight.sum() + st.scores.sum()).backward();
  EXPECT_FALSE(routers[0]->bias.requires_grad());
  EXPECT_FALSE(routers[0]->bias.grad().defined());
  EXPECT_TRUE(routers[0]->weight.grad().defined());
}

}  // namespace

#include "models/transformer.h"
#include "trainer/optim.h"

namespace {

// A whole (tiny) model whose routers are initialized to favour two experts (a
// head start of 0.1 in their selection bias): the loss-free balancer drives
// MaxVio_batch down over the steps; without it the skew stays.
TEST(LossFree, TinyModelWithSkewedRoutersBalances) {
  torch::set_num_threads(1);
  ModelConfig m;
  m.vocab_size = 64, m.hidden_size = 32, m.num_hidden_layers = 2, m.num_attention_heads = 2;
  m.intermediate_size = 64, m.moe_intermediate_size = 16, m.kv_lora_rank = 16;
  m.qk_nope_head_dim = 8, m.qk_rope_head_dim = 4, m.v_head_dim = 8, m.init_std = 0.02;
  m.n_routed_experts = 8, m.num_experts_per_tok = 2, m.n_shared_experts = 1, m.first_k_dense_replace = 1;
  auto run = [&](const std::vector<std::string>& strategy) {
    torch::manual_seed(1);
    Transformer model(m);
    torch::NoGradGuard ng;
    for (auto& r : model->routers()) r->bias.index_put_({torch::indexing::Slice(0, 2)}, 0.1);
    BalanceConfig cfg;
    cfg.strategy = strategy;
    cfg.bias_update_rate = 0.002;
    Balancer b(cfg, m, model->routers());
    std::vector<double> maxvio;
    for (int step = 1; step <= 200; ++step) {
      auto tokens = torch::randint(0, 64, {4, 16});
      b.accumulate(model->forward(tokens).routing);
      maxvio.push_back(b.maxvio_per_layer()[0]);
      b.after_step(step, step * 64);
    }
    return maxvio;
  };
  auto lf = run({"loss_free"}), none = run({});
  EXPECT_GT(lf.front(), 2.5);  // every token on experts 0 and 1: MaxVio = 3
  double lf_tail = 0, none_tail = 0;
  for (int i = 180; i < 200; ++i) lf_tail += lf[i] / 20, none_tail += none[i] / 20;
  EXPECT_LT(lf_tail, 1.0) << "loss_free did not balance";
  EXPECT_GT(none_tail, 2.5) << "without balancing the skew should stay";
}

TEST(Schedule, WarmupCosineConstantMultistep) {
  OptimConfig o;
  o.lr = 1.0, o.min_lr = 0.1, o.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(lr_at(0, o, 110), 0.1);
  EXPECT_DOUBLE_EQ(lr_at(9, o, 110), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(10, o, 110), 1.0);
  EXPECT_NEAR(lr_at(109, o, 110), 0.1, 1e-12);
  EXPECT_NEAR(lr_at(59, o, 110), 0.55, 0.02);
  o.schedule = "constant";
  EXPECT_DOUBLE_EQ(lr_at(100, o, 110), 1.0);
  o.schedule = "multistep";
  o.milestones = {50, 80};
  o.multistep_factor = 0.5;
  EXPECT_DOUBLE_EQ(lr_at(49, o, 110), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(50, o, 110), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(80, o, 110), 0.25);
}

TEST(Optimizer, DecaysOnlyMatrices) {
  ModelConfig m;
  Transformer model(m);
  OptimConfig o;
  auto opt = build_optimizer(*model, o);
  ASSERT_EQ(opt->param_groups().size(), 2u);
  for (const auto& p : opt->param_groups()[0].params()) EXPECT_GE(p.dim(), 2);
  for (const auto& p : opt->param_groups()[1].params()) EXPECT_EQ(p.dim(), 1);
  auto& decay = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options());
  auto& none = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options());
  EXPECT_DOUBLE_EQ(decay.weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(none.weight_decay(), 0.0);
  EXPECT_EQ(std::get<1>(decay.betas()), 0.95);
  size_t n = opt->param_groups()[0].params().size() + opt->param_groups()[1].params().size();
  EXPECT_EQ(n, model->parameters().size());  // the router bias is a buffer, never optimized
}

}  // namespace
