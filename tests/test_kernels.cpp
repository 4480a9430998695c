// Fused kernels off the GPU: swiglu_packed falls back to the reference exactly,
// and the reference has the analytic gradient (double-precision gradcheck).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "models/kernels/grouped_gemm.h"
#include "models/kernels/grouped_wgrad.h"
#ifdef MOETRAIN_WITH_CUDA
#include "models/kernels/grouped_wgrad_kernels.h"
#endif
#include "models/kernels/moe_permute.h"
#include "models/kernels/rms_norm_fused.h"
#include "models/kernels/swiglu.h"
#include "models/linear.h"
#include "models/rms_norm.h"
#include "models/weight_grad_stream.h"

using namespace moetrain;

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

TEST(KernelsCpu, SwigluPackedIsSwigluOfTheTwoHalves) {
  torch::manual_seed(0);
  auto gu = torch::randn({3, 4, 10}, torch::kFloat64).requires_grad_(true);
  auto out = swiglu_packed(gu);  // CPU: the reference
  ASSERT_EQ(out.sizes(), (std::vector<int64_t>{3, 4, 5}));
  auto g = gu.detach().narrow(-1, 0, 5).clone().requires_grad_(true);
  auto u = gu.detach().narrow(-1, 5, 5).clone().requires_grad_(true);
  auto ref = swiglu_reference(g, u);
  EXPECT_TRUE(torch::equal(out, ref));
  auto go = torch::randn_like(ref);
  out.backward(go);
  ref.backward(go);
  EXPECT_TRUE(torch::equal(gu.grad().narrow(-1, 0, 5), g.grad()));
  EXPECT_TRUE(torch::equal(gu.grad().narrow(-1, 5, 5), u.grad()));
  EXPECT_THROW(swiglu_packed(torch::randn({2, 7})), c10::Error);  // odd: no gate ‖ up split
}

// swiglu_packed_backward's closed form (what autograd nodes that wrap the kernel call off the
// GPU) equals autograd through the reference.
TEST(KernelsCpu, SwigluPackedBackwardClosedFormEqualsAutograd) {
  torch::manual_seed(3);
  auto gu = torch::randn({4, 6, 14}, torch::kFloat64).requires_grad_(true);
  auto go = torch::randn({4, 6, 7}, torch::kFloat64);
  swiglu_packed_reference(gu).backward(go);
  const torch::Tensor closed = swiglu_packed_backward(gu.detach(), go);
  ASSERT_EQ(closed.sizes(), gu.sizes());
  EXPECT_TRUE(torch::allclose(closed, gu.grad(), 1e-12, 1e-12));
}

// The gate-scaled SwiGLU (the routed experts' h = g_r · silu(gate)·up): off the GPU it is its
// reference, and its closed-form backward equals autograd through the reference in both inputs.
TEST(KernelsCpu, SwigluPackedScaledBackwardClosedFormEqualsAutograd) {
  torch::manual_seed(4);
  auto gu = torch::randn({5, 3, 12}, torch::kFloat64).requires_grad_(true);
  auto scale = torch::rand({5, 3}, torch::kFloat64).requires_grad_(true);
  auto go = torch::randn({5, 3, 6}, torch::kFloat64);
  const torch::Tensor out = swiglu_packed_scaled(gu, scale);
  const torch::Tensor g = gu.detach().narrow(-1, 0, 6), u = gu.detach().narrow(-1, 6, 6);
  const torch::Tensor by_hand = g / (1 + torch::exp(-g)) * u * scale.detach().unsqueeze(-1);  // s·silu(g)·u
  EXPECT_TRUE(torch::allclose(out, by_hand, 1e-12, 1e-12));
  out.backward(go);
  const auto [grad_gu, grad_scale] = swiglu_packed_scaled_backward(gu.detach(), scale.detach(), go);
  ASSERT_EQ(grad_gu.sizes(), gu.sizes());
  ASSERT_EQ(grad_scale.sizes(), scale.sizes());
  EXPECT_TRUE(torch::allclose(grad_gu, gu.grad(), 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(grad_scale, scale.grad(), 1e-12, 1e-12));
  EXPECT_THROW(swiglu_packed_scaled(gu.detach(), torch::rand({5})), c10::Error);  // one weight a row
  EXPECT_THROW(swiglu_packed_scaled_backward(gu.detach(), scale.detach(), go.narrow(-1, 0, 5)), c10::Error);
}

// The experts' weight-gradient twin against autograd: y[rows of e] = x[rows of e] · w[e]ᵀ,
// L = Σ y ⊙ dy, so dL/dw[e] = dy[rows of e]ᵀ · x[rows of e]; empty groups get zeros. Off the GPU
// grouped_weight_grad is that twin and never takes the kernel.
TEST(KernelsCpu, GroupedWeightGradReferenceEqualsAutograd) {
  torch::manual_seed(5);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const std::vector<int64_t> counts = {3, 0, 7, 1, 0, 5};
  const int64_t M = 16, N = 4, K = 6, E = static_cast<int64_t>(counts.size());
  const torch::Tensor x = torch::randn({M, K}, f64), dy = torch::randn({M, N}, f64);
  const torch::Tensor w = torch::randn({E, N, K}, f64).requires_grad_(true);
  std::vector<torch::Tensor> ys;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    ys.push_back(x.narrow(0, start, counts[e]).mm(w[e].t()));
    start += counts[e];
  }
  (torch::cat(ys) * dy).sum().backward();
  const torch::Tensor offs = torch::tensor(counts).cumsum(0).to(torch::kInt);
  const torch::Tensor got = grouped_weight_grad_reference(dy, x, offs);
  EXPECT_EQ(got.sizes(), w.sizes());
  EXPECT_TRUE(torch::allclose(got, w.grad(), 1e-12, 1e-12));
  EXPECT_EQ(got[1].abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(grouped_wgrad_kernel_applies(dy.to(torch::kBFloat16), x.to(torch::kBFloat16), offs));
  EXPECT_TRUE(torch::equal(grouped_weight_grad(dy, x, offs), got));
}

// grouped_linear's twin against autograd of the per-expert loop: the forward x·w[e]ᵀ and its input
// gradient dy·w[e] (the GPU kernel is held to this twin in test_kernels_cuda); rows past the last
// offset are zeros; on the CPU grouped_linear is the twin and never takes the kernel.
TEST(KernelsCpu, GroupedLinearReferenceEqualsAutograd) {
  torch::manual_seed(6);
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  const std::vector<int64_t> counts = {3, 0, 7, 1, 0, 5};
  const int64_t M = 18, N = 4, K = 6, E = static_cast<int64_t>(counts.size());
  const torch::Tensor x = torch::randn({M, K}, f64).requires_grad_(true), dy = torch::randn({M, N}, f64);
  const torch::Tensor w = torch::randn({E, N, K}, f64);
  std::vector<torch::Tensor> ys;
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    ys.push_back(x.narrow(0, start, counts[e]).mm(w[e].t()));
    start += counts[e];
  }
  const torch::Tensor y = torch::cat(ys);  // [16, N]: the last two rows belong to no expert
  (y * dy.narrow(0, 0, start)).sum().backward();
  const torch::Tensor offs = torch::tensor(counts).cumsum(0).to(torch::kInt);
  const torch::Tensor got = grouped_linear_reference(x.detach(), w, offs);
  EXPECT_EQ(got.sizes(), (std::vector<int64_t>{M, N}));
  EXPECT_TRUE(torch::allclose(got.narrow(0, 0, start), y, 1e-12, 1e-12));
  EXPECT_EQ(got.narrow(0, start, M - start).abs().sum().item<double>(), 0.0);
  const torch::Tensor dx = grouped_linear_reference(dy, w, offs, /*input_grad=*/true);
  EXPECT_EQ(dx.sizes(), x.sizes());
  EXPECT_TRUE(torch::allclose(dx.narrow(0, 0, start), x.grad().narrow(0, 0, start), 1e-12, 1e-12));
  EXPECT_FALSE(grouped_gemm_kernel_applies(x.detach().to(torch::kBFloat16), w.to(torch::kBFloat16), offs));
  EXPECT_TRUE(torch::equal(grouped_linear(x.detach(), w, offs), got));
  EXPECT_TRUE(torch::equal(grouped_linear_input_grad(dy, w, offs), dx));
}

#ifdef MOETRAIN_WITH_CUDA
// The weight-gradient kernel's workspace plan (host code): ≤ 256 MB of fp32 partials plus a small
// counter header whatever the widths; experts too wide for two partial slots get no partials
// (nothing is split), only the header.
TEST(KernelsCpu, GroupedWgradWorkspaceStaysWithinItsBudget) {
  const size_t budget = size_t{256} << 20;
  for (auto [n, k] : {std::pair<int64_t, int64_t>{1024, 1024}, {1024, 512}, {7168, 2048}, {2048, 7168}}) {
    const size_t bytes = kernels::grouped_wgrad_workspace_bytes(98304, 64, n, k);
    EXPECT_GT(bytes, static_cast<size_t>(n * k * 4)) << n << "x" << k << ": room for at least one partial";
    EXPECT_LE(bytes, budget + (size_t{1} << 20)) << n << "x" << k;
  }
  EXPECT_LE(kernels::grouped_wgrad_workspace_bytes(98304, 64, 16384, 16384), size_t{1} << 20)
      << "1 GB a partial: no partials";
}
#endif

// Off the GPU the backward's second stream is no stream: apply_linear is torch::linear (value
// and gradients bit-equal) and WeightGradOverlap runs its work inline.
TEST(KernelsCpu, LinearAndWeightGradOverlapFallBackOnCpu) {
  torch::manual_seed(4);
  auto x = torch::randn({2, 5, 8}).requires_grad_(true), w = torch::randn({3, 8}).requires_grad_(true);
  auto x2 = x.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  const torch::Tensor y = apply_linear(x, w), y2 = torch::linear(x2, w2);
  EXPECT_TRUE(torch::equal(y, y2));
  const torch::Tensor go = torch::randn_like(y);
  y.backward(go);
  y2.backward(go);
  EXPECT_TRUE(torch::equal(x.grad(), x2.grad()));
  EXPECT_TRUE(torch::equal(w.grad(), w2.grad()));

  WeightGradOverlap side(torch::kCPU);
  int calls = 0;
  const torch::Tensor r = side.run([&] {
    ++calls;
    return torch::ones({2});
  });
  side.join();
  EXPECT_EQ(calls, 1);
  EXPECT_TRUE(torch::equal(r, torch::ones({2})));
}

TEST(KernelsCpu, RmsNormFallbackEqualsReferenceAndModule) {
  torch::manual_seed(0);
  auto x = torch::randn({4, 5, 32});
  RMSNorm norm(32, 1e-6);
  {
    torch::NoGradGuard no_grad;
    norm->weight.uniform_(0.5, 1.5);
  }
  const auto ref = rms_norm_reference(x, norm->weight, 1e-6);
  EXPECT_TRUE(torch::equal(rms_norm_fused(x, norm->weight, 1e-6, torch::kFloat32), ref));
  EXPECT_TRUE(torch::equal(norm(x), ref));
  // the math: x / sqrt(mean(x²) + eps) · w
  const auto expect = x / torch::sqrt(x.pow(2).mean(-1, true) + 1e-6) * norm->weight;
  EXPECT_TRUE(torch::allclose(ref, expect, 1e-5, 1e-6));
}

TEST(KernelsCpu, MoePermuteKernelsRefuseCpuTensors) {
  auto x = torch::randn({3, 8});
  EXPECT_FALSE(moe_permute_kernel_ok(x));
  EXPECT_THROW(moe_permute_fused(x, torch::arange(6), 2, torch::kFloat32), std::invalid_argument);
  EXPECT_THROW(moe_unpermute_fused(torch::randn({6, 8}), torch::arange(6), 2, torch::rand({3, 2})), std::invalid_argument);
  // the inverse of a permutation
  const auto order = torch::tensor({2, 0, 3, 1}, torch::kLong);
  EXPECT_TRUE(torch::equal(moe_inverse_order(order), torch::tensor({1, 3, 0, 2}, torch::kLong)));
}
