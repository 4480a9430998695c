// Multi-token prediction (models/mtp.h, Transformer::forward with MTP,
// mtp_head_losses): names and counts, a worked 6-token example for D = 1 and
// D = 2 checked against an explicit per-position loop with the positions and
// targets written out by hand, the loss normalization, gradients, and the MTP
// MoE layers' place in the routing / balancing order.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "models/params.h"
#include "models/transformer.h"
#include "test_util.h"
#include "trainer/balance.h"

using namespace moetrain;
using moetrain::testing::tiny_moe_config;

class MtpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

// Norm gains away from 1 so that a skipped or swapped norm shows.
void randomize_norms(Transformer& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : model->named_parameters())
    if (p.key().find("norm.weight") != std::string::npos) p.value().copy_(1.0 + 0.3 * torch::randn_like(p.value()));
}

double max_abs(const torch::Tensor& a) { return a.abs().max().item<double>(); }

// The worked example: one sequence of 7 tokens t_0..t_6; the model reads t_0..t_5
// (T = 6) and the main head predicts t_1..t_6.
const std::vector<int64_t> kTokens = {11, 3, 47, 29, 5, 60, 18};

struct Depth {
  std::vector<int64_t> emb_tokens;     // t_{i+k} combined with h^{k-1}_i, i = 0..T-k-1
  std::vector<int64_t> target_tokens;  // t_{i+k+1}, what position i of depth k predicts
};
// Written out by hand from DeepSeek-V3 eqs. 21–24 (not computed from the code's indexing).
const Depth kDepth1 = {{3, 47, 29, 5, 60}, {47, 29, 5, 60, 18}};  // 5 predictions
const Depth kDepth2 = {{47, 29, 5, 60}, {29, 5, 60, 18}};         // 4 predictions

void check_worked_example(int64_t D) {
  torch::manual_seed(10 + D);
  const ModelConfig cfg = tiny_moe_config(64, D, 0.2);
  Transformer model(cfg);
  randomize_norms(model);
  model->to(torch::kDouble);
  const torch::Tensor full = torch::tensor(kTokens, torch::kLong).view({1, 7});
  const torch::Tensor x = full.narrow(1, 0, 6), y = full.narrow(1, 1, 6);
  const int64_t T = 6;

  const ForwardOut out = model->forward(x, /*with_mtp=*/true);
  ASSERT_EQ(static_cast<int64_t>(out.mtp_hidden.size()), D);
  const std::vector<torch::Tensor> losses = mtp_head_losses(model, out, y, /*chunk_tokens=*/3);
  ASSERT_EQ(static_cast<int64_t>(losses.size()), D);

  // The explicit per-position loop: h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]),
  // built row by row from the hand-written token lists, then the block over the rows.
  torch::Tensor prev = out.hidden[0];  // h^0: [T, D], the main model's normed hidden states
  for (int64_t k = 1; k <= D; ++k) {
    const Depth& d = k == 1 ? kDepth1 : kDepth2;
    const int64_t n = static_cast<int64_t>(d.emb_tokens.size());
    ASSERT_EQ(n, T - k);
    MTPModuleImpl& m = model->mtp_module(k - 1);
    std::vector<torch::Tensor> rows;
    for (int64_t i = 0; i < n; ++i) {
      const torch::Tensor e = model->embed->weight[d.emb_tokens[static_cast<size_t>(i)]];  // [D]
      rows.push_back(m.eh_proj(torch::cat({m.enorm(e), m.hnorm(prev[i])})));              // embedding first
    }
    RotaryEmbedding rope(cfg);
    std::vector<RoutingStats> routing;
    const torch::Tensor hk = m.block->forward(torch::stack(rows).unsqueeze(0), rope.tables(n, torch::kCPU, torch::kDouble),
                                              routing)[0];  // [T-k, D], before the module's norm
    const torch::Tensor got = out.mtp_hidden[static_cast<size_t>(k - 1)][0];
    ASSERT_EQ(got.size(0), n) << "depth " << k;
    EXPECT_LT(max_abs(got - m.norm(hk)), 1e-12) << "depth " << k;

    // L^k = -(1/(T-k)) Σ_i log P^k_i[t_{i+k+1}]
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const torch::Tensor logp = torch::log_softmax(model->logits(got[i]), -1);
      sum -= logp[d.target_tokens[static_cast<size_t>(i)]].item<double>();
    }
    EXPECT_NEAR(losses[static_cast<size_t>(k - 1)].item<double>(), sum / static_cast<double>(n), 1e-12) << "depth " << k;
    std::printf("depth %ld: %ld predictions (positions 0..%ld), loss %.6f\n", static_cast<long>(k), static_cast<long>(n),
                static_cast<long>(n - 1), sum / static_cast<double>(n));
    prev = hk;  // depth k+1 chains on the block output
  }

  // Normalization by hand: with every module's norm gain 0 all MTP logits are 0, each
  // prediction costs ln V, and the mean over the T-k predictions is ln V exactly
  // (eq. 24's literal 1/T would give (T-k)/T · ln V).
  {
    torch::NoGradGuard no_grad;
    for (int64_t k = 0; k < D; ++k) model->mtp_module(k).norm->weight.zero_();
  }
  const ForwardOut zero = model->forward(x, true);
  const std::vector<torch::Tensor> flat = mtp_head_losses(model, zero, y, 0);
  for (int64_t k = 1; k <= D; ++k)
    EXPECT_NEAR(flat[static_cast<size_t>(k - 1)].item<double>(), std::log(64.0), 1e-12) << "depth " << k;
}

}  // namespace

TEST_F(MtpTest, WorkedExampleOneDepth) { check_worked_example(1); }
TEST_F(MtpTest, WorkedExampleTwoDepths) { check_worked_example(2); }

TEST_F(MtpTest, BatchLossIsTheMeanOverAllPredictions) {
  // B = 3 rows of T = 8, one target ignored: the loss averages the B·(T-k) - 1 others.
  const ModelConfig cfg = tiny_moe_config(64, 2, 0.2);
  Transformer model(cfg);
  model->to(torch::kDouble);
  const torch::Tensor full = torch::randint(cfg.vocab_size, {3, 9}, torch::kLong);
  const torch::Tensor x = full.narrow(1, 0, 8);
  torch::Tensor y = full.narrow(1, 1, 8).clone();
  y[2][5] = -100;
  const ForwardOut out = model->forward(x, true);
  const auto losses = mtp_head_losses(model, out, y, 5);
  for (int64_t k = 1; k <= 2; ++k) {
    const torch::Tensor logp = torch::log_softmax(model->logits(out.mtp_hidden[static_cast<size_t>(k - 1)]), -1);
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t i = 0; i + k < 8; ++i) {
        const int64_t target = y[b][i + k].item<int64_t>();  // t_{i+k+1}
        if (target == -100) continue;
        sum -= logp[b][i][target].item<double>();
        ++count;
      }
    EXPECT_EQ(count, 3 * (8 - k) - 1);
    EXPECT_NEAR(losses[static_cast<size_t>(k - 1)].item<double>(), sum / static_cast<double>(count), 1e-12);
  }
}

TEST_F(MtpTest, NamesCountsAndRoutingOrder) {
  ModelConfig cfg = tiny_moe_config(64, 2, 0.2);
  Transformer model(cfg);
  const auto params = model->named_parameters();
  for (int64_t k = 0; k < 2; ++k) {
    const std::string p = "mtp." + std::to_string(k) + ".";
    EXPECT_EQ(params[p + "enorm.weight"].sizes().vec(), std::vector<int64_t>{32});
    EXPECT_EQ(params[p + "hnorm.weight"].sizes().vec(), std::vector<int64_t>{32});
    EXPECT_EQ(params[p + "eh_proj.weight"].sizes().vec(), (std::vector<int64_t>{32, 64}));
    EXPECT_EQ(params[p + "norm.weight"].sizes().vec(), std::vector<int64_t>{32});
    EXPECT_TRUE(params.contains(p + "block.attn.wkv_a.weight"));
    EXPECT_TRUE(params.contains(p + "block.ffn.experts.w13"));  // layer index L + k >= first_k_dense_replace: MoE
  }
  int64_t total = 0;
  for (const auto& p : model->parameters()) total += p.numel();
  const ParamCounts counts = count_params(cfg, 16);
  EXPECT_EQ(total, counts.total + counts.mtp);
  // The main model's names and order are untouched by MTP: its parameters come first.
  ModelConfig no_mtp = cfg;
  no_mtp.num_nextn_predict_layers = 0;
  Transformer plain(no_mtp);
  const auto plain_params = plain->named_parameters();
  ASSERT_LT(plain_params.size(), params.size());
  for (size_t i = 0; i < plain_params.size(); ++i) EXPECT_EQ(plain_params[i].key(), params[i].key());

  // routers(): main MoE layer 1, then the two MTP blocks; forward's routing matches.
  const std::vector<Router> routers = model->routers();
  ASSERT_EQ(routers.size(), 3u);
  EXPECT_EQ(routers[1].get(), model->mtp_module(0).block->moe->gate.get());
  EXPECT_EQ(routers[2].get(), model->mtp_module(1).block->moe->gate.get());
  const int64_t B = 2, T = 7;
  const ForwardOut out = model->forward(torch::randint(cfg.vocab_size, {B, T}, torch::kLong), true);
  ASSERT_EQ(out.routing.size(), 3u);
  for (size_t j = 0; j < 3; ++j) {
    const int64_t t = j == 0 ? T : T - static_cast<int64_t>(j);  // depth k routes T-k tokens per sequence
    EXPECT_EQ(out.routing[j].scores.size(0), B * t) << j;
    EXPECT_EQ(out.routing[j].seq_len, t) << j;
    EXPECT_EQ(out.routing[j].counts.sum().item<int64_t>(), B * t * cfg.num_experts_per_tok) << j;
  }
  EXPECT_EQ(model->forward(torch::randint(cfg.vocab_size, {B, T}, torch::kLong)).routing.size(), 1u);  // no MTP

  // The balancer treats them as more MoE layers: counts, per-sequence aux loss, bias update.
  BalanceConfig bc;
  bc.strategy = {"loss_free", "seq_aux_loss", "aux_loss", "z_loss"};
  Balancer balancer(bc, cfg, routers);
  const BalanceLosses bl = balancer.losses(out.routing, T);
  EXPECT_TRUE(std::isfinite(bl.total().item<double>()));
  balancer.accumulate(out.routing);
  EXPECT_EQ(balancer.counts().size(0), 3);
  EXPECT_EQ(balancer.counts()[2].sum().item<int64_t>(), B * (T - 2) * cfg.num_experts_per_tok);
  balancer.after_step(1, B * T);
  EXPECT_GT(model->mtp_module(1).block->moe->gate->bias.abs().sum().item<double>(), 0.0);

  // Too short for D = 2 predictions.
  EXPECT_THROW(model->forward(torch::zeros({1, 2}, torch::kLong), true), c10::Error);
}

TEST_F(MtpTest, DenseBlockWhenEveryLayerIsDense) {
  ModelConfig cfg = tiny_moe_config(64, 1, 0.2);
  cfg.first_k_dense_replace = 3;  // > L: the MTP block (layer index L = 2) is dense too
  Transformer model(cfg);
  EXPECT_FALSE(model->mtp_module(0).block->is_moe());
  EXPECT_TRUE(model->routers().empty());
  int64_t total = 0;
  for (const auto& p : model->parameters()) total += p.numel();
  const ParamCounts counts = count_params(cfg, 16);
  EXPECT_EQ(total, counts.total + counts.mtp);
}

TEST_F(MtpTest, GradientsReachTheModulesAndTheSharedTensors) {
  const ModelConfig cfg = tiny_moe_config(64, 1, 0.2);
  Transformer model(cfg);
  const torch::Tensor full = torch::randint(cfg.vocab_size, {2, 9}, torch::kLong);
  const ForwardOut out = model->forward(full.narrow(1, 0, 8), true);
  const torch::Tensor mtp = torch::stack(mtp_head_losses(model, out, full.narrow(1, 1, 8), 0)).mean();
  mtp.backward();
  for (const auto& p : model->named_parameters()) {
    const bool mtp_param = p.key().rfind("mtp.", 0) == 0;
    const bool shared = p.key() == "embed.weight" || p.key() == "head.weight";
    if (!mtp_param && !shared) continue;
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  }
  // The main model's layers get gradient through h^0 as well.
  EXPECT_GT(model->layer(0).attn->wkv_a->weight.grad().abs().sum().item<double>(), 0.0);
}
