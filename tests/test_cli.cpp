// The moetrain executable: --help everywhere, exit codes, config show, params.
#include <gtest/gtest.h>

#include <filesystem>

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
  for (const char* cmd : {"config show", "params"}) {
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
                           "GFLOP/token", "optimizer (Adam)", "activations"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
  EXPECT_NE(r.output.find("671.03B"), std::string::npos) << r.output;
  auto j = run_capture(bin() + " params " + cfg("bench-1b") + " --json");
  ASSERT_EQ(j.exit_code, 0);
  EXPECT_NE(j.output.find("\"total\": 1256"), std::string::npos) << j.output;
}

}  // namespace
