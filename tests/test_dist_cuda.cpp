// Data parallelism over NCCL on ≥ 2 GPUs (label cuda; skipped with fewer): `moetrain launch
// --nproc 2 -- train` on train.device cuda with distributed.backend nccl (replicated AdamW and
// ZeRO-1) trains what one GPU trains: fp32 losses to float rounding (GPU reductions are
// not bitwise reproducible across batch splits), bf16-autocast losses to bf16 rounding, bf16
// weights with fp32 masters (train.param_dtype bf16, "bf16w" below) to bf16 rounding.
// On one GPU: bf16 weights train like bf16 autocast over fp32 weights, and their checkpoints
// hold the fp32 masters, from which a stopped run resumes.
#include <gtest/gtest.h>

#include "io/safetensors.h"

#include <cmath>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "dist_test_util.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using namespace moetrain;
using moetrain::testing::debug_cli;
using moetrain::testing::launch_tiny_sets;
using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::write_sentence_corpus;

namespace {

// The tiny launched model (tests/dist_test_util.h) on CUDA, 6 steps; dtype fp32, bf16 or
// bf16w (bf16 autocast with bf16 weights: train.param_dtype bf16).
std::vector<std::string> tiny_cuda_sets(const TempDir& dir, const std::string& run, const std::string& dtype,
                                        int zero_stage) {
  std::vector<std::string> sets = launch_tiny_sets(dir, run, 6);
  const bool bf16w = dtype == "bf16w";
  sets.insert(sets.end(), {"train.device=cuda", "train.dtype=" + std::string(bf16w ? "bf16" : dtype),
                           std::string("train.param_dtype=") + (bf16w ? "bf16" : "fp32"), "distributed.backend=auto",
                           "distributed.timeout_s=120", "distributed.zero_stage=" + std::to_string(zero_stage)});
  return sets;
}

void prepare_tiny(const TempDir& dir) {
  write_sentence_corpus(dir);
  ExperimentConfig cfg = load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml",
                                                tiny_cuda_sets(dir, "prep", "fp32", 0));
  PrepareOptions opt;
  opt.progress = false;
  prepare_data(cfg.data, cfg.model.vocab_size, opt);
}

std::vector<double> losses(const std::string& path) {
  std::ifstream in(path);
  std::vector<double> out;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.value("kind", "") != "eval") out.push_back(j["loss"].get<double>());
  }
  return out;
}

TEST(DistCuda, TwoGpusOverNcclTrainLikeOne) {
  if (!torch::cuda::is_available() || torch::cuda::device_count() < 2)
    GTEST_SKIP() << "needs 2 CUDA devices, " << (torch::cuda::is_available() ? torch::cuda::device_count() : 0)
                 << " visible";
  TempDir dir;
  prepare_tiny(dir);
  for (const std::string dtype : {"fp32", "bf16", "bf16w"}) {
    const double tol = dtype == "fp32" ? 1e-4 : 2e-2;  // relative
    const std::string one = "one_" + dtype;
    auto r = run_capture(fmt::format("CUDA_VISIBLE_DEVICES=0 {} train{}", MOETRAIN_BINARY,
                                     debug_cli(tiny_cuda_sets(dir, one, dtype, 0))));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto ref = losses(dir.file(one + "/metrics.jsonl"));
    ASSERT_EQ(ref.size(), 6u);
    for (int zero : {0, 1}) {
      const std::string run = fmt::format("two_{}_zero{}", dtype, zero);
      r = run_capture(fmt::format("{} launch --nproc 2 -- train{}", MOETRAIN_BINARY,
                                  debug_cli(tiny_cuda_sets(dir, run, dtype, zero))));
      ASSERT_EQ(r.exit_code, 0) << r.output;
      EXPECT_NE(r.output.find("nccl"), std::string::npos) << "the backend is named in the banner: " << r.output;
      const auto got = losses(dir.file(run + "/metrics.jsonl"));
      ASSERT_EQ(got.size(), ref.size()) << r.output;
      for (size_t s = 0; s < ref.size(); ++s)
        EXPECT_NEAR(got[s], ref[s], tol * std::abs(ref[s])) << dtype << " zero_stage " << zero << " step " << s + 1;
    }
  }
}

TEST(Bf16WeightsCuda, TrainLikeAutocastAndResumeFromFp32Masters) {
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  TempDir dir;
  prepare_tiny(dir);
  auto train = [&](const std::string& run, const std::string& dtype, const std::string& prefix = "",
                   const std::string& extra = "") {
    auto r = run_capture(fmt::format("{}CUDA_VISIBLE_DEVICES=0 {} train{}{}", prefix, MOETRAIN_BINARY,
                                     debug_cli(tiny_cuda_sets(dir, run, dtype, 0)), extra));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return losses(dir.file(run + "/metrics.jsonl"));
  };
  const auto autocast = train("autocast", "bf16"), weights = train("weights", "bf16w");
  ASSERT_EQ(autocast.size(), 6u);
  ASSERT_EQ(weights.size(), 6u);
  for (size_t s = 0; s < 6; ++s) EXPECT_NEAR(weights[s], autocast[s], 3e-2 * autocast[s]) << "step " << s + 1;
  EXPECT_LT(weights.back(), weights.front()) << "it learns";

  // stopped by SIGTERM after step 3 (checkpoint), then resumed to step 6
  train("resumed", "bf16w", "MOETRAIN_TEST_INJECT=sigterm:3 ");
  const auto resumed = train("resumed", "bf16w", "", " --resume auto");
  ASSERT_EQ(resumed.size(), 6u);
  for (size_t s = 0; s < 6; ++s) EXPECT_NEAR(resumed[s], weights[s], 2e-3 * weights[s]) << "step " << s + 1;
  // the checkpoint holds fp32 masters: off the bf16 grid
  const SafetensorsFile f = read_safetensors(dir.file("resumed/ckpt/step-00000003/model.safetensors"));
  const torch::Tensor w = f.at("head.weight");
  EXPECT_EQ(w.scalar_type(), torch::kFloat);
  EXPECT_FALSE(torch::equal(w, w.to(torch::kBFloat16).to(torch::kFloat))) << "bf16-rounded weights were saved";
}

TEST(CudaGraphCuda, CapturedStepTrainsLikeEagerAndResumes) {
  // train.cuda_graph: the forward + backward of 4 micro-steps captured at the first step and
  // replayed; the same losses as the eager step (the same kernels), also after a resume. With an
  // MTP module whose λ switches at step 3 (the graph reads λ from the device).
  ASSERT_TRUE(torch::cuda::is_available()) << "cuda-labelled test needs a GPU";
  TempDir dir;
  prepare_tiny(dir);
  auto train = [&](const std::string& run, bool graph, const std::string& prefix = "", const std::string& extra = "") {
    std::vector<std::string> sets = tiny_cuda_sets(dir, run, "bf16w", 0);
    sets.insert(sets.end(), {std::string("train.cuda_graph=") + (graph ? "true" : "false"),
                             "model.num_nextn_predict_layers=1", "train.mtp_loss_weight_switch_step=3"});
    auto r = run_capture(fmt::format("{}CUDA_VISIBLE_DEVICES=0 {} train{}{}", prefix, MOETRAIN_BINARY, debug_cli(sets),
                                     extra));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return losses(dir.file(run + "/metrics.jsonl"));
  };
  const auto eager = train("eager", false), graphed = train("graphed", true);
  ASSERT_EQ(eager.size(), 6u);
  ASSERT_EQ(graphed.size(), 6u);
  for (size_t s = 0; s < 6; ++s) EXPECT_NEAR(graphed[s], eager[s], 2e-3 * eager[s]) << "step " << s + 1;
  EXPECT_LT(graphed.back(), graphed.front()) << "it learns";

  train("resumed", true, "MOETRAIN_TEST_INJECT=sigterm:3 ");
  const auto resumed = train("resumed", true, "", " --resume auto");
  ASSERT_EQ(resumed.size(), 6u);
  for (size_t s = 0; s < 6; ++s) EXPECT_NEAR(resumed[s], graphed[s], 2e-3 * graphed[s]) << "step " << s + 1;
}

}  // namespace
