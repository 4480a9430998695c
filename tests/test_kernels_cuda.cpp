// Fused CUDA kernels against their ATen references, on the GPU (label cuda:
// runs only where a GPU is visible).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "models/kernels/swiglu.h"

using namespace moetrain;

namespace {

// max |a − b| / (|b| + atol): the fused kernel rounds once from fp32, so for bf16
// it must sit within one bf16 ulp (2^-7 relative) of the fp32 result.
double max_rel_err(const torch::Tensor& a, const torch::Tensor& b, double atol) {
  auto a32 = a.to(torch::kFloat32), b32 = b.to(torch::kFloat32);
  return ((a32 - b32).abs() / (b32.abs() + atol)).max().item<double>();
}

}  // namespace

TEST(KernelsCuda, SwigluMatchesReference) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  ASSERT_TRUE(fused_kernels_available()) << "built without MOETRAIN_CUDA";
  for (auto dtype : {torch::kFloat32, torch::kBFloat16}) {
    torch::manual_seed(0);
    auto opts = torch::TensorOptions().device(torch::kCUDA).dtype(dtype);
    auto g = torch::randn({1031, 257}, opts).requires_grad_(true);
    auto u = torch::randn({1031, 257}, opts).requires_grad_(true);
    // reference in fp32 from the same (possibly bf16) inputs
    auto g32 = g.detach().to(torch::kFloat32).requires_grad_(true);
    auto u32 = u.detach().to(torch::kFloat32).requires_grad_(true);
    auto out = swiglu_fused(g, u);
    auto ref = swiglu_reference(g32, u32);
    const double tol = dtype == torch::kFloat32 ? 1e-5 : 1.0 / 128;
    EXPECT_LT(max_rel_err(out, ref, 1e-3), tol) << dtype;
    auto go = torch::randn_like(ref).to(dtype);
    out.backward(go);
    ref.backward(go.to(torch::kFloat32));
    EXPECT_LT(max_rel_err(g.grad(), g32.grad(), 1e-2), 2 * tol) << dtype;
    EXPECT_LT(max_rel_err(u.grad(), u32.grad(), 1e-2), 2 * tol) << dtype;
  }
}
