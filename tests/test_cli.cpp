// The moetrain executable: --help everywhere, exit codes, config show (+ --hf), params,
// bench on the CPU.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include <nlohmann/json.hpp>

#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

std::string bin() { return MOETRAIN_BINARY; }
std::string cfg(const char* name) { return std::string(MOETRAIN_SOURCE_DIR) + "/configs/" + name + ".yaml"; }

TEST(Cli, HelpForEveryCommand) {
  auto top = run_capture(bin() + " --help");
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.output.find("commands:"), std::string::npos);
  for (const char* cmd : {"config show", "params", "data prepare", "train", "eval", "export", "ablate", "bench"}) {
    auto r = run_capture(bin() + " " + cmd + " --help");
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.output.find("usage: moetrain"), std::string::npos) << cmd;
  }
}

TEST(Cli, UnknownCommandAndOptionExit2) {
  EXPECT_EQ(run_capture(bin() + " frobnicate").exit_code, 2);
  EXPECT_EQ(run_capture(bin() + " params " + cfg("debug") + " --bogus").exit_code, 2);
  EXPECT_EQ(run_capture(bin() + " params").exit_code, 2);
}

TEST(Cli, ConfigShowPrintsReloadableYaml) {
  auto r = run_capture(bin() + " config show " + cfg("debug") + " --set train.steps=7");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  TempDir dir;
  std::string path = write_file(dir.path() / "shown.yaml", r.output);
  auto c = moetrain::load_experiment_config(path);
  EXPECT_EQ(c.train.steps, 7);
}

TEST(Cli, InvalidConfigExits2AndWritesNothing) {
  TempDir dir;
  write_file(dir.path() / "bad.yaml", "train:\n  stepz: 3\n  steps: .nan\n");
  auto before = std::distance(std::filesystem::directory_iterator(dir.path()), {});
  auto r = run_capture("cd " + dir.path().string() + " && " + bin() + " config show bad.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.output.find("bad.yaml:2:3: train.stepz: unknown key (did you mean 'steps'?)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("bad.yaml:3:10: train.steps: expected an integer"), std::string::npos) << r.output;
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir.path()), {}), before);
}

TEST(Cli, ParamsTableAndJson) {
  auto r = run_capture(bin() + " params " + cfg("deepseek-v3-671b") + " --memory");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* line : {"total", "active (incl. input embedding)", "flop params (excl. input embedding)", "mtp",
                           "GFLOP/token", "optimizer (Adam fp32)", "activations"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
  EXPECT_NE(r.output.find("671.03B"), std::string::npos) << r.output;
  auto j = run_capture(bin() + " params " + cfg("bench-1b") + " --json");
  ASSERT_EQ(j.exit_code, 0);
  EXPECT_NE(j.output.find("\"total\": 1256"), std::string::npos) << j.output;
}

// ZeRO-1: the Adam state per rank falls as 1/world size; weights and gradients do not.
TEST(Cli, ParamsMemoryZeroDividesTheOptimizerByWorldSize) {
  auto mem = [](const std::string& extra) {
    auto r = run_capture(bin() + " params " + cfg("bench-1b") + " --json --memory" + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output)["memory_bytes"];
  };
  // (ZeRO-1 shards full fp32 masters: bench-1b's split ones are the replicated optimizer's)
  const auto one = mem(" --set optim.master_storage=fp32"),
             zero4 = mem(" --world-size 4 --set distributed.zero_stage=1 --set optim.master_storage=fp32"),
             plain4 = mem(" --world-size 4 --set optim.master_storage=fp32");
  EXPECT_NEAR(zero4["optimizer"].get<double>(), one["optimizer"].get<double>() / 4, 8.0);
  EXPECT_EQ(zero4["weights"], one["weights"]);
  EXPECT_EQ(zero4["grads"], one["grads"]);
  EXPECT_EQ(plain4["optimizer"], one["optimizer"]) << "zero_stage 0 replicates the optimizer";
  auto r = run_capture(bin() + " params " + cfg("bench-1b") +
                       " --memory --world-size 4 --set distributed.zero_stage=1 --set optim.master_storage=fp32");
  EXPECT_NE(r.output.find("ZeRO-1: ÷ 4 ranks"), std::string::npos) << r.output;
  EXPECT_EQ(run_capture(bin() + " params " + cfg("bench-1b") + " --memory --world-size 0").exit_code, 2);
}

// train.param_dtype bf16: weights and gradients take half the bytes, the fp32 masters move to
// the optimizer, and ZeRO-1 divides the masters by the world size along with the moments.
TEST(Cli, ParamsMemoryBf16WeightsShardTheMasters) {
  auto mem = [](const std::string& extra) {
    auto r = run_capture(bin() + " params " + cfg("bench-1b") + " --json --memory --set train.dtype=bf16" + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output)["memory_bytes"];
  };
  const std::string full = " --set optim.master_storage=fp32";  // split masters: below
  const auto fp32 = mem(" --set train.param_dtype=fp32 --set optim.moment_dtype=fp32" + full),
             bf16 = mem(" --set train.param_dtype=bf16 --set optim.moment_dtype=fp32" + full),
             bf16_moments = mem(" --set train.param_dtype=bf16 --set optim.moment_dtype=bf16" + full),
             zero4 = mem(" --set train.param_dtype=bf16 --world-size 4 --set distributed.zero_stage=1" + full),
             split = mem(" --set train.param_dtype=bf16 --set optim.master_storage=split");
  EXPECT_EQ(fp32["masters"].get<double>(), 0.0);
  EXPECT_NEAR(bf16_moments["optimizer"].get<double>(), bf16["optimizer"].get<double>() / 2, 1.0)
      << "optim.moment_dtype bf16: 2-byte moments";
  EXPECT_NEAR(bf16["grads"].get<double>(), fp32["grads"].get<double>() / 2, 1.0);
  EXPECT_NEAR(bf16["masters"].get<double>(), 2 * bf16["grads"].get<double>(), 1.0);
  EXPECT_NEAR(zero4["masters"].get<double>(), bf16["masters"].get<double>() / 4, 4.0);
  EXPECT_NEAR(split["masters"].get<double>(), bf16["masters"].get<double>() / 2, 1.0) << "int16 remainders";
  EXPECT_EQ(zero4["weights"], bf16["weights"]);
  auto r = run_capture(bin() + " params " + cfg("bench-1b") +
                       " --memory --set train.dtype=bf16 --set train.param_dtype=bf16 --world-size 4 --set distributed.zero_stage=1"
                       " --set optim.master_storage=fp32");
  EXPECT_NE(r.output.find("masters (fp32)"), std::string::npos) << r.output;
}

}  // namespace

namespace {

TEST(Cli, ConfigShowHfIsTheExportedConfigJson) {
  auto r = run_capture(bin() + " config show " + cfg("bench-1b") + " --hf");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j["model_type"], "deepseek_v3");
  EXPECT_EQ(j["n_routed_experts"], 64);
  EXPECT_EQ(j["rope_interleave"], true);
}

// Real (tiny) training steps on the CPU: the JSON line carries every INTERFACES.md field, the
// numbers are consistent with each other, and MFU is null without a known peak.
TEST(Cli, BenchOnCpu) {
  auto r = run_capture(bin() + " bench " + cfg("debug") +
                       " --steps 3 --warmup 1 --set train.global_batch=2 --set train.micro_batch=1 --set train.seq_len=16"
                       " --set train.threads=1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string last = r.output.substr(r.output.rfind('{'));
  const auto j = nlohmann::json::parse(last);
  for (const char* k : {"tokens_per_s", "step_ms", "tflops", "mfu", "peak_mem_gb", "device"}) EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_TRUE(j["mfu"].is_null());
  EXPECT_EQ(j["tokens_per_step"], 32);
  EXPECT_NEAR(j["tokens_per_s"].get<double>(), 32.0 / (j["step_ms"].get<double>() / 1e3), 1e-6);
  EXPECT_TRUE(std::isfinite(j["loss"].get<double>()));
  r = run_capture(bin() + " bench " + cfg("debug") + " --steps 0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

// --moe-layer times one MoE layer (the expert-scaling measurement of issue 9).
TEST(Cli, BenchMoeLayerOnCpu) {
  auto r = run_capture(bin() + " bench " + cfg("debug") +
                       " --moe-layer --steps 2 --warmup 1 --set train.micro_batch=2 --set train.seq_len=16"
                       " --set train.threads=1 --set model.n_routed_experts=16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output.substr(r.output.rfind('{')));
  EXPECT_EQ(j["n_routed_experts"], 16);
  EXPECT_EQ(j["tokens"], 32);
  EXPECT_GT(j["moe_layer_ms"].get<double>(), 0.0);

  // --scale-experts: both layers in one process, interleaved rounds, and their ratio
  r = run_capture(bin() + " bench " + cfg("debug") +
                  " --moe-layer --steps 10 --warmup 1 --scale-experts 32 --set train.micro_batch=2"
                  " --set train.seq_len=16 --set train.threads=1 --set model.n_routed_experts=16");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto s = nlohmann::json::parse(r.output.substr(r.output.rfind('{')));
  EXPECT_EQ(s["scaled_n_routed_experts"], 32);
  EXPECT_EQ(s["round_ratios"].size(), 2u);
  EXPECT_NEAR(s["scaling_ratio"].get<double>(),
              s["scaled_moe_layer_ms"].get<double>() / s["moe_layer_ms"].get<double>(), 1e-9);
  EXPECT_NE(r.output.find("MoE layer scaling 16 -> 32 routed experts"), std::string::npos) << r.output;
  r = run_capture(bin() + " bench " + cfg("debug") + " --moe-layer --scale-experts 1 --set train.threads=1");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}

}  // namespace
