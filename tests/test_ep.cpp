// Expert parallelism (trainer/expert_parallel.h) on the CPU over Gloo: the differentiable
// all-to-all against a single-process reference; a whole model sharded over 2 and 4 ranks
// (ranks as threads) gives the single-process outputs, and after the gradient reduction the
// single-process gradients and norm; group-limited routing with n_group = ep_size keeps each
// token on one rank; `moetrain launch` runs with ep_size 2 and DP 2 × EP 2 train like one
// process, and an ep 2 checkpoint resumes at ep 1 and at ep 4 / world 4 and exports.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "io/safetensors.h"
#include "models/lm_loss.h"
#include "models/moe.h"
#include "models/transformer.h"
#include "test_paths.h"
#include "dist_test_util.h"
#include "test_util.h"
#include "trainer/experiment_config.h"
#include "trainer/expert_parallel.h"
#include "trainer/trainer.h"

using namespace moetrain;
using moetrain::testing::run_capture;
using moetrain::testing::debug_cli;
using moetrain::testing::debug_config_path;
using moetrain::testing::launch_tiny_sets;
using moetrain::testing::run_ranks;
using moetrain::testing::train_records;
using moetrain::testing::write_sentence_corpus;
using moetrain::testing::TempDir;

namespace {

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

// Rank r sends split[r][d] rows to rank d (a zero split included); the reference builds the
// same exchange with narrow + cat in one process. Outputs and input gradients agree exactly.
TEST(EpAllToAll, ForwardAndBackwardMatchSingleProcess) {
  torch::manual_seed(0);
  const std::vector<std::vector<int64_t>> split = {{2, 3}, {0, 4}};
  std::vector<torch::Tensor> x = {torch::randn({5, 3}, torch::kDouble), torch::randn({4, 3}, torch::kDouble)};
  std::vector<torch::Tensor> w = {torch::randn({2, 3}, torch::kDouble), torch::randn({7, 3}, torch::kDouble)};
  // reference: y_d = cat_r x_r[rows for d]
  std::vector<torch::Tensor> xr = {x[0].clone().requires_grad_(), x[1].clone().requires_grad_()}, yr(2);
  for (int64_t d = 0; d < 2; ++d) {
    std::vector<torch::Tensor> parts;
    for (int64_t r = 0; r < 2; ++r) {
      int64_t off = 0;
      for (int64_t k = 0; k < d; ++k) off += split[r][k];
      parts.push_back(xr[r].narrow(0, off, split[r][d]));
    }
    yr[d] = torch::cat(parts);
  }
  ((yr[0] * w[0]).sum() + (yr[1] * w[1]).sum()).backward();

  std::vector<torch::Tensor> y(2), gx(2);
  const std::string errors = run_ranks(2, [&](int64_t r, ProcessGroup& pg) {
    const torch::Tensor xi = x[r].clone().requires_grad_();
    std::vector<int64_t> recv = {split[0][r], split[1][r]};
    const torch::Tensor yi = ep_all_to_all(pg, xi, split[r], recv);
    (yi * w[r]).sum().backward();
    y[r] = yi.detach();
    gx[r] = xi.grad();
  });
  ASSERT_EQ(errors, "");
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_TRUE(torch::equal(y[r], yr[r].detach())) << r;
    EXPECT_TRUE(torch::equal(gx[r], xr[r].grad())) << r;
  }
}

namespace {

ModelConfig tiny_model() {
  ModelConfig cfg;
  cfg.vocab_size = 64;
  cfg.hidden_size = 32;
  cfg.num_hidden_layers = 2;
  cfg.num_attention_heads = 2;
  cfg.intermediate_size = 48;
  cfg.moe_intermediate_size = 16;
  cfg.kv_lora_rank = 16;
  cfg.qk_nope_head_dim = 8;
  cfg.qk_rope_head_dim = 8;
  cfg.v_head_dim = 8;
  cfg.n_routed_experts = 8;
  cfg.n_shared_experts = 1;
  cfg.num_experts_per_tok = 2;
  cfg.num_nextn_predict_layers = 1;  // the MTP module's MoE layer is sharded too
  cfg.init_std = 0.2;
  return cfg;
}

torch::Tensor model_loss(Transformer& model, const torch::Tensor& tokens, const torch::Tensor& targets) {
  ForwardOut out = model->forward(tokens, /*with_mtp=*/true);
  return lm_head_loss(model, out.hidden, targets, 1 << 20) +
         torch::stack(mtp_head_losses(model, out, targets, 1 << 20)).mean();
}

// `world` ranks with ep_size `ep`, each with its own 2 sequences, against one process on all
// of them: the same loss, and after reduce_gradients the same gradients (experts: the
// rank's rows) and the same clipping norm.
void expect_sharded_model_matches(int64_t world, int64_t ep) {
  torch::set_num_threads(1);
  const ModelConfig cfg = tiny_model();
  const int64_t B = 2, T = 8;
  torch::manual_seed(1);
  const torch::Tensor tokens = torch::randint(cfg.vocab_size, {world * B, T}, torch::kLong);
  const torch::Tensor targets = torch::randint(cfg.vocab_size, {world * B, T}, torch::kLong);
  std::vector<Transformer> models;
  for (int64_t r = 0; r <= world; ++r) {  // models[world]: the reference
    torch::manual_seed(0);
    models.emplace_back(cfg);
    models.back()->to(torch::kDouble);
  }
  Transformer& ref = models.back();
  const torch::Tensor ref_loss = model_loss(ref, tokens, targets);
  ref_loss.backward();
  double ref_norm = 0;
  for (const auto& p : ref->parameters())
    if (p.grad().defined()) ref_norm += p.grad().pow(2).sum().item<double>();
  ref_norm = std::sqrt(ref_norm);

  std::vector<double> losses(static_cast<size_t>(world)), norms(static_cast<size_t>(world));
  const std::string errors = run_ranks(world, [&](int64_t r, ProcessGroup& pg) {
    Transformer& m = models[static_cast<size_t>(r)];
    ExpertParallel ep_(pg, ep);
    ep_.shard(m);
    const torch::Tensor loss = model_loss(m, tokens.narrow(0, r * B, B), targets.narrow(0, r * B, B));
    loss.backward();
    torch::Tensor sum = loss.detach().clone();
    pg.all_reduce(sum);
    losses[static_cast<size_t>(r)] = sum.item<double>() / static_cast<double>(world);
    ep_.reduce_gradients();
    norms[static_cast<size_t>(r)] = ep_.grad_norm().item<double>();
  });
  ASSERT_EQ(errors, "");
  const auto ref_params = ref->named_parameters();
  const int64_t per = cfg.n_routed_experts / ep;
  for (int64_t r = 0; r < world; ++r) {
    EXPECT_NEAR(losses[static_cast<size_t>(r)], ref_loss.item<double>(), 1e-12) << r;
    EXPECT_NEAR(norms[static_cast<size_t>(r)], ref_norm, 1e-9 * ref_norm) << r;
    int64_t n_expert_params = 0;
    for (const auto& p : models[static_cast<size_t>(r)]->named_parameters()) {
      torch::Tensor want = ref_params[p.key()].grad();
      if (ep_is_expert_param(p.key())) {
        ++n_expert_params;
        ASSERT_EQ(p.value().size(0), per) << p.key();
        want = want.narrow(0, (r % ep) * per, per);
      }
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
      EXPECT_LT(max_diff(p.value().grad(), want), 1e-12) << "rank " << r << " " << p.key();
    }
    EXPECT_EQ(n_expert_params, 2 * 2) << "w13, w2 of the MoE layer and of the MTP block";
  }
}

}  // namespace

TEST(EpModel, TwoRanksEp2MatchOneProcess) { expect_sharded_model_matches(2, 2); }
TEST(EpModel, FourRanksDp2Ep2MatchOneProcess) { expect_sharded_model_matches(4, 2); }
TEST(EpModel, FourRanksEp4MatchOneProcess) { expect_sharded_model_matches(4, 4); }

// Group-limited routing with n_group = ep_size and topk_group = 1: expert group g is shard g,
// so every token's top-k rows go to one EP rank (DeepSeek-V3's node-limited routing).
TEST(EpRouting, OneGroupPerTokenIsOneRank) {
  torch::manual_seed(0);
  ModelConfig cfg = tiny_model();
  cfg.n_routed_experts = 16;
  cfg.num_experts_per_tok = 4;
  const int64_t ep = 4;
  cfg.n_group = ep;
  cfg.topk_group = 1;
  Router router(cfg);
  const RoutingStats rs = router(torch::randn({256, cfg.hidden_size}));
  const torch::Tensor rank = torch::div(rs.topk_idx, cfg.n_routed_experts / ep, "floor");  // [N, K]
  EXPECT_TRUE(torch::equal(rank, rank.select(1, 0).unsqueeze(1).expand_as(rank)));
  EXPECT_GT(std::get<0>(torch::_unique(rank.select(1, 0))).numel(), 1) << "tokens do use several ranks";
  cfg.topk_group = 2;  // two groups: at most two ranks
  Router two(cfg);
  const RoutingStats rs2 = two(torch::randn({256, cfg.hidden_size}));
  const torch::Tensor r2 = torch::div(rs2.topk_idx, cfg.n_routed_experts / ep, "floor");
  for (int64_t n = 0; n < r2.size(0); ++n) EXPECT_LE(std::get<0>(torch::_unique(r2[n])).numel(), 2);
}

// --- whole runs through `moetrain launch` -----------------------------------------------------

namespace {

// The tiny launched model (tests/dist_test_util.h) with clipping, checkpoints every 3 steps
// and the given ep_size.
std::vector<std::string> tiny_sets(const TempDir& dir, const std::string& run, int steps, int ep) {
  std::vector<std::string> sets = launch_tiny_sets(dir, run, steps);
  sets.insert(sets.end(), {"optim.grad_clip=0.5", "checkpoint.every=3", "checkpoint.keep_last=10",
                        "distributed.ep_size=" + std::to_string(ep)});
  return sets;
}

// Steps [first, first + n) of `many` against the same steps of `one`: losses to float
// rounding, the bias identical for the first two steps of a run (then within a few γ).
void expect_same_steps(const std::vector<nlohmann::json>& one, const std::vector<nlohmann::json>& many, int first,
                       int n, bool exact_bias_start) {
  ASSERT_GE(one.size(), static_cast<size_t>(first + n));
  ASSERT_EQ(many.size(), static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) {
    const auto& a = one[static_cast<size_t>(first + i)];
    const auto& b = many[static_cast<size_t>(i)];
    ASSERT_EQ(a["step"], b["step"]);
    EXPECT_NEAR(a["loss"].get<double>(), b["loss"].get<double>(), 1e-5 * std::abs(a["loss"].get<double>()))
        << "step " << a["step"];
    EXPECT_NEAR(a["grad_norm"].get<double>(), b["grad_norm"].get<double>(), 1e-4 * a["grad_norm"].get<double>())
        << "step " << a["step"];
    for (size_t l = 0; l < a["bias"].size(); ++l) {
      const auto ba = a["bias"][l].get<std::vector<double>>(), bb = b["bias"][l].get<std::vector<double>>();
      for (size_t e = 0; e < ba.size(); ++e) {
        if (exact_bias_start && i < 2)
          EXPECT_EQ(ba[e], bb[e]) << "step " << a["step"] << " layer " << l << " expert " << e;
        else
          EXPECT_NEAR(ba[e], bb[e], 4e-3) << "step " << a["step"] << " layer " << l << " expert " << e;
      }
    }
    if (exact_bias_start && i < 2) {  // later, rounding may flip a close routing decision
      EXPECT_EQ(a["expert_load"], b["expert_load"]) << "step " << a["step"] << ": global counts of every expert";
    }
  }
}

class EpTrain : public moetrain::testing::LaunchedTraining {
 protected:
  void SetUp() override { prepare(tiny_sets(dir_, "prep", 6, 1)); }
};

}  // namespace

// ep_size 2 on 2 ranks trains like one process; its step-3 checkpoint (one file pair per
// shard, all in the MANIFEST) resumes at ep 1 in one process and at ep 4 on 4 ranks with
// the uninterrupted run's losses, and exports the same HF checkpoint as the one-process run.
TEST_F(EpTrain, Ep2TrainsLikeOneProcessAndReshardsOnResume) {
  constexpr int kSteps = 6;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), tiny_sets(dir_, "single", kSteps, 1));
  ASSERT_EQ(train(cfg).steps, kSteps);
  const auto one = train_records(dir_.file("single/metrics.jsonl"));

  auto r = launch(2, tiny_sets(dir_, "ep2", kSteps, 2));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_steps(one, train_records(dir_.file("ep2/metrics.jsonl")), 0, kSteps, true);
  const std::string ckpt = dir_.file("ep2/ckpt/step-00000003");
  std::ifstream manifest(ckpt + "/MANIFEST");
  const std::string listed((std::istreambuf_iterator<char>(manifest)), std::istreambuf_iterator<char>());
  for (const char* f : {"experts-00000-00004.safetensors", "experts-00004-00008.safetensors",
                        "optimizer-experts-00000-00004.safetensors", "optimizer-experts-00004-00008.safetensors"})
    EXPECT_NE(listed.find(f), std::string::npos) << f << " in\n" << listed;
  EXPECT_FALSE(read_safetensors(ckpt + "/model.safetensors").contains("layers.1.ffn.experts.w13"));

  // ep 2 -> ep 1 (one process)
  ExperimentConfig cfg1 = load_experiment_config(debug_config_path(), tiny_sets(dir_, "ep1", kSteps, 1));
  TrainOptions resume;
  resume.resume = ckpt;
  ASSERT_EQ(train(cfg1, resume).steps, kSteps);
  expect_same_steps(one, train_records(dir_.file("ep1/metrics.jsonl")), 3, kSteps - 3, false);

  // ep 2 -> ZeRO-1 on 2 ranks (no expert parallelism): the expert shards' AdamW rows are
  // re-assembled as element ranges of the flat space
  std::vector<std::string> zero_sets = tiny_sets(dir_, "zero", kSteps, 1);
  zero_sets.push_back("distributed.zero_stage=1");
  r = launch(2, zero_sets, " --resume " + ckpt);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_steps(one, train_records(dir_.file("zero/metrics.jsonl")), 3, kSteps - 3, false);

  // ep 2 -> ep 4 on 4 ranks
  r = launch(4, tiny_sets(dir_, "ep4", kSteps, 4), " --resume " + ckpt);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_steps(one, train_records(dir_.file("ep4/metrics.jsonl")), 3, kSteps - 3, false);
  EXPECT_TRUE(std::filesystem::exists(dir_.file("ep4/ckpt/step-00000006/experts-00006-00008.safetensors")));

  // export gathers every shard into one HF checkpoint: the one-process run's, to float rounding
  for (const char* run : {"single", "ep2"}) {
    r = run_capture(fmt::format("{} export {} --format hf --out {}", MOETRAIN_BINARY,
                                dir_.file(std::string(run) + "/ckpt"), dir_.file(std::string(run) + "-hf")));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  const SafetensorsFile a = read_safetensors(dir_.file("single-hf/model.safetensors"));
  const SafetensorsFile b = read_safetensors(dir_.file("ep2-hf/model.safetensors"));
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  int experts = 0;
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.contains(name)) << name;
    EXPECT_LT(max_diff(t, b.at(name)), 1e-4) << name;
    experts += name.find(".mlp.experts.") != std::string::npos;
  }
  EXPECT_GT(experts, 0) << "the MoE layer's experts are exported";

  // the MANIFEST covers the shards: one missing makes the checkpoint incomplete
  std::filesystem::remove(dir_.file("ep2/ckpt/step-00000006/experts-00004-00008.safetensors"));
  try {
    resolve_checkpoint_arg(dir_.file("ep2/ckpt/step-00000006"));
    ADD_FAILURE() << "a checkpoint with a missing shard verified";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("experts-00004-00008.safetensors is missing"), std::string::npos) << e.what();
  }
}

// DP 2 × EP 2 on 4 ranks (two EP groups, two EDP groups) trains like one process.
TEST_F(EpTrain, Dp2Ep2TrainsLikeOneProcess) {
  constexpr int kSteps = 3;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), tiny_sets(dir_, "single", kSteps, 1));
  train(cfg);
  auto r = launch(4, tiny_sets(dir_, "dp2ep2", kSteps, 2));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_steps(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("dp2ep2/metrics.jsonl")), 0,
                    kSteps, true);
}

// A ZeRO-1 checkpoint (optimizer-zero-* shards) resumes with ep 2: each rank takes its
// experts' rows of the re-assembled moments.
TEST_F(EpTrain, ZeroCheckpointResumesWithEp2) {
  constexpr int kSteps = 6;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), tiny_sets(dir_, "single", kSteps, 1));
  train(cfg);
  std::vector<std::string> zero_sets = tiny_sets(dir_, "zero", kSteps, 1);
  zero_sets.push_back("distributed.zero_stage=1");
  auto r = launch(2, zero_sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ckpt = dir_.file("zero/ckpt/step-00000003");
  ASSERT_TRUE(std::filesystem::exists(ckpt + "/optimizer-zero-00001-of-00002.safetensors"));
  r = launch(2, tiny_sets(dir_, "ep2", kSteps, 2), " --resume " + ckpt);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_steps(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("ep2/metrics.jsonl")), 3,
                    kSteps - 3, false);
}

// ZeRO-1 together with expert parallelism is refused by the config check.
TEST_F(EpTrain, ZeroWithEpIsRefused) {
  std::vector<std::string> sets = tiny_sets(dir_, "bad", 2, 2);
  sets.push_back("distributed.zero_stage=1");
  try {
    load_experiment_config(debug_config_path(), sets);
    ADD_FAILURE() << "zero_stage 1 with ep_size 2 was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("distributed.zero_stage"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cannot be combined with expert parallelism"), std::string::npos) << e.what();
  }
}

TEST_F(EpTrain, EpSizeMustDivideTheWorld) {
  auto r = launch(2, tiny_sets(dir_, "bad", 2, 4));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("ep_size 4 must divide the world size 2"), std::string::npos) << r.output;
}
