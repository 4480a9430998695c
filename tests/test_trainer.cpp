// The training loop end to end on a tiny byte-level corpus: the loss falls below
// the corpus' unigram entropy, metrics.jsonl carries every field, and a skipped
// strategy list trains too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "data/prepare.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"
#include "trainer/trainer.h"

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::sentence_corpus;
using moetrain::testing::write_file;

namespace {

double unigram_entropy_nats(const std::string& text) {
  std::map<unsigned char, double> freq;
  for (unsigned char c : text) freq[c] += 1.0;
  double h = 0.0, n = static_cast<double>(text.size());
  for (auto& [c, f] : freq) h -= f / n * std::log(f / n);
  return h;
}

ExperimentConfig tiny_config(const TempDir& dir, const std::vector<std::string>& extra) {
  std::vector<std::string> sets = {
      "model.vocab_size=260", "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
      "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.kv_lora_rank=32",
      "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8",
      "model.num_experts_per_tok=2", "model.n_shared_experts=1", "model.init_std=0.02",
      "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=5",
      "train.steps=80", "train.global_batch=8", "train.micro_batch=4", "train.seq_len=48", "train.threads=1",
      "train.eval_every=40", "train.eval_batches=2", "logging.every=1",
      "data.tokenizer=byte", "data.val_fraction=0.2",
      "data.dir=" + dir.file("data"), "data.sources=" + dir.file("text/*.txt"), "logging.dir=" + dir.file("run"),
      "checkpoint.dir=" + dir.file("ckpt")};
  sets.insert(sets.end(), extra.begin(), extra.end());
  return load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml", sets);
}

std::string write_corpus(const TempDir& dir) {
  std::string all;
  for (int d = 0; d < 10; ++d) {
    std::string t = sentence_corpus(d, 400);
    write_file(dir.path() / "text" / ("doc" + std::to_string(d) + ".txt"), t);
    all += t;
  }
  return all;
}

TEST(Trainer, LearnsAndLogsEveryField) {
  TempDir dir;
  std::string text = write_corpus(dir);
  ExperimentConfig cfg = tiny_config(dir, {});
  PrepareOptions opt;
  opt.progress = false;
  prepare_data(cfg.data, cfg.model.vocab_size, opt);
  TrainResult r = train(cfg);

  ASSERT_EQ(r.steps, 80);
  EXPECT_LT(r.losses.back(), r.losses.front() - 1.0);
  EXPECT_LT(r.val_loss, unigram_entropy_nats(text)) << "unigram entropy " << unigram_entropy_nats(text);

  std::ifstream in(dir.file("run/metrics.jsonl"));
  std::string line;
  int train_records = 0, eval_records = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("kind", "") == "eval") {
      ++eval_records;
      for (const char* k : {"step", "tokens", "val_loss", "val_ppl", "maxvio_global", "maxvio_global_layers"})
        EXPECT_TRUE(j.contains(k)) << k;
      EXPECT_EQ(j["maxvio_global_layers"].size(), 1u);
      continue;
    }
    ++train_records;
    for (const char* k : {"step", "tokens", "loss", "lm_loss", "aux_loss", "seq_aux_loss", "z_loss", "mtp_loss", "lr",
                          "grad_norm", "tokens_per_s", "maxvio_batch", "maxvio_batch_layers", "expert_load", "bias"})
      EXPECT_TRUE(j.contains(k)) << k;
    ASSERT_EQ(j["expert_load"].size(), 1u);  // one MoE layer
    ASSERT_EQ(j["expert_load"][0].size(), 8u);
    double total = 0;
    for (double c : j["expert_load"][0].get<std::vector<double>>()) total += c;
    EXPECT_EQ(total, 8 * 48 * 2);  // every token of the global batch, top-2
  }
  EXPECT_EQ(train_records, 80);
  EXPECT_EQ(eval_records, 2);
}

TEST(Trainer, AuxLossBaselineTrainsWithoutMovingBiases) {
  TempDir dir;
  write_corpus(dir);
  ExperimentConfig cfg = tiny_config(dir, {"balance.strategy=aux_loss,z_loss", "train.steps=6", "train.eval_every=0"});
  PrepareOptions opt;
  opt.progress = false;
  prepare_data(cfg.data, cfg.model.vocab_size, opt);
  TrainResult r = train(cfg);
  std::ifstream in(dir.file("run/metrics.jsonl"));
  std::string line, last_train;
  while (std::getline(in, line))
    if (line.find("\"kind\"") == std::string::npos) last_train = line;
  auto j = nlohmann::json::parse(last_train);
  EXPECT_GT(j["aux_loss"].get<double>(), 0.0);
  EXPECT_GT(j["z_loss"].get<double>(), 0.0);
  for (double b : j["bias"][0].get<std::vector<double>>()) EXPECT_EQ(b, 0.0);
}

}  // namespace

#include "data/dataset.h"
#include "io/hf.h"
#include "models/lm_loss.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"

namespace {

// --init-from: the first step's loss is the HF directory's model's loss on that batch;
// an HF directory of another architecture is refused with the differing key.
TEST(Trainer, InitFromHuggingFaceDirectory) {
  TempDir dir;
  write_corpus(dir);
  ExperimentConfig cfg = tiny_config(dir, {"train.steps=1", "optim.warmup_steps=1", "train.eval_every=0", "train.global_batch=4",
                                           "train.micro_batch=4"});
  PrepareOptions opt;
  opt.progress = false;
  prepare_data(cfg.data, cfg.model.vocab_size, opt);

  torch::manual_seed(77);
  Transformer source(cfg.model);
  save_hf_checkpoint(dir.file("hf"), *source, cfg.model);
  DataLoader loader(cfg.data.dir, cfg.train);
  Batch b = loader.micro_batch(0, 0, 0, 1);
  double expected;
  {
    torch::NoGradGuard ng;
    expected = lm_head_loss(source, source->forward(b.inputs).hidden, b.targets, 4096).item<double>();
  }
  TrainOptions options;
  options.init_from = dir.file("hf");
  TrainResult r = train(cfg, options);
  EXPECT_NEAR(r.losses.front(), expected, 1e-5);  // + balance losses, which are 0 for loss_free

  ModelConfig other = cfg.model;
  other.routed_scaling_factor = 2.5;
  Transformer wrong(other);
  save_hf_checkpoint(dir.file("hf-other"), *wrong, other);
  options.init_from = dir.file("hf-other");
  try {
    train(cfg, options);
    FAIL() << "a different architecture was accepted";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("routed_scaling_factor"), std::string::npos) << e.what();
  }
}

// Multi-token prediction on (D = 1, an MoE block): the total loss and the MTP loss
// fall, the JSONL carries mtp_loss and λ with its step schedule, the MTP MoE layer is
// one more row of expert_load / bias, and loss = lm_loss + λ·mtp_loss + balance losses.
TEST(Trainer, MtpTrainsAndLogsItsLoss) {
  TempDir dir;
  write_corpus(dir);
  ExperimentConfig cfg = tiny_config(dir, {"model.num_nextn_predict_layers=1", "train.steps=30", "train.eval_every=0",
                                           "balance.strategy=loss_free,seq_aux_loss", "train.mtp_loss_weight=0.3",
                                           "train.mtp_loss_weight_switch_step=20", "train.mtp_loss_weight_after=0.1"});
  PrepareOptions opt;
  opt.progress = false;
  prepare_data(cfg.data, cfg.model.vocab_size, opt);
  TrainResult r = train(cfg);
  ASSERT_EQ(r.steps, 30);
  EXPECT_LT(r.losses.back(), r.losses.front() - 0.5);

  std::ifstream in(dir.file("run/metrics.jsonl"));
  std::string line;
  std::vector<nlohmann::json> records;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.value("kind", "") != "eval") records.push_back(j);
  }
  ASSERT_EQ(records.size(), 30u);
  const double first_mtp = records.front()["mtp_loss"].get<double>(), last_mtp = records.back()["mtp_loss"].get<double>();
  std::printf("mtp_loss %.4f -> %.4f, lm_loss %.4f -> %.4f\n", first_mtp, last_mtp,
              records.front()["lm_loss"].get<double>(), records.back()["lm_loss"].get<double>());
  EXPECT_GT(first_mtp, 0.0);
  EXPECT_LT(last_mtp, first_mtp - 0.5);
  for (const auto& j : records) {
    const int64_t step = j["step"].get<int64_t>();  // 1-based: optimizer step step-1 (0-based)
    const double lambda = j["mtp_loss_weight"].get<double>();
    EXPECT_DOUBLE_EQ(lambda, step - 1 >= 20 ? 0.1 : 0.3) << step;
    const double sum = j["lm_loss"].get<double>() + lambda * j["mtp_loss"].get<double>() +
                       j["aux_loss"].get<double>() + j["seq_aux_loss"].get<double>() + j["z_loss"].get<double>();
    EXPECT_NEAR(j["loss"].get<double>(), sum, 1e-9) << step;
    EXPECT_GT(j["seq_aux_loss"].get<double>(), 0.0);
    ASSERT_EQ(j["expert_load"].size(), 2u);  // layer 1, then the MTP block
    ASSERT_EQ(j["bias"].size(), 2u);
    ASSERT_EQ(j["maxvio_batch_layers"].size(), 2u);
    double main_total = 0, mtp_total = 0;
    for (double c : j["expert_load"][0].get<std::vector<double>>()) main_total += c;
    for (double c : j["expert_load"][1].get<std::vector<double>>()) mtp_total += c;
    EXPECT_EQ(main_total, 8 * 48 * 2);
    EXPECT_EQ(mtp_total, 8 * 47 * 2);  // depth 1 routes T - 1 tokens per sequence
  }
  double mtp_bias = 0;  // the balancer moved the MTP layer's bias too
  for (double b : records.back()["bias"][1].get<std::vector<double>>()) mtp_bias += std::abs(b);
  EXPECT_GT(mtp_bias, 0.0);
}

}  // namespace
