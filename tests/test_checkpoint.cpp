// Checkpoints and resume (trainer/checkpoint.h) on tiny CPU runs: bitwise resume
// (with and without gradient accumulation, through SIGTERM and an explicit PATH),
// crash safety at every stage of the writer, retention, bad `latest` pointers,
// damaged files, incompatible configs, non-finite policies, loss spikes, SIGUSR1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "io/safetensors.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/experiment_config.h"
#include "trainer/trainer.h"

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::sentence_corpus;
using moetrain::testing::write_file;
namespace fs = std::filesystem;

namespace {

// A tiny run in dir: data in dir/data, checkpoints in dir/<name>/ckpt, metrics in dir/<name>/run.
class TinyRun {
 public:
  explicit TinyRun(const TempDir& dir) : dir_(dir) {
    for (int d = 0; d < 6; ++d) write_file(dir.path() / "text" / ("doc" + std::to_string(d) + ".txt"), sentence_corpus(d, 200));
    PrepareOptions opt;
    opt.progress = false;
    prepare_data(config("prep", {}).data, 260, opt);
  }
  ExperimentConfig config(const std::string& name, const std::vector<std::string>& extra) const {
    std::vector<std::string> sets = {
        "model.vocab_size=260", "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", "model.moe_intermediate_size=16", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=8", "model.v_head_dim=8", "model.n_routed_experts=4",
        "model.num_experts_per_tok=2", "model.n_shared_experts=1", "model.init_std=0.02",
        "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2",
        "train.steps=8", "train.global_batch=8", "train.micro_batch=4", "train.seq_len=32", "train.threads=1",
        "train.eval_every=0", "train.eval_batches=1", "logging.every=1", "checkpoint.every=0",
        "data.tokenizer=byte", "data.val_fraction=0.2",
        "data.dir=" + dir_.file("data"), "data.sources=" + dir_.file("text/*.txt"),
        "logging.dir=" + dir_.file(name + "/run"), "checkpoint.dir=" + ckpt(name)};
    sets.insert(sets.end(), extra.begin(), extra.end());
    return load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml", sets);
  }
  std::string ckpt(const std::string& name) const { return dir_.file(name + "/ckpt"); }
  std::string step_dir(const std::string& name, int64_t step) const {
    return ckpt(name) + "/" + checkpoint_dir_name(step);
  }

 private:
  const TempDir& dir_;
};

// Sets MOETRAIN_TEST_INJECT for one scope.
struct Inject {
  explicit Inject(const std::string& spec) { setenv("MOETRAIN_TEST_INJECT", spec.c_str(), 1); }
  ~Inject() { unsetenv("MOETRAIN_TEST_INJECT"); }
};

struct HookGuard {
  explicit HookGuard(CheckpointFaultHook h) { set_checkpoint_fault_hook(std::move(h)); }
  ~HookGuard() { set_checkpoint_fault_hook(nullptr); }
};

void expect_same_tensors(const std::string& a_path, const std::string& b_path) {
  SafetensorsFile a = read_safetensors(a_path), b = read_safetensors(b_path);
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << a_path;
  for (const auto& [name, t] : a.tensors) {
    ASSERT_TRUE(b.contains(name)) << name;
    EXPECT_TRUE(torch::equal(t, b.at(name))) << a_path << ": " << name << " differs";
  }
}

void expect_same_checkpoint(const std::string& a, const std::string& b) {
  expect_same_tensors(a + "/model.safetensors", b + "/model.safetensors");  // parameters + router biases
  expect_same_tensors(a + "/optimizer.safetensors", b + "/optimizer.safetensors");  // moments + step counts
}

std::vector<double> jsonl_losses(const std::string& path) {
  std::vector<double> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (!j.contains("kind")) out.push_back(j["loss"].get<double>());
  }
  return out;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class ResumeBitwise : public ::testing::TestWithParam<int> {};

// K=8 straight vs SIGTERM at step 5 (checkpoint.every=3, so 5 is not a save step) + a fresh
// train() with --resume auto; and vs a fresh train() resumed from the explicit step-3 PATH.
TEST_P(ResumeBitwise, SameLossesParametersMomentsAndBiases) {
  torch::set_num_threads(1);
  TempDir dir;
  TinyRun run(dir);
  const std::string micro = "train.micro_batch=" + std::to_string(GetParam());  // 4: two micro-steps per step
  TrainResult straight = train(run.config("a", {micro}));
  ASSERT_EQ(straight.losses.size(), 8u);

  TrainResult first;
  {
    Inject inject("sigterm:5");
    first = train(run.config("b", {micro, "checkpoint.every=3", "checkpoint.keep_last=10"}));
  }
  EXPECT_TRUE(first.stopped_by_signal);
  EXPECT_EQ(first.steps, 5);
  EXPECT_TRUE(fs::exists(run.step_dir("b", 3)));
  EXPECT_TRUE(fs::exists(run.step_dir("b", 5)));
  EXPECT_EQ(read_all(run.ckpt("b") + "/latest"), "step-00000005\n");
  TrainOptions resume;
  resume.resume = "auto";
  TrainResult second = train(run.config("b", {micro, "checkpoint.every=3", "checkpoint.keep_last=10"}), resume);
  EXPECT_EQ(second.resumed_step, 5);
  EXPECT_FALSE(second.stopped_by_signal);
  ASSERT_EQ(second.losses.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(second.losses[i], straight.losses[5 + i]) << "step " << 6 + i;
  EXPECT_EQ(jsonl_losses(dir.file("b/run/metrics.jsonl")), straight.losses);  // the appended log, bitwise
  expect_same_checkpoint(run.step_dir("a", 8), run.step_dir("b", 8));

  // an explicit PATH into another checkpoint.dir
  resume.resume = run.step_dir("b", 3);
  TrainResult third = train(run.config("c", {micro}), resume);
  EXPECT_EQ(third.resumed_step, 3);
  ASSERT_EQ(third.losses.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(third.losses[i], straight.losses[3 + i]);
  expect_same_checkpoint(run.step_dir("a", 8), run.step_dir("c", 8));
}

INSTANTIATE_TEST_SUITE_P(MicroBatch, ResumeBitwise, ::testing::Values(4, 8));

TEST(Checkpoint, HoldsEveryPieceOfState) {
  TempDir dir;
  TinyRun run(dir);
  train(run.config("a", {"train.steps=2"}));
  const std::string d = run.step_dir("a", 2);
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "config.yaml",
                        "MANIFEST"})
    EXPECT_TRUE(fs::exists(d + "/" + f)) << f;
  auto js = nlohmann::json::parse(read_all(d + "/state.json"));
  for (const char* k : {"step", "tokens", "data", "skipped_steps", "consecutive_skips", "loss_spike", "config_hash",
                        "moetrain_version", "lr_step", "format_version"})
    EXPECT_TRUE(js.contains(k)) << k;
  EXPECT_EQ(js["step"], 2);
  EXPECT_EQ(js["loss_spike"]["recent_losses"].size(), 2u);
  SafetensorsFile model = read_safetensors(d + "/model.safetensors");
  EXPECT_TRUE(model.contains("layers.1.ffn.gate.bias"));  // the loss-free router bias
  for (const auto& [name, t] : model.tensors) {
    if (name.find(".gate.bias") != std::string::npos) {
      EXPECT_EQ(t.scalar_type(), torch::kFloat) << name;
    }
  }
  SafetensorsFile opt = read_safetensors(d + "/optimizer.safetensors");
  EXPECT_TRUE(opt.contains("exp_avg.embed.weight"));
  EXPECT_TRUE(opt.contains("exp_avg_sq.embed.weight"));
  EXPECT_EQ(opt.at("step.embed.weight").item<int64_t>(), 2);
  EXPECT_EQ(read_safetensors(d + "/rng.safetensors").at("cpu").scalar_type(), torch::kByte);
}

// A crash at each stage of the writer: `auto` resumes the previous checkpoint, and the
// leftover .tmp-* directory is never taken for one.
TEST(Checkpoint, CrashDuringSaveKeepsThePreviousOne) {
  TempDir dir;
  TinyRun run(dir);
  for (const char* stage : {"model.safetensors", "optimizer.safetensors", "before_manifest", "before_rename",
                            "before_latest"}) {
    SCOPED_TRACE(stage);
    const std::string name = std::string("crash-") + stage;
    {
      HookGuard guard([&](const char* s, const std::string& path) {
        if (path.find("step-00000004") == std::string::npos || std::string(s) != stage) return;
        if (std::string(s) == "model.safetensors") fs::resize_file(path, fs::file_size(path) / 2);  // mid-write
        throw std::runtime_error(std::string("injected crash at ") + s);
      });
      EXPECT_THROW(train(run.config(name, {"train.steps=4", "checkpoint.every=2"})), std::runtime_error);
    }
    bool tmp_left = false;
    for (const auto& e : fs::directory_iterator(run.ckpt(name)))
      tmp_left |= e.path().filename().string().rfind(".tmp-", 0) == 0;
    EXPECT_EQ(tmp_left, std::string(stage) != "before_latest");
    EXPECT_EQ(find_latest_checkpoint(run.ckpt(name)), run.step_dir(name, 2));
    fs::remove(run.ckpt(name) + "/latest");  // scanning must skip the .tmp-* as well
    const std::string scanned = find_latest_checkpoint(run.ckpt(name));
    EXPECT_EQ(scanned, std::string(stage) == "before_latest" ? run.step_dir(name, 4) : run.step_dir(name, 2));
  }
  // a real resume after a crash: continues from step 2 and cleans the leftover
  TrainOptions resume;
  resume.resume = "auto";
  TrainResult r = train(run.config("crash-before_rename", {"train.steps=4", "checkpoint.every=2"}), resume);
  EXPECT_EQ(r.resumed_step, 2);
  EXPECT_EQ(r.steps, 4);
  for (const auto& e : fs::directory_iterator(run.ckpt("crash-before_rename")))
    EXPECT_NE(e.path().filename().string().rfind(".tmp-", 0), 0u) << e.path();
}

TEST(Checkpoint, KeepLastPrunesAndBadLatestFallsBackToScanning) {
  TempDir dir;
  TinyRun run(dir);
  train(run.config("a", {"train.steps=5", "checkpoint.every=1", "checkpoint.keep_last=2"}));
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(run.ckpt("a"))) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-00000004", "step-00000005"}));

  write_file(run.ckpt("a") + "/latest", "garbage\n");
  EXPECT_EQ(find_latest_checkpoint(run.ckpt("a")), run.step_dir("a", 5));
  write_file(run.ckpt("a") + "/latest", "step-00000099\n");  // dangling
  EXPECT_EQ(find_latest_checkpoint(run.ckpt("a")), run.step_dir("a", 5));
  write_file(run.ckpt("a") + "/latest", "../../etc\n");
  EXPECT_EQ(find_latest_checkpoint(run.ckpt("a")), run.step_dir("a", 5));

  // auto with nothing to resume is a fresh start; an explicit PATH must exist
  TrainOptions resume;
  resume.resume = "auto";
  EXPECT_EQ(train(run.config("fresh", {"train.steps=2"}), resume).resumed_step, -1);
  resume.resume = dir.file("nowhere");
  EXPECT_THROW(train(run.config("fresh2", {"train.steps=2"}), resume), CheckpointError);
}

TEST(Checkpoint, DamagedFileIsNamed) {
  TempDir dir;
  TinyRun run(dir);
  train(run.config("a", {"train.steps=2"}));
  const std::string d = run.step_dir("a", 2);
  fs::copy(d, dir.file("pristine"), fs::copy_options::recursive);
  TrainOptions resume;
  resume.resume = d;
  auto expect_error = [&](const std::string& needle) {
    try {
      train(run.config("a", {"train.steps=3"}), resume);
      ADD_FAILURE() << "resume from a damaged checkpoint succeeded";
    } catch (const CheckpointError& e) {
      EXPECT_NE(std::string(e.what()).find("model.safetensors"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  {  // bit flip
    std::fstream f(d + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-10, std::ios::end);
    char c = 0;
    f.get(c);
    f.seekp(-10, std::ios::end);
    f.put(static_cast<char>(c ^ 0x01));
  }
  expect_error("checksum");
  fs::copy_file(dir.file("pristine/model.safetensors"), d + "/model.safetensors", fs::copy_options::overwrite_existing);
  fs::resize_file(d + "/model.safetensors", 100);  // truncated
  expect_error("bytes");
  resume.resume = "auto";  // the only checkpoint is damaged: an error, never a fresh start
  expect_error("bytes");
}

TEST(Checkpoint, OlderFormatIsRejectedWithTheReason) {
  TempDir dir;
  TinyRun run(dir);
  const ExperimentConfig cfg = run.config("a", {"train.steps=2"});
  train(cfg);
  const std::string d = run.step_dir("a", 2);
  auto js = nlohmann::json::parse(read_all(d + "/state.json"));
  EXPECT_EQ(js["format_version"], 2);
  js["format_version"] = 1;  // as written before the stacked experts.w13
  std::ofstream(d + "/state.json") << js.dump(2);
  Transformer model(cfg.model);
  try {
    load_model_weights(d, model);
    ADD_FAILURE() << "loaded a format-1 checkpoint";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("format_version 1"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("experts.w13"), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, IncompatibleConfigIsRejectedWithADiff) {
  TempDir dir;
  TinyRun run(dir);
  train(run.config("a", {"train.steps=2"}));
  TrainOptions resume;
  resume.resume = "auto";
  try {
    train(run.config("a", {"train.steps=3", "model.moe_intermediate_size=24"}), resume);
    ADD_FAILURE() << "accepted a different model shape";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("model.moe_intermediate_size"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("layers.1.ffn"), std::string::npos) << e.what();  // the tensors too
  }
  try {
    train(run.config("a", {"train.steps=3", "balance.strategy=aux_loss"}), resume);
    ADD_FAILURE() << "accepted a different balancing mode";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("balance.strategy"), std::string::npos) << e.what();
  }
}

TEST(Faults, NanWithAbortPolicyStopsBeforeTheUpdateAndSavesNothingForThatStep) {
  TempDir dir;
  TinyRun run(dir);
  for (const char* kind : {"nan_loss", "nan_grad"}) {
    SCOPED_TRACE(kind);
    const std::string name = std::string("abort-") + kind;
    Inject inject(std::string(kind) + ":3");
    EXPECT_THROW(train(run.config(name, {"train.steps=5", "checkpoint.every=1", "checkpoint.nonfinite_policy=abort",
                                         "checkpoint.keep_last=5"})),
                 std::runtime_error);
    EXPECT_TRUE(fs::exists(run.step_dir(name, 2)));
    EXPECT_FALSE(fs::exists(run.step_dir(name, 3)));
    EXPECT_EQ(find_latest_checkpoint(run.ckpt(name)), run.step_dir(name, 2));
  }
}

TEST(Faults, NanWithSkipPolicyCountsAndAbortsAfterTooManyInARow) {
  TempDir dir;
  TinyRun run(dir);
  {
    Inject inject("nan_loss:3");
    TrainResult r = train(run.config("one", {"train.steps=4"}));
    EXPECT_EQ(r.skipped_steps, 1);
    EXPECT_EQ(r.steps, 4);
    auto js = nlohmann::json::parse(read_all(run.step_dir("one", 4) + "/state.json"));
    EXPECT_EQ(js["skipped_steps"], 1);
  }
  {
    Inject inject("nan_grad:2-8");
    try {
      train(run.config("many", {"train.steps=8", "checkpoint.max_consecutive_skips=2"}));
      ADD_FAILURE() << "did not abort";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("step 4"), std::string::npos) << e.what();  // skips 2, 3; 4 is one too many
    }
  }
}

TEST(Faults, LossSpikeIsFlaggedAndItsWindowCheckpointed) {
  LossSpikeDetector d(10.0, 3);
  EXPECT_FALSE(d.observe(1.0));
  EXPECT_FALSE(d.observe(9.0));
  EXPECT_TRUE(d.observe(91.0));
  EXPECT_FALSE(d.observe(std::nan("")));
  EXPECT_EQ(d.recent(), (std::vector<double>{1.0, 9.0, 91.0}));

  TempDir dir;
  TinyRun run(dir);
  Inject inject("spike:4");
  train(run.config("a", {"train.steps=5"}));
  std::ifstream in(dir.file("a/run/metrics.jsonl"));
  std::string line;
  int flagged = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("loss_spike", false)) {
      ++flagged;
      EXPECT_EQ(j["step"], 4);
    }
  }
  EXPECT_EQ(flagged, 1);
  auto js = nlohmann::json::parse(read_all(run.step_dir("a", 5) + "/state.json"));
  EXPECT_EQ(js["loss_spike"]["recent_losses"].size(), 5u);
}

TEST(Signals, Usr1SavesAtTheNextStepBoundaryAndContinues) {
  TempDir dir;
  TinyRun run(dir);
  Inject inject("sigusr1:2");
  TrainResult r = train(run.config("a", {"train.steps=4", "checkpoint.keep_last=3"}));
  EXPECT_FALSE(r.stopped_by_signal);
  EXPECT_EQ(r.steps, 4);
  EXPECT_TRUE(fs::exists(run.step_dir("a", 2)));
  EXPECT_TRUE(fs::exists(run.step_dir("a", 4)));
  EXPECT_FALSE(fs::exists(run.step_dir("a", 3)));
}

}  // namespace
