// The expert-parallel dispatch (trainer/expert_parallel.h): the device-side regroup
// permutation equals the former CPU formulation (a stable sort of the received rows'
// local-expert labels) for random count matrices with zeros, and its restore index is the
// inverse; over Gloo ranks (threads), dispatch groups every rank's rows by local expert, then
// source, in arrival order, and combine(dispatch(x)) gives x back, its gradient too.
#include <gtest/gtest.h>

#include <functional>
#include <thread>

#include <fmt/format.h>

#include "dist_test_util.h"
#include "models/moe.h"
#include "models/transformer.h"
#include "trainer/expert_parallel.h"

using namespace moetrain;
using moetrain::testing::run_ranks;

namespace {

// The former formulation: label each received (source-major) row with its local expert, sort stably.
torch::Tensor regroup_by_sort(const torch::Tensor& recv_counts) {
  const int64_t n = recv_counts.size(0), e_local = recv_counts.size(1);
  const torch::Tensor labels =
      torch::arange(e_local, torch::kLong).repeat({n}).repeat_interleave(recv_counts.flatten());
  return torch::argsort(labels, /*stable=*/true);
}

}  // namespace

TEST(EpRegroup, EqualsStableSortOfLocalExpertLabels) {
  torch::manual_seed(0);
  int cases = 0;
  for (int64_t n : {2, 3, 4, 8})
    for (int64_t e_local : {1, 2, 5, 32})
      for (int trial = 0; trial < 4; ++trial) {
        torch::Tensor c = torch::randint(0, 6, {n, e_local}, torch::kLong);
        if (trial == 1) c.mul_(torch::randint(0, 2, {n, e_local}, torch::kLong));  // many zero blocks
        if (trial == 2) c.select(0, n - 1).zero_();                                // a source sends nothing
        if (trial == 3) c.zero_();                                                  // no rows at all
        const int64_t total = c.sum().item<int64_t>();
        const EpRegroup g = ep_regroup(c, total);
        const torch::Tensor want = regroup_by_sort(c);
        ASSERT_EQ(g.regroup.numel(), total);
        EXPECT_TRUE(torch::equal(g.regroup, want)) << n << " x " << e_local << " trial " << trial;
        EXPECT_TRUE(torch::equal(g.restore, torch::argsort(want))) << n << " x " << e_local << " trial " << trial;
        EXPECT_TRUE(torch::equal(g.regroup.index_select(0, g.restore), torch::arange(total, torch::kLong)));
        ++cases;
      }
  EXPECT_EQ(cases, 64);
}

namespace {

// test_util.h's tiny MoE model with n_experts routed experts and no shared one.
ModelConfig tiny_model(int64_t n_experts) {
  ModelConfig cfg = moetrain::testing::tiny_moe_config(/*vocab_size=*/64, /*mtp_depth=*/0, /*init_std=*/0.02);
  cfg.n_routed_experts = n_experts;
  cfg.n_shared_experts = 0;
  return cfg;
}

// `world` = ep ranks, E experts. Rank r's rows, sorted by global expert: [M_r, 3] doubles
// (global expert, source rank, index within the source), counts [E] with zeros (rank 1 sends
// nothing when zero_rank). Checks the dispatched order and counts, then combine∘dispatch.
void expect_dispatch_round_trip(int64_t world, int64_t n_experts, bool zero_rank) {
  torch::set_num_threads(1);
  torch::manual_seed(static_cast<uint64_t>(world * 100 + n_experts));
  const int64_t e_local = n_experts / world;
  std::vector<torch::Tensor> counts, rows, weights;
  for (int64_t r = 0; r < world; ++r) {
    torch::Tensor c = torch::randint(0, 5, {n_experts}, torch::kLong) * torch::randint(0, 2, {n_experts}, torch::kLong);
    if (zero_rank && r == 1) c.zero_();
    const int64_t m = c.sum().item<int64_t>();
    const torch::Tensor expert = torch::arange(n_experts, torch::kLong).repeat_interleave(c).to(torch::kDouble);
    rows.push_back(torch::stack({expert, torch::full({m}, static_cast<double>(r), torch::kDouble),
                                 torch::arange(m, torch::kDouble)},
                                1));
    counts.push_back(c);
  }
  // what shard s must receive: its experts' rows, expert-major, then by source, in order
  std::vector<torch::Tensor> want_rows, want_counts;
  for (int64_t s = 0; s < world; ++s) {
    std::vector<torch::Tensor> parts;
    for (int64_t e = s * e_local; e < (s + 1) * e_local; ++e)
      for (int64_t r = 0; r < world; ++r) parts.push_back(rows[r].index({rows[r].select(1, 0) == e}));
    want_rows.push_back(torch::cat(parts).view({-1, 3}));
    torch::Tensor c = torch::zeros({e_local}, torch::kLong);
    for (int64_t r = 0; r < world; ++r) c += counts[r].narrow(0, s * e_local, e_local);
    want_counts.push_back(c);
  }
  for (int64_t r = 0; r < world; ++r) weights.push_back(torch::randn(rows[r].sizes(), torch::kDouble));

  std::vector<Transformer> models;
  for (int64_t r = 0; r < world; ++r) models.emplace_back(tiny_model(n_experts));
  std::vector<torch::Tensor> got_rows(world), got_counts(world), back(world), grads(world);
  const std::string errors = run_ranks(world, [&](int64_t r, ProcessGroup& pg) {
    ExpertParallel ep(pg, world);
    ep.shard(models[r]);
    std::shared_ptr<ExpertDispatcher> dispatcher;
    for (const auto& m : models[r]->modules(/*include_self=*/false))
      if (auto* moe = m->as<MoEImpl>()) dispatcher = moe->dispatcher;
    const torch::Tensor x = rows[r].clone().requires_grad_();
    const ExpertDispatch d = dispatcher->dispatch(x, counts[r]);
    const torch::Tensor y = dispatcher->combine(d.rows, d);
    (y * weights[r]).sum().backward();
    got_rows[r] = d.rows.detach();
    got_counts[r] = d.counts;
    back[r] = y.detach();
    grads[r] = x.grad();
  });
  ASSERT_EQ(errors, "");
  for (int64_t r = 0; r < world; ++r) {
    EXPECT_TRUE(torch::equal(got_rows[r], want_rows[r])) << "rank " << r;
    EXPECT_TRUE(torch::equal(got_counts[r], want_counts[r])) << "rank " << r;
    EXPECT_TRUE(torch::equal(back[r], rows[r])) << "rank " << r << ": combine(dispatch(x)) != x";
    ASSERT_TRUE(grads[r].defined()) << r;
    EXPECT_TRUE(torch::equal(grads[r], weights[r])) << "rank " << r << ": the gradient goes back too";
  }
}

}  // namespace

TEST(EpDispatch, TwoRanksRoundTrip) { expect_dispatch_round_trip(2, 8, /*zero_rank=*/false); }
TEST(EpDispatch, FourRanksOneSendingNothing) { expect_dispatch_round_trip(4, 8, /*zero_rank=*/true); }
