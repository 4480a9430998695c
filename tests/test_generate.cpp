// `moetrain generate`: --help, the argument errors (exit 2), greedy text from a
// Hugging Face directory written by moetrain (byte tokenizer), --speculative mtp
// printing the same text as plain greedy decoding plus its acceptance rate, the
// KV-cache line, and FILE --checkpoint on a checkpoint that `moetrain train` wrote
// for a model with an MTP module.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <string>

#include "io/hf.h"
#include "models/transformer.h"
#include "test_paths.h"
#include "test_util.h"

using namespace moetrain;
using moetrain::testing::RunResult;
using moetrain::testing::TempDir;
using moetrain::testing::run_capture;
using moetrain::testing::tiny_moe_config;

namespace {

std::string write_hf(const TempDir& dir, const std::string& name, int64_t mtp) {
  torch::manual_seed(3);
  const ModelConfig cfg = tiny_moe_config(260, mtp, 0.3);
  Transformer model(cfg);
  const std::string out = dir.file(name);
  save_hf_checkpoint(out, *model, cfg);
  return out;
}

std::string stdout_text(const std::string& output) {  // the text line (stderr lines start "generate:" etc.)
  std::string text;
  size_t pos = 0;
  while (pos < output.size()) {
    const size_t end = output.find('\n', pos);
    const std::string line = output.substr(pos, end == std::string::npos ? std::string::npos : end - pos);
    if (line.rfind("hello", 0) == 0) text = line;
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return text;
}

}  // namespace

TEST(Generate, HelpAndBadArguments) {
  const std::string bin = MOETRAIN_BINARY;
  RunResult r = run_capture(bin + " generate --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("--speculative"), std::string::npos) << r.output;
  TempDir dir;
  const std::string plain = write_hf(dir, "plain", 0);
  r = run_capture(bin + " generate --hf " + plain + " --prompt hi --speculative mtp");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("--speculative mtp needs a model with MTP modules"), std::string::npos) << r.output;
  r = run_capture(bin + " generate --hf " + plain);
  EXPECT_EQ(r.exit_code, 2) << r.output;  // no --prompt
  r = run_capture(bin + " generate --prompt hi");
  EXPECT_EQ(r.exit_code, 2) << r.output;  // no model
  r = run_capture(bin + " generate --hf " + plain + " --prompt hi --top-p 1.5");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const std::string mtp = write_hf(dir, "mtp", 1);
  r = run_capture(bin + " generate --hf " + mtp + " --prompt hi --speculative mtp --temperature 0.7");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = run_capture(bin + " generate --hf " + dir.file("missing") + " --prompt hi");
  EXPECT_NE(r.exit_code, 0) << r.output;
}

TEST(Generate, GreedySpeculativeAndUncachedPrintTheSameText) {
  const std::string bin = MOETRAIN_BINARY;
  TempDir dir;
  const std::string mtp = write_hf(dir, "mtp", 1);
  const std::string base = bin + " generate --hf " + mtp + " --prompt hello --max-new-tokens 24";
  const RunResult greedy = run_capture(base);
  ASSERT_EQ(greedy.exit_code, 0) << greedy.output;
  const RunResult spec = run_capture(base + " --speculative mtp");
  ASSERT_EQ(spec.exit_code, 0) << spec.output;
  const RunResult uncached = run_capture(base + " --no-cache");
  ASSERT_EQ(uncached.exit_code, 0) << uncached.output;
  const std::string text = stdout_text(greedy.output);
  ASSERT_FALSE(text.empty()) << greedy.output;
  EXPECT_EQ(stdout_text(spec.output), text) << spec.output;
  EXPECT_EQ(stdout_text(uncached.output), text) << uncached.output;
  EXPECT_NE(greedy.output.find("tokens/s"), std::string::npos) << greedy.output;
  // 2 layers × (16 + 4) fp32 numbers = 160 bytes/token; MHA: 2·2·8 = 32 numbers/token/layer.
  EXPECT_NE(greedy.output.find("20 numbers/token/layer"), std::string::npos) << greedy.output;
  EXPECT_NE(greedy.output.find("160 bytes/token over 2 layers (measured: 160)"), std::string::npos) << greedy.output;
  EXPECT_NE(greedy.output.find("2·n_h·d_h = 2·2·8 = 32"), std::string::npos) << greedy.output;
  EXPECT_NE(spec.output.find("drafts accepted"), std::string::npos) << spec.output;
  // Sampling is reproducible with a seed.
  const RunResult s1 = run_capture(base + " --temperature 0.8 --top-k 50 --top-p 0.9 --seed 4");
  const RunResult s2 = run_capture(base + " --temperature 0.8 --top-k 50 --top-p 0.9 --seed 4");
  ASSERT_EQ(s1.exit_code, 0) << s1.output;
  EXPECT_EQ(stdout_text(s1.output), stdout_text(s2.output));
}

TEST(Generate, FromATrainingCheckpointWithMtp) {
  const std::string bin = MOETRAIN_BINARY;
  TempDir dir;
  std::string text;
  for (int i = 0; i < 60; ++i) text += "the cat sat on the mat. the dog sat on the log.\n";
  for (int d = 0; d < 5; ++d) moetrain::testing::write_file(dir.path() / "text" / (std::to_string(d) + ".txt"), text);
  const std::string sets =
      " --set model.vocab_size=260 --set model.hidden_size=32 --set model.num_hidden_layers=2"
      " --set model.num_attention_heads=2 --set model.intermediate_size=64 --set model.moe_intermediate_size=16"
      " --set model.kv_lora_rank=16 --set model.qk_nope_head_dim=8 --set model.qk_rope_head_dim=4"
      " --set model.v_head_dim=8 --set model.n_routed_experts=4 --set model.num_experts_per_tok=2"
      " --set model.n_shared_experts=1 --set model.num_nextn_predict_layers=1 --set model.init_std=0.05"
      " --set optim.lr=3e-3 --set optim.warmup_steps=2 --set train.steps=40 --set train.global_batch=8"
      " --set train.micro_batch=8 --set train.seq_len=32 --set train.threads=1 --set train.eval_every=0"
      " --set train.eval_batches=1 --set data.tokenizer=byte --set data.val_fraction=0.2"
      " --set data.dir=" + dir.file("data") + " --set data.sources=" + dir.file("text/*.txt") +
      " --set logging.dir=" + dir.file("run") + " --set checkpoint.dir=" + dir.file("ckpt");
  const std::string file = std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml";
  RunResult r = run_capture(bin + " data prepare " + file + sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_capture(bin + " train " + file + sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string base = bin + " generate " + file + sets + " --checkpoint " + dir.file("ckpt") +
                           " --prompt 'hello' --max-new-tokens 30";
  const RunResult greedy = run_capture(base);
  ASSERT_EQ(greedy.exit_code, 0) << greedy.output;
  const RunResult spec = run_capture(base + " --speculative mtp");
  ASSERT_EQ(spec.exit_code, 0) << spec.output;
  ASSERT_FALSE(stdout_text(greedy.output).empty()) << greedy.output;
  EXPECT_EQ(stdout_text(spec.output), stdout_text(greedy.output)) << greedy.output << spec.output;
  std::printf("%s", spec.output.c_str());
  // A checkpoint of another architecture is refused (exit 2).
  r = run_capture(bin + " generate " + file + sets + " --set model.kv_lora_rank=8 --checkpoint " + dir.file("ckpt") +
                  " --prompt hi");
  EXPECT_EQ(r.exit_code, 2) << r.output;
}
