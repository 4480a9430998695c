// Data parallelism over NCCL on ≥ 2 GPUs (label cuda; skipped with fewer): `moetrain launch
// --nproc 2 -- train` on train.device cuda with distributed.backend nccl (replicated AdamW and
// ZeRO-1) trains what one GPU trains: fp32 losses to float rounding (GPU reductions are
// not bitwise reproducible across batch splits), bf16-autocast losses to bf16 rounding.
#include <gtest/gtest.h>

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

// The tiny launched model (tests/dist_test_util.h) on CUDA, 6 steps.
std::vector<std::string> tiny_cuda_sets(const TempDir& dir, const std::string& run, const std::string& dtype,
                                        int zero_stage) {
  std::vector<std::string> sets = launch_tiny_sets(dir, run, 6);
  sets.insert(sets.end(), {"train.device=cuda", "train.dtype=" + dtype, "distributed.backend=auto",
                        "distributed.timeout_s=120", "distributed.zero_stage=" + std::to_string(zero_stage)});
  return sets;
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
  write_sentence_corpus(dir);
  {
    ExperimentConfig cfg = load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml",
                                                  tiny_cuda_sets(dir, "prep", "fp32", 0));
    PrepareOptions opt;
    opt.progress = false;
    prepare_data(cfg.data, cfg.model.vocab_size, opt);
  }
  for (const std::string dtype : {"fp32", "bf16"}) {
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

}  // namespace
