// moetrain ablate end to end on a tiny byte corpus: every run trains, the report
// has the schema of INTERFACES.md and plots, and a second call re-runs nothing.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "test_paths.h"
#include "test_util.h"
#include "trainer/ablation.h"
#include "trainer/config_tree.h"

using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

TEST(Ablate, RunsReportsAndResumes) {
  TempDir dir;
  for (int d = 0; d < 6; ++d) {
    std::string text;
    for (int i = 0; i < 300; ++i) text += "the cat sat on the mat " + std::to_string((i * 7 + d) % 13) + "\n";
    write_file(dir.path() / "text" / ("d" + std::to_string(d) + ".txt"), text);
  }
  write_file(dir.path() / "exp.yaml",
             "base: " + std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml\n"
             "model: {vocab_size: 260, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,\n"
             "        intermediate_size: 64, moe_intermediate_size: 16, kv_lora_rank: 16, qk_nope_head_dim: 8,\n"
             "        qk_rope_head_dim: 4, v_head_dim: 8, n_routed_experts: 4, num_experts_per_tok: 2}\n"
             "train: {steps: 6, global_batch: 4, micro_batch: 2, seq_len: 16, eval_every: 3, eval_batches: 1, threads: 1}\n"
             "optim: {warmup_steps: 1}\n"
             "data: {tokenizer: byte, dir: " + (dir.path() / "data").string() + ", sources: [\"" +
             (dir.path() / "text/*.txt").string() + "\"], exclude: []}\n");
  write_file(dir.path() / "abl.yaml",
             "name: t\nexperiment: exp.yaml\nruns_dir: " + (dir.path() / "runs").string() +
             "\nparallel: 2\nseeds: [1]\nvariants:\n"
             "  - {name: none, set: [\"balance.strategy=\"]}\n"
             "  - {name: loss_free, set: [\"balance.strategy=loss_free\"], seeds: [1, 2]}\n");
  const std::string cmd = "MOETRAIN_PYTHON='" + std::string(MOETRAIN_PYTHON) + "' " + MOETRAIN_BINARY + " ablate " +
                          (dir.path() / "abl.yaml").string();
  auto first = run_capture(cmd);
  ASSERT_EQ(first.exit_code, 0) << first.output;
  const auto root = dir.path() / "runs" / "t";
  auto report = nlohmann::json::parse(std::ifstream(root / "report.json"));
  EXPECT_EQ(report["name"], "t");
  ASSERT_EQ(report["variants"].size(), 2u);
  for (const auto& v : report["variants"])
    for (const char* k : {"name", "val_loss", "val_ppl", "maxvio_global", "maxvio_batch_last10", "maxvio_worst_layer",
                          "tokens_per_s", "wall_s"})
      EXPECT_TRUE(v.contains(k)) << k;
  EXPECT_EQ(report["variants"][1]["seeds"], 2);
  for (const char* png : {"val_loss.png", "maxvio_batch.png", "expert_load.png", "bias.png"})
    EXPECT_TRUE(std::filesystem::exists(root / png)) << png << "\n" << first.output;
  EXPECT_TRUE(std::filesystem::exists(root / "report.md"));

  auto second = run_capture(cmd);  // everything finished: nothing re-runs
  ASSERT_EQ(second.exit_code, 0) << second.output;
  EXPECT_NE(second.output.find("3 already finished"), std::string::npos) << second.output;
}

TEST(Ablate, BadVariantOverrideIsAConfigError) {
  TempDir dir;
  write_file(dir.path() / "abl.yaml", "name: t\nexperiment: " + std::string(MOETRAIN_SOURCE_DIR) +
                                          "/configs/debug.yaml\nvariants:\n  - {name: x, set: [\"balance.strategyy=\"]}\n"
                                          "colour: blue\n");
  try {
    moetrain::load_ablation((dir.path() / "abl.yaml").string());
    FAIL();
  } catch (const moetrain::ConfigErrors& e) {
    EXPECT_NE(std::string(e.what()).find("abl.yaml:5:1: colour: unknown key"), std::string::npos) << e.what();
  }
}

}  // namespace
