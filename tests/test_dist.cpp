// Data-parallel training over Gloo on the CPU (trainer/distributed.h, `moetrain launch`):
// two and four ranks train what one process trains (same losses, same router biases),
// torchrun runs the same job, a signal to one rank stops all and resume continues, a
// dying rank fails the whole launch promptly, a malformed launch environment is exit 2,
// and the collectives themselves (two ranks as threads) average, reduce and broadcast.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include <thread>

#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "test_paths.h"
#include "dist_test_util.h"
#include "test_util.h"
#include "trainer/distributed.h"
#include "trainer/experiment_config.h"
#include "trainer/trainer.h"

using namespace moetrain;
using moetrain::testing::debug_cli;
using moetrain::testing::debug_config_path;
using moetrain::testing::listening_port;
using moetrain::testing::launch_tiny_sets;
using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::train_records;
using moetrain::testing::write_sentence_corpus;

namespace {

class Dist : public moetrain::testing::LaunchedTraining {
 protected:
  void SetUp() override { prepare(launch_tiny_sets(dir_, "prep", 8)); }
};

// The same global batch split over ranks instead of micro-steps is the same optimization:
// losses agree to float rounding; the bias update (sign of summed counts) starts identical.
void expect_same_training(const std::vector<nlohmann::json>& one, const std::vector<nlohmann::json>& many, int steps) {
  ASSERT_EQ(one.size(), static_cast<size_t>(steps));
  ASSERT_EQ(many.size(), static_cast<size_t>(steps));
  double max_rel_loss = 0, max_bias = 0;
  for (int s = 0; s < steps; ++s) {
    const double a = one[s]["loss"], b = many[s]["loss"];
    max_rel_loss = std::max(max_rel_loss, std::abs(a - b) / std::abs(a));
    EXPECT_NEAR(a, b, 1e-5 * std::abs(a)) << "step " << s + 1;
    EXPECT_EQ(one[s]["tokens"], many[s]["tokens"]);
    const auto ba = one[s]["bias"][0].get<std::vector<double>>(), bb = many[s]["bias"][0].get<std::vector<double>>();
    ASSERT_EQ(ba.size(), bb.size());
    for (size_t e = 0; e < ba.size(); ++e) {
      max_bias = std::max(max_bias, std::abs(ba[e] - bb[e]));
      if (s < 2)
        EXPECT_EQ(ba[e], bb[e]) << "step " << s + 1 << " expert " << e;  // identical counts, identical signs
      else
        EXPECT_NEAR(ba[e], bb[e], 4e-3) << "step " << s + 1 << " expert " << e;  // a few γ = 1e-3
    }
    double load = 0;
    for (double c : many[s]["expert_load"][0].get<std::vector<double>>()) load += c;
    EXPECT_EQ(load, 8 * 32 * 2) << "the counts of every rank: the whole global batch, top-2";
  }
  std::cerr << "max relative loss difference " << max_rel_loss << ", max bias difference " << max_bias << "\n";
}

TEST_F(Dist, TwoRanksTrainLikeOneProcess) {
  constexpr int kSteps = 8;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), launch_tiny_sets(dir_, "single", kSteps));
  TrainResult single = train(cfg);  // accumulation 4 × micro-batch 2
  ASSERT_EQ(single.steps, kSteps);

  auto t0 = std::chrono::steady_clock::now();
  auto r = launch(2, launch_tiny_sets(dir_, "dp2", kSteps));  // 2 ranks × accumulation 2 × micro-batch 2
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::cerr << "launch --nproc 2: " << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()
            << " s\n";
  EXPECT_NE(r.output.find("done: 8 steps"), std::string::npos) << r.output;
  expect_same_training(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("dp2/metrics.jsonl")),
                       kSteps);
  EXPECT_TRUE(std::filesystem::exists(dir_.file("dp2/ckpt/latest")));
}

TEST_F(Dist, FourRanksTrainLikeOneProcess) {
  constexpr int kSteps = 4;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), launch_tiny_sets(dir_, "single", kSteps));
  train(cfg);                                          // accumulation 4 × micro-batch 2
  auto r = launch(4, launch_tiny_sets(dir_, "dp4", kSteps));  // 4 ranks × 1 micro-batch of 2
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_training(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("dp4/metrics.jsonl")),
                       kSteps);
}

TEST_F(Dist, DyingRankFailsTheLaunchPromptly) {
  auto t0 = std::chrono::steady_clock::now();
  auto r = launch(2, launch_tiny_sets(dir_, "die", 200), "", "MOETRAIN_TEST_INJECT=exit@1:3");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_LT(s, 40.0) << r.output;
  // rank 1 dies first; rank 0 fails on the closed connection or is stopped (either may be reaped first)
  EXPECT_TRUE(r.exit_code == 3 || r.exit_code == 1) << r.output;
  EXPECT_NE(r.output.find("failed with exit code"), std::string::npos) << r.output;
}

// SIGTERM reaching one rank stops every rank at the same step with one checkpoint; a
// relaunch with --resume auto (every rank loads it) continues exactly like one process.
TEST_F(Dist, SignalOnOneRankStopsAllThenResumeMatches) {
  constexpr int kSteps = 6;
  ExperimentConfig cfg = load_experiment_config(debug_config_path(), launch_tiny_sets(dir_, "single", kSteps));
  train(cfg);
  auto r = launch(2, launch_tiny_sets(dir_, "dp", kSteps), "", "MOETRAIN_TEST_INJECT=sigterm@1:3");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("stopped by signal at step 3"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir_.file("dp/ckpt/step-00000003/MANIFEST"))) << r.output;
  std::vector<std::string> sets = launch_tiny_sets(dir_, "dp", kSteps);
  r = run_capture(fmt::format("OMP_NUM_THREADS=1 {} launch --nproc 2 -- train{} --resume auto", MOETRAIN_BINARY, debug_cli(sets)));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_same_training(train_records(dir_.file("single/metrics.jsonl")), train_records(dir_.file("dp/metrics.jsonl")),
                       kSteps);
}

// torchrun --no-python sets the same variables, and hosts the store itself (agent store).
TEST_F(Dist, TorchrunRunsTheSameJob) {
  const std::string torchrun = std::filesystem::path(MOETRAIN_PYTHON).parent_path() / "torchrun";
  if (!std::filesystem::exists(torchrun)) GTEST_SKIP() << "no " << torchrun;
  constexpr int kSteps = 4;
  auto r = launch(2, launch_tiny_sets(dir_, "launch", kSteps));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_capture(fmt::format("OMP_NUM_THREADS=1 {} --standalone --nproc-per-node 2 --no-python {} train{}", torchrun,
                              MOETRAIN_BINARY, debug_cli(launch_tiny_sets(dir_, "torchrun", kSteps))));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto a = train_records(dir_.file("launch/metrics.jsonl")), b = train_records(dir_.file("torchrun/metrics.jsonl"));
  ASSERT_EQ(a.size(), b.size());
  for (size_t s = 0; s < a.size(); ++s) EXPECT_EQ(a[s]["loss"], b[s]["loss"]) << "step " << s + 1;
}

// SIGTERM to `launch` itself is forwarded: the ranks save one checkpoint and exit 0.
TEST_F(Dist, SigtermToLaunchStopsTheJobGracefully) {
  const std::string cmd = fmt::format("OMP_NUM_THREADS=1 {} launch --nproc 2 -- train{}", MOETRAIN_BINARY,
                                      debug_cli(launch_tiny_sets(dir_, "term", 400)));
  // once step 1 is logged, every rank has its signal handlers
  auto r = run_capture("sh -c '" + cmd + " & pid=$!; i=0; while [ ! -s " + dir_.file("term/metrics.jsonl") +
                       " ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done; kill -TERM $pid; wait $pid'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("stopped by signal at step"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(dir_.file("term/ckpt/latest"))) << r.output;
}

TEST(DistEnv, MalformedEnvironmentIsExit2) {
  auto r = run_capture(fmt::format("WORLD_SIZE=abc {} train {}", MOETRAIN_BINARY, debug_config_path()));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("WORLD_SIZE='abc'"), std::string::npos) << r.output;
  r = run_capture(fmt::format("WORLD_SIZE=2 RANK=2 {} train {}", MOETRAIN_BINARY, debug_config_path()));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("RANK=2 must be below WORLD_SIZE=2"), std::string::npos) << r.output;
}

TEST(DistEnv, LaunchUsage) {
  auto r = run_capture(fmt::format("{} launch --help", MOETRAIN_BINARY));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--nproc"), std::string::npos);
  EXPECT_EQ(run_capture(fmt::format("{} launch -- train x.yaml", MOETRAIN_BINARY)).exit_code, 2);
  EXPECT_EQ(run_capture(fmt::format("{} launch --nproc two -- train x.yaml", MOETRAIN_BINARY)).exit_code, 2);
  EXPECT_EQ(run_capture(fmt::format("{} launch --nproc 2", MOETRAIN_BINARY)).exit_code, 2);
}

// Two ranks as two threads of this process: bucketed averaging over several buckets and
// dtypes, gradients missing on one rank (zeros there) or on both (stay missing), MAX, broadcast.
TEST(DistGroup, AverageGradientsAllReduceBroadcast) {
  const std::pair<int, int> listening = listening_port();
  const int listen_fd = listening.first, port = listening.second;
  std::vector<std::vector<torch::Tensor>> params(2);
  std::vector<torch::Tensor> maxed(2), bcast(2);
  auto rank_main = [&](int64_t rank) {
    DistEnv env;
    env.rank = rank;
    env.world_size = 2;
    env.master_port = port;
    if (rank == 0) env.master_listen_fd = listen_fd;
    ProcessGroup pg(env, "gloo", std::chrono::seconds(30));
    const double r = static_cast<double>(rank);
    auto& p = params[static_cast<size_t>(rank)];
    p = {torch::zeros({3, 4}).requires_grad_(), torch::zeros({5}, torch::kFloat64).requires_grad_(),
         torch::zeros({7}).requires_grad_(), torch::zeros({2}).requires_grad_()};
    p[0].mutable_grad() = torch::full({3, 4}, 1.0 + r);
    p[1].mutable_grad() = torch::arange(5, torch::kFloat64) * (r + 1.0);
    if (rank == 0) p[2].mutable_grad() = torch::full({7}, 4.0);  // rank 1: no gradient (an unused expert)
    // p[3]: no gradient anywhere
    pg.average_gradients(p, /*bucket_bytes=*/16);  // several buckets
    maxed[static_cast<size_t>(rank)] = torch::tensor({r, -r, 3.0});
    pg.all_reduce(maxed[static_cast<size_t>(rank)], ReduceOp::kMax);
    bcast[static_cast<size_t>(rank)] = torch::full({3}, 10.0 + r);
    pg.broadcast({bcast[static_cast<size_t>(rank)]}, /*root=*/1);
    pg.barrier();
  };
  std::string errors[2];
  auto guarded = [&](int64_t rank) {
    try {
      rank_main(rank);
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread t1(guarded, 1);
  guarded(0);
  t1.join();
  ASSERT_EQ(errors[0] + errors[1], "");
  for (int rank = 0; rank < 2; ++rank) {
    const auto& p = params[static_cast<size_t>(rank)];
    EXPECT_TRUE(torch::equal(p[0].grad(), torch::full({3, 4}, 1.5))) << rank;
    EXPECT_TRUE(torch::equal(p[1].grad(), torch::arange(5, torch::kFloat64) * 1.5)) << rank;
    ASSERT_TRUE(p[2].grad().defined()) << rank;
    EXPECT_TRUE(torch::equal(p[2].grad(), torch::full({7}, 2.0))) << rank;
    EXPECT_FALSE(p[3].grad().defined()) << rank;
    EXPECT_TRUE(torch::equal(maxed[static_cast<size_t>(rank)], torch::tensor({1.0, 0.0, 3.0}))) << rank;
    EXPECT_TRUE(torch::equal(bcast[static_cast<size_t>(rank)], torch::full({3}, 11.0))) << rank;
  }
}

TEST(DistEnv, SingleProcessGroupIsANoOp) {
  ProcessGroup pg(DistEnv{}, "gloo", std::chrono::seconds(1));
  torch::Tensor t = torch::ones({3});
  pg.all_reduce(t);
  pg.barrier();
  EXPECT_TRUE(torch::equal(t, torch::ones({3})));
  EXPECT_EQ(pg.world_size(), 1);
}

}  // namespace
