// Fused CUDA kernels against their ATen references, on the GPU (label cuda:
// runs only where a GPU is visible).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "models/kernels/swiglu.h"

using namespace moetrain;

TEST(KernelsCuda, SwigluMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(0);
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
    auto g1 = torch::randn({1031, 257}, opts).requires_grad_(true);
    auto u1 = torch::randn({1031, 257}, opts).requires_grad_(true);
    auto g2 = g1.detach().clone().requires_grad_(true);
    auto u2 = u1.detach().clone().requires_grad_(true);
    auto out_fused = swiglu_fused(g1, u1);
    auto out_ref = swiglu_reference(g2, u2);
    double tol = dtype == torch::kFloat32 ? 1e-5 : 2e-2;
    EXPECT_LT((out_fused.to(torch::kFloat32) - out_ref.to(torch::kFloat32)).abs().max().item<double>(), tol);
    auto go = torch::randn_like(out_ref);
    out_fused.backward(go);
    out_ref.backward(go);
    EXPECT_LT((g1.grad().to(torch::kFloat32) - g2.grad().to(torch::kFloat32)).abs().max().item<double>(), tol * 4);
    EXPECT_LT((u1.grad().to(torch::kFloat32) - u2.grad().to(torch::kFloat32)).abs().max().item<double>(), tol * 4);
  }
}
