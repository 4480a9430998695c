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
#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using namespace moetrain;
using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

void write_corpus(const TempDir& dir) {
  const char* subjects[] = {"the cat", "a dog", "the bird", "my friend"};
  const char* verbs[] = {"sat on", "looked at", "jumped over", "walked to"};
  const char* objects[] = {"the mat.", "the tree.", "a box.", "the door."};
  for (int doc = 0; doc < 6; ++doc) {
    std::string s;
    for (int i = 0; i < 300; ++i) {
      int k = (i * 7 + doc * 3) % 64;
      s += std::string(subjects[k % 4]) + " " + verbs[(k / 4) % 4] + " " + objects[(k / 16) % 4] + "\n";
    }
    write_file(dir.path() / "text" / ("doc" + std::to_string(doc) + ".txt"), s);
  }
}

std::vector<std::string> tiny_cuda_sets(const TempDir& dir, const std::string& run, const std::string& dtype,
                                        int zero_stage) {
  return {"model.vocab_size=260", "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
          "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.kv_lora_rank=32",
          "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8",
          "model.num_experts_per_tok=2", "model.n_shared_experts=1", "model.init_std=0.02",
          "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2",
          "train.steps=6", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=32",
          "train.device=cuda", "train.dtype=" + dtype, "train.eval_every=0", "train.eval_batches=1", "logging.every=1",
          "data.tokenizer=byte", "data.val_fraction=0.2", "distributed.backend=auto", "distributed.timeout_s=120",
          "distributed.zero_stage=" + std::to_string(zero_stage),
          "data.dir=" + dir.file("data"), "data.sources=" + dir.file("text/*.txt"), "logging.dir=" + dir.file(run),
          "checkpoint.dir=" + dir.file(run + "/ckpt")};
}

std::string cli(const std::vector<std::string>& sets) {
  std::string s = " " + std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml";
  for (const auto& x : sets) s += " --set " + x;
  return s;
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
  write_corpus(dir);
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
                                     cli(tiny_cuda_sets(dir, one, dtype, 0))));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const auto ref = losses(dir.file(one + "/metrics.jsonl"));
    ASSERT_EQ(ref.size(), 6u);
    for (int zero : {0, 1}) {
      const std::string run = fmt::format("two_{}_zero{}", dtype, zero);
      r = run_capture(fmt::format("{} launch --nproc 2 -- train{}", MOETRAIN_BINARY,
                                  cli(tiny_cuda_sets(dir, run, dtype, zero))));
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
