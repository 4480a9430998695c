// trainer/optim: the device-side gradient norm and the clipping folded into FusedAdamW's
// step, against torch's clip_grad_norm_ + AdamW (CPU; the CUDA kernel path is held to the
// same reference in test_cuda_paths).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "trainer/optim.h"

using namespace moetrain;

namespace {

std::vector<torch::optim::OptimizerParamGroup> groups_of(std::vector<torch::Tensor>& p) {
  auto opt = [](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(wd));
  };
  std::vector<torch::optim::OptimizerParamGroup> g;
  g.emplace_back(std::vector<torch::Tensor>{p[0], p[1]}, opt(0.1));
  g.emplace_back(std::vector<torch::Tensor>{p[2]}, opt(0.0));
  return g;
}

}  // namespace

TEST(Optim, GradNormEqualsClipGradNorm) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> p = {torch::randn({5, 3}, torch::requires_grad()), torch::randn({4}, torch::requires_grad()),
                                  torch::randn({2, 2}, torch::requires_grad())};
  p[0].mutable_grad() = torch::randn({5, 3});
  p[2].mutable_grad() = torch::randn({2, 2}) * 10;  // p[1] has no gradient: skipped
  const double expect = torch::nn::utils::clip_grad_norm_(p, 1e30);
  const torch::Tensor norm = grad_norm(p);
  EXPECT_EQ(norm.dim(), 0);
  EXPECT_NEAR(norm.item<double>(), expect, 1e-5 * expect);
}

TEST(Optim, ClipFoldedIntoStepMatchesClipThenStep) {
  torch::manual_seed(1);
  std::vector<torch::Tensor> a, b;
  for (auto shape : {std::vector<int64_t>{6, 4}, std::vector<int64_t>{3, 2, 2}, std::vector<int64_t>{5}}) {
    torch::Tensor t = torch::randn(shape);
    a.push_back(t.clone().requires_grad_());
    b.push_back(t.clone().requires_grad_());
  }
  FusedAdamW fused(groups_of(a));  // CPU tensors: the reference path, with the folded clip
  torch::optim::AdamW ref(groups_of(b));
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < a.size(); ++i) {
      const torch::Tensor g = torch::randn(a[i].sizes()) * (step + 1);
      a[i].mutable_grad() = g.clone();
      b[i].mutable_grad() = g.clone();
    }
    const double max_norm = step == 2 ? 1e6 : 1.0;  // step 2: no clipping at all
    fused.clip_next_step(grad_norm(a), max_norm);
    torch::nn::utils::clip_grad_norm_(b, max_norm);
    fused.step();
    ref.step();
  }
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-5, 1e-6)) << i;
}
