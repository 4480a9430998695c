// Fused kernels off the GPU: swiglu_fused falls back to the reference exactly,
// and the reference has the analytic gradient (double-precision gradcheck).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "models/kernels/swiglu.h"

using namespace moetrain;

TEST(KernelsCpu, SwigluFallbackEqualsReference) {
  torch::manual_seed(0);
  auto g = torch::randn({7, 13}), u = torch::randn({7, 13});
  EXPECT_TRUE(torch::equal(swiglu_fused(g, u), swiglu_reference(g, u)));
}

TEST(KernelsCpu, SwigluReferenceGradcheck) {
  torch::manual_seed(0);
  auto g = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  auto u = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  auto out = swiglu_reference(g, u).sum();
  auto grads = torch::autograd::grad({out}, {g, u});
  auto s = torch::sigmoid(g);
  auto expect_g = u * s * (1 + g * (1 - s));
  auto expect_u = g * s;
  EXPECT_TRUE(torch::allclose(grads[0], expect_g, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(grads[1], expect_u, 1e-12, 1e-12));
}
