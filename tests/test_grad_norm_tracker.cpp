// GradNormTracker (trainer/grad_norm_tracker.h) on the CPU: the norm it sums during the last
// backward equals the norm of the final gradients computed after it, with gradient
// accumulation, a parameter with a gradient from an earlier micro-step only, one without a
// gradient, one larger than a chunk, and a second armed backward (each hook runs twice: the
// second sum overwrites the first); the per-chunk sums against the chunks by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "models/kernels/sum_squares.h"
#include "trainer/grad_norm_tracker.h"

using namespace moetrain;

namespace {

double norm_of_grads(const std::vector<torch::Tensor>& params) {
  double sq = 0.0;
  for (const auto& p : params)
    if (p.grad().defined()) sq += p.grad().to(torch::kDouble).pow(2).sum().item<double>();
  return std::sqrt(sq);
}

enum { kW, kBig, kFirstOnly, kUnused, kB };

struct Net {
  std::vector<torch::Tensor> params;  // w [6, 4], big [2 chunks + 3], first-only [3], unused [2], b [4]
  Net() {
    params = {torch::linspace(-1.0, 1.0, 24).view({6, 4}), torch::linspace(-0.5, 0.5, 2 * kSumSquaresChunk + 3),
              torch::ones({3}), torch::zeros({2}), torch::linspace(0.0, 0.3, 4)};
    for (auto& p : params) p.requires_grad_();
  }
  torch::Tensor loss(int64_t m) const {
    const double k = 1.0 + 0.5 * static_cast<double>(m);
    const torch::Tensor x = torch::linspace(-k, k, 12).view({2, 6}).sin();
    torch::Tensor l = torch::tanh(x.matmul(params[kW]) + params[kB]).pow(2).sum() + (params[kBig] * k).pow(2).sum();
    if (m == 0) l = l + (params[kFirstOnly] * 3.0).sum();  // a gradient from the first micro-step only
    return l;
  }
};

}  // namespace

TEST(GradNormTracker, ChunkSumsMatchTheChunksByHand) {
  const torch::Tensor t = torch::randn({2 * kSumSquaresChunk + 5});
  const torch::Tensor out = torch::full({3}, -1.0f);
  sum_of_squares_chunks_into(t, out);
  for (int64_t c = 0; c < 3; ++c) {
    const int64_t len = std::min<int64_t>(kSumSquaresChunk, t.numel() - c * kSumSquaresChunk);
    const double want = t.narrow(0, c * kSumSquaresChunk, len).to(torch::kDouble).pow(2).sum().item<double>();
    EXPECT_NEAR(out[c].item<double>(), want, 1e-5 * want) << "chunk " << c;
  }
  EXPECT_THROW(sum_of_squares_chunks_into(t, torch::zeros({2})), std::invalid_argument);  // one chunk short
  EXPECT_THROW(sum_of_squares_chunks_into(t, torch::zeros({3}, torch::kDouble)), std::invalid_argument);
  EXPECT_EQ(sum_of_squares_chunk_count(0), 0);
  EXPECT_EQ(sum_of_squares_chunk_count(kSumSquaresChunk), 1);
  EXPECT_EQ(sum_of_squares_chunk_count(kSumSquaresChunk + 1), 2);
}

TEST(GradNormTracker, EqualsTheNormOfTheFinalGradients) {
  Net net;
  GradNormTracker tracker(net.params);
  EXPECT_THROW(tracker.finish(), std::logic_error) << "finish without prepare";
  for (int step = 0; step < 2; ++step) {  // the buffer is zeroed again for the second step
    for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
    net.loss(0).backward();  // an earlier micro-step: not summed
    tracker.prepare();
    net.loss(1).backward();  // the last one
    const torch::Tensor norm = tracker.finish();
    EXPECT_EQ(norm.scalar_type(), torch::kDouble);
    EXPECT_EQ(norm.dim(), 0);
    EXPECT_EQ(tracker.summed_in_backward(), 3) << "w, big and b were accumulated in the armed backward";
    EXPECT_FALSE(net.params[kUnused].grad().defined());
    const double want = norm_of_grads(net.params);
    EXPECT_NEAR(norm.item<double>(), want, 1e-6 * want) << "step " << step;
  }
  // A backward that is not armed sums nothing; a second armed one reruns every hook, and the
  // later sums (of the total gradients) replace the earlier ones.
  for (auto& p : net.params) p.mutable_grad() = torch::Tensor();
  tracker.prepare();
  net.loss(0).backward();
  net.loss(1).backward();
  const torch::Tensor twice = tracker.finish();
  EXPECT_EQ(tracker.summed_in_backward(), 4 + 3);
  const double want = norm_of_grads(net.params);
  EXPECT_NEAR(twice.item<double>(), want, 1e-6 * want);
  net.loss(1).backward();  // unarmed: the hooks do nothing
  EXPECT_EQ(tracker.summed_in_backward(), 7);
}

TEST(GradNormTracker, RefusesBadParameters) {
  EXPECT_THROW(GradNormTracker({}), std::invalid_argument);
  EXPECT_THROW(GradNormTracker({torch::zeros({2})}), std::invalid_argument) << "does not require grad";
  const torch::Tensor p = torch::zeros({2}).requires_grad_();
  {
    GradNormTracker first({p});
    EXPECT_THROW(GradNormTracker({p}), std::invalid_argument) << "a parameter takes one post-accumulation hook";
  }
  GradNormTracker again({p});  // the first one's hooks were removed with it
}

TEST(GradNormTracker, UsedOnCudaInOneProcessWhenAskedFor) {
  // (a test process of its own under ctest: the switch is read once, here first)
  setenv("MOETRAIN_NORM_IN_BACKWARD", "1", 1);
  ASSERT_TRUE(norm_in_backward_enabled());
  const torch::Tensor cpu = torch::zeros({2}).requires_grad_();
  EXPECT_EQ(norm_tracker_for({cpu}, /*one_process=*/true), nullptr) << "CPU parameters";
  EXPECT_EQ(norm_tracker_for({}, /*one_process=*/true), nullptr);
  if (torch::cuda::is_available()) {
    const torch::Tensor gpu = torch::zeros({2}, torch::kCUDA).requires_grad_();
    EXPECT_NE(norm_tracker_for({gpu}, /*one_process=*/true), nullptr);
    EXPECT_EQ(norm_tracker_for({gpu}, /*one_process=*/false), nullptr) << "data, expert or ZeRO parallel";
  }
}
