// Next-token sampling (models/sampling.h): greedy, temperature, top-k and top-p
// against hand-computed distributions, and seeded draws against the probabilities.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <vector>

#include "models/sampling.h"

using namespace moetrain;

namespace {

torch::Tensor logits_of(const std::vector<double>& probs) { return torch::tensor(probs, torch::kDouble).log(); }

void expect_probs(const torch::Tensor& got, const std::vector<double>& want) {
  ASSERT_EQ(got.size(0), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[static_cast<int64_t>(i)].item<double>(), want[i], 1e-12) << i;
}

}  // namespace

TEST(Sampling, HandComputedFilters) {
  const torch::Tensor l = logits_of({0.15, 0.5, 0.05, 0.3});
  SamplingOptions o;
  o.temperature = 1.0;
  expect_probs(sampling_probs(l, o), {0.15, 0.5, 0.05, 0.3});
  o.top_k = 2;  // {0.5, 0.3} renormalized
  expect_probs(sampling_probs(l, o), {0.0, 0.625, 0.0, 0.375});
  o.top_k = 0;
  o.top_p = 0.79;  // 0.5 + 0.3 reaches 0.79: the nucleus stops there
  expect_probs(sampling_probs(l, o), {0.0, 0.625, 0.0, 0.375});
  o.top_p = 0.81;  // needs the 0.15 too
  expect_probs(sampling_probs(l, o), {0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95});
  o.top_p = 0.1;  // never empty: the most likely token alone
  expect_probs(sampling_probs(l, o), {0.0, 1.0, 0.0, 0.0});
  o.top_p = 1.0;
  o.temperature = 2.0;  // p^(1/2), renormalized
  const double z = std::sqrt(0.15) + std::sqrt(0.5) + std::sqrt(0.05) + std::sqrt(0.3);
  expect_probs(sampling_probs(l, o), {std::sqrt(0.15) / z, std::sqrt(0.5) / z, std::sqrt(0.05) / z, std::sqrt(0.3) / z});
  // top-k first, then top-p on the renormalized rest: after top-3 the two best hold
  // 0.8/0.95 = 0.842 >= 0.83, so 0.15 goes (on the raw probabilities 0.8 < 0.83 would keep it).
  o.top_k = 3;
  o.temperature = 1.0;
  o.top_p = 0.83;
  expect_probs(sampling_probs(l, o), {0.0, 0.625, 0.0, 0.375});
}

TEST(Sampling, GreedyAndSeededDraws) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(123);
  const torch::Tensor l = logits_of({0.15, 0.5, 0.05, 0.3}).to(torch::kFloat);
  EXPECT_EQ(sample_token(l, SamplingOptions{}, gen), 1);
  SamplingOptions o;
  o.temperature = 1.0;
  std::vector<double> freq(4, 0.0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) freq[static_cast<size_t>(sample_token(l, o, gen))] += 1.0 / n;
  const std::vector<double> p = {0.15, 0.5, 0.05, 0.3};
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(freq[i], p[i], 0.015) << i;
  // Same seed, same draws.
  at::Generator a = at::make_generator<at::CPUGeneratorImpl>(5), b = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(sample_token(l, o, a), sample_token(l, o, b));
  o.top_k = 1;  // top-1 sampling is greedy
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(l, o, gen), 1);
}
