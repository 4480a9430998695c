// GradReducer (trainer/grad_reducer.h), ranks as threads over Gloo: the gradients it averages
// during the backward equal ProcessGroup::average_gradients of the same gradients, over
// several buckets and two dtypes, with gradient accumulation, a parameter with a gradient on
// one rank only (zeros elsewhere) and one on none (stays undefined), a second accumulation
// before its bucket started, gradients zeroed in place, several steps; a second accumulation
// after the bucket started is refused with an error.
#include <gtest/gtest.h>

#include <vector>

#include "dist_test_util.h"
#include "trainer/distributed.h"
#include "trainer/grad_reducer.h"

using namespace moetrain;
using moetrain::testing::run_ranks;

namespace {

// A small two-layer net + a float64 parameter, a rank-0-only parameter and an unused one
// (registered first, so in the last bucket: the others can start during the backward).
enum { kUnused, kOnly0, kW1, kB1, kW2, kD };
struct Net {
  std::vector<torch::Tensor> params;  // unused [2], only0 [4], w1 [6, 8], b1 [8], w2 [8, 3], d [5] fp64
  Net() {
    params = {torch::zeros({2}),
              torch::ones({4}),
              torch::linspace(-1.0, 1.0, 48).view({6, 8}),
              torch::linspace(0.0, 0.5, 8),
              torch::linspace(1.0, -1.0, 24).view({8, 3}),
              torch::linspace(0.1, 0.9, 5, torch::kFloat64)};
    for (auto& p : params) p.requires_grad_();
  }
  // The loss of micro-step m on `rank` (inputs differ by rank and micro-step).
  torch::Tensor loss(int64_t rank, int64_t m) const {
    const double k = static_cast<double>(rank + 1) + 0.25 * static_cast<double>(m);
    torch::Tensor x = torch::linspace(-k, k, 4 * 6).view({4, 6}).sin();
    torch::Tensor h = torch::tanh(x.matmul(params[kW1]) + params[kB1]);
    torch::Tensor l = h.matmul(params[kW2]).pow(2).sum() + params[kD].pow(2).sum().to(torch::kFloat) * k;
    if (rank == 0) l = l + (params[kOnly0] * k).sum();
    return l;
  }
  // An extra loss on `param` only, for a second accumulation in the same step.
  torch::Tensor extra(int64_t rank, int param) const { return params[param].sum() * static_cast<double>(rank + 2); }
  void zero_grad(bool in_place) {
    for (auto& p : params) {
      if (!p.grad().defined()) continue;
      if (in_place)
        p.mutable_grad().zero_();
      else
        p.mutable_grad() = torch::Tensor();
    }
  }
};

struct Case {
  int64_t accum;
  bool second_accumulation;  // another backward into only0 (its bucket starts in finish) after the last micro-step's
  bool zero_in_place;
};

// Steps of `c` on both nets of each rank: one reduced by a GradReducer during the backward,
// one by average_gradients after it; their gradients must be equal after every step.
void check(const Case& c) {
  const std::string errors = run_ranks(2, [&](int64_t rank, ProcessGroup& pg) {
    Net fast, ref;
    GradReducer reducer(fast.params, pg, /*bucket_bytes=*/64);  // several buckets
    ASSERT_GE(reducer.bucket_count(), 4);
    for (int step = 0; step < 3; ++step) {
      fast.zero_grad(c.zero_in_place);
      ref.zero_grad(c.zero_in_place);
      for (int64_t m = 0; m < c.accum; ++m) {
        if (m + 1 == c.accum) reducer.prepare();
        fast.loss(rank, m + step).backward();
        ref.loss(rank, m + step).backward();
      }
      if (c.second_accumulation) {
        fast.extra(rank, kOnly0).backward();
        ref.extra(rank, kOnly0).backward();
      }
      reducer.finish();
      pg.average_gradients(ref.params);
      EXPECT_GT(reducer.overlapped_buckets(), 0) << "nothing started during the backward";
      for (size_t i = 0; i < ref.params.size(); ++i) {
        const torch::Tensor a = fast.params[i].grad(), b = ref.params[i].grad();
        ASSERT_EQ(a.defined(), b.defined()) << "param " << i;
        if (!a.defined()) continue;
        EXPECT_TRUE(torch::allclose(a, b, 1e-6, 1e-7)) << "rank " << rank << " step " << step << " param " << i << "\n"
                                                       << a << "\n" << b;
      }
      ASSERT_FALSE(fast.params[kUnused].grad().defined());  // no gradient on any rank
      ASSERT_TRUE(fast.params[kOnly0].grad().defined());    // rank 0 only: averaged with zeros
    }
  });
  EXPECT_EQ(errors, "");
}

TEST(GradReducer, EqualsAverageGradients) { check({1, false, false}); }
TEST(GradReducer, AccumulationAndZeroingInPlace) { check({3, false, true}); }
TEST(GradReducer, SecondAccumulationBeforeTheBucketStarted) { check({2, true, false}); }

TEST(GradReducer, SecondAccumulationAfterTheBucketStartedIsRefused) {
  std::vector<std::string> what(2);
  const std::string errors = run_ranks(2, [&](int64_t rank, ProcessGroup& pg) {
    Net net;
    GradReducer reducer(net.params, pg, /*bucket_bytes=*/64);
    reducer.prepare();
    net.loss(rank, 0).backward();  // w2's bucket starts
    try {
      net.extra(rank, kW2).backward();
    } catch (const std::exception& e) {
      what[static_cast<size_t>(rank)] = e.what();
    }
  });
  EXPECT_EQ(errors, "");
  for (const auto& w : what) EXPECT_NE(w.find("accumulated again after its bucket's all-reduce started"), std::string::npos) << w;
}

// bf16 weights with fp32 norms, in miniature: fp64 "norms" between fp32 "matrices", the
// norms in one bucket from the last layer to the first (layer 0's unused: its gradient is
// missing, so that bucket completes only in finish()). Each matrix bucket must still start
// during the backward — buckets start in the order of their last gradient, not of creation.
TEST(GradReducer, ASparseDtypeBucketDoesNotHoldBackTheOthers) {
  const std::string errors = run_ranks(2, [&](int64_t rank, ProcessGroup& pg) {
    auto make = [] {
      std::vector<torch::Tensor> p;
      for (int l = 0; l < 3; ++l) {
        p.push_back(torch::full({3}, 0.5 + l, torch::kFloat64).requires_grad_());               // norm l (24 bytes)
        p.push_back(torch::linspace(-1.0 + l, 1.0, 16).view({4, 4}).requires_grad_());  // matrix l (64 bytes)
      }
      return p;
    };
    auto loss = [&](const std::vector<torch::Tensor>& p) {
      torch::Tensor h = torch::linspace(-1.0, 1.0 + static_cast<double>(rank), 8).view({2, 4});
      for (int l = 0; l < 3; ++l) {
        h = torch::tanh(h.matmul(p[2 * l + 1]));
        if (l > 0) h = h * p[2 * l].sum().to(torch::kFloat);  // norm 0 unused
      }
      return h.pow(2).sum();
    };
    std::vector<torch::Tensor> fast = make(), ref = make();
    GradReducer reducer(fast, pg, /*bucket_bytes=*/100);  // a matrix per bucket, the norms in one
    ASSERT_EQ(reducer.bucket_count(), 4);
    reducer.prepare();
    loss(fast).backward();
    loss(ref).backward();
    reducer.finish();
    pg.average_gradients(ref);
    EXPECT_EQ(reducer.overlapped_buckets(), 3) << "the matrices' buckets waited for the norms'";
    for (size_t i = 0; i < ref.size(); ++i) {
      ASSERT_EQ(fast[i].grad().defined(), ref[i].grad().defined()) << i;
      if (fast[i].grad().defined()) {
        EXPECT_TRUE(torch::allclose(fast[i].grad(), ref[i].grad(), 1e-6, 1e-7)) << i;
      }
    }
  });
  EXPECT_EQ(errors, "");
}

TEST(GradReducer, SingleProcessIsANoOp) {
  ProcessGroup pg(DistEnv{}, "gloo", std::chrono::seconds(1));
  Net net;
  GradReducer reducer(net.params, pg);
  reducer.prepare();
  net.loss(0, 0).backward();
  reducer.finish();
  Net ref;
  ref.loss(0, 0).backward();
  for (size_t i = kOnly0; i <= kD; ++i) EXPECT_TRUE(torch::equal(net.params[i].grad(), ref.params[i].grad())) << i;
}

}  // namespace
