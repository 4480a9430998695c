// `moetrain eval` end to end through the real binary, and the round trip issue 6
// asks for: a model trained a few steps, checkpointed, exported and reloaded gives
// the same validation loss in the trainer's log, in `eval --checkpoint`, in `eval
// --hf` of the export, and in transformers (tests/python/hf_val_loss.py, which
// windows val.bin like data/dataset.h). Also the single-sequence modes (--tokens
// with ids or a .bin file, --text) and their errors. Needs MOETRAIN_PYTHON with
// transformers 5.17 (label parity); fails, does not skip, without it.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "test_paths.h"
#include "test_util.h"

namespace {

using moetrain::testing::RunResult;
using moetrain::testing::run_capture;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;
using Json = nlohmann::json;

std::string quoted(const std::string& s) { return moetrain::testing::shell_quoted(s); }

// The last non-empty line of a command's output, as JSON.
Json last_json(const RunResult& r) {
  std::istringstream in(r.output);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  return Json::parse(last);
}

// Repetitive text: a few steps make the model far from uniform.
std::string corpus_text(int doc) {
  const char* words[] = {"the cat ", "sat on ", "a mat. ", "dogs run ", "to the door.\n", "birds sing "};
  std::string s;
  for (int i = 0; i < 600; ++i) s += words[(i * 5 + doc * 3 + i / 7) % 6];
  return s;
}

class EvalRoundTrip : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int d = 0; d < 6; ++d) write_file(dir.path() / "text" / ("doc" + std::to_string(d) + ".txt"), corpus_text(d));
    sets = " --set model.vocab_size=260 --set model.hidden_size=64 --set model.num_hidden_layers=3"
           " --set model.num_attention_heads=4 --set model.intermediate_size=128 --set model.moe_intermediate_size=32"
           " --set model.kv_lora_rank=32 --set model.qk_nope_head_dim=16 --set model.qk_rope_head_dim=8"
           " --set model.v_head_dim=16 --set model.n_routed_experts=8 --set model.num_experts_per_tok=2"
           " --set model.n_shared_experts=1 --set model.max_position_embeddings=128"
           " --set optim.lr=3e-3 --set optim.warmup_steps=2 --set train.steps=12 --set train.global_batch=4"
           " --set train.micro_batch=2 --set train.seq_len=32 --set train.threads=1 --set train.eval_every=0"
           " --set train.eval_batches=3 --set data.tokenizer=byte --set data.val_fraction=0.2"
           " --set checkpoint.every=12"
           " --set data.dir=" + dir.file("data") + " --set data.sources=" + quoted(dir.file("text/*.txt")) +
           " --set logging.dir=" + dir.file("run") + " --set checkpoint.dir=" + dir.file("ckpt");
    config = std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml";
  }
  RunResult moetrain(const std::string& args) { return run_capture(quoted(MOETRAIN_BINARY) + " " + args); }

  TempDir dir;
  std::string sets, config;
};

TEST_F(EvalRoundTrip, TrainedExportedReloadedSameValLoss) {
  RunResult r = moetrain("data prepare " + config + sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = moetrain("train " + config + sets);
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // The trainer's final evaluation.
  double trained_val = NAN;
  std::ifstream metrics(dir.file("run/metrics.jsonl"));
  for (std::string line; std::getline(metrics, line);) {
    Json j = Json::parse(line);
    if (j.value("kind", "") == "eval") trained_val = j["val_loss"].get<double>();
  }
  ASSERT_TRUE(std::isfinite(trained_val));
  EXPECT_LT(trained_val, std::log(260.0) - 0.5);  // trained, not uniform

  // eval --checkpoint of the checkpoint root (its config.yaml is the experiment): the same code path.
  r = moetrain("eval --checkpoint " + dir.file("ckpt"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json ck = last_json(r);
  EXPECT_NEAR(ck["loss"].get<double>(), trained_val, 1e-6);
  EXPECT_EQ(ck["tokens"].get<int64_t>(), 3 * 4 * 32);

  r = moetrain("export " + dir.file("ckpt") + " --format hf --out " + dir.file("hf"));
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // moetrain's HF loader on the export, with the experiment's validation split.
  r = moetrain("eval " + config + sets + " --hf " + dir.file("hf"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NEAR(last_json(r)["loss"].get<double>(), trained_val, 1e-5);

  // transformers on the export, windows as the trainer reads them.
  r = run_capture(quoted(MOETRAIN_PYTHON) + " " + quoted(std::string(MOETRAIN_SOURCE_DIR) + "/tests/python/hf_val_loss.py") +
                  " --load " + dir.file("hf") + " --val " + dir.file("data/val.bin") +
                  " --dtype uint16 --seq-len 32 --windows 12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const double hf_val = last_json(r)["loss"].get<double>();
  EXPECT_NEAR(hf_val, trained_val, 1e-4) << "transformers " << hf_val << " vs trainer " << trained_val;
}

TEST_F(EvalRoundTrip, SingleSequenceModesAndErrors) {
  ASSERT_EQ(moetrain("data prepare " + config + sets).exit_code, 0);
  RunResult r = moetrain("train " + config + sets + " --set train.steps=2 --set checkpoint.every=2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string ck = " --checkpoint " + dir.file("ckpt/step-00000002");

  // --text (byte tokenizer: ids are the bytes) == --tokens with those ids.
  const std::string text = "the cat sat on a mat. dogs run";
  write_file(dir.path() / "t.txt", text);
  std::string ids;
  for (unsigned char c : text) ids += std::to_string(c) + " ";
  write_file(dir.path() / "t.ids", ids);
  r = moetrain("eval" + ck + " --text " + dir.file("t.txt"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json a = last_json(r);
  r = moetrain("eval" + ck + " --tokens " + dir.file("t.ids"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const Json b = last_json(r);
  EXPECT_EQ(a["tokens"].get<int64_t>(), static_cast<int64_t>(text.size()) - 1);
  EXPECT_DOUBLE_EQ(a["loss"].get<double>(), b["loss"].get<double>());

  // A .bin token file is read with the meta.json beside it; the whole split is longer than the
  // model's context: a clear error pointing at windowed evaluation.
  r = moetrain("eval" + ck + " --tokens " + dir.file("data/val.bin"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("exceed the model's max_position_embeddings (128)"), std::string::npos) << r.output;

  // Bad input: exit 2 with the reason.
  r = moetrain("eval --checkpoint " + dir.file("nope"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("no such checkpoint directory"), std::string::npos) << r.output;
  r = moetrain("eval" + ck + " --hf " + dir.file("ckpt"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = moetrain("eval" + ck + " --tokens " + dir.file("t.ids") + " --text " + dir.file("t.txt"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  r = moetrain("eval " + config + ck);  // debug.yaml's own model is not this checkpoint's
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("differs from the one in"), std::string::npos) << r.output;
  {
    std::fstream f(dir.file("ckpt/step-00000002/model.safetensors"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x55');
  }
  r = moetrain("eval" + ck + " --tokens " + dir.file("t.ids"));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("checksum mismatch"), std::string::npos) << r.output;
}

}  // namespace
