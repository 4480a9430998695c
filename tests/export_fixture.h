// defines: helpers shared by test_export.cpp and test_export_unit.cpp — a tiny
// random DeepseekV3-style model written as a training checkpoint directory
// (model.safetensors + config.yaml, the contract of trainer checkpoints) and a
// direct call of `moetrain export` (cmd_export) capturing its exit code and stderr.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "data/tokenizer.h"
#include "io/safetensors.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"
#include "trainer/experiment_config.h"

namespace moetrain {
int cmd_export(int argc, char** argv);
}

namespace moetrain::export_test {

namespace fs = std::filesystem;

// Not fs::remove_all: the torch 2.11 wheel's libtorch.so exports its own
// std::filesystem::remove_all, which segfaults (tests/test_hf_parity.cpp).
inline void remove_tree(const fs::path& p) {
  std::error_code ec;
  if (fs::is_directory(fs::symlink_status(p, ec)))
    for (const auto& entry : fs::directory_iterator(p, ec)) remove_tree(entry.path());
  fs::remove(p, ec);
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "moetrain_export_XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    if (!std::getenv("MOETRAIN_KEEP_EXPORT_TEST")) remove_tree(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// 3 layers (1 dense, 2 MoE), 8 experts in 4 groups with 2 kept, top-2, scaling
// 2.5: every routing feature of DeepSeek-V3 changes the output.
inline ModelConfig tiny_config(int64_t q_lora_rank) {
  ModelConfig c;
  c.vocab_size = 300;  // > 256: the byte tokenizer's eos exists
  c.hidden_size = 64;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.intermediate_size = 96;
  c.moe_intermediate_size = 32;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = true;
  c.first_k_dense_replace = 1;
  c.max_position_embeddings = 256;
  return c;
}

// Weights large enough that routing and attention are far from uniform; router
// biases nonzero so that dropping or rounding them would change expert choice.
inline Transformer random_model(const ModelConfig& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  Transformer model(cfg);
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters(true)) {
    torch::Tensor& t = item.value();
    if (item.key().find("norm") != std::string::npos)
      t.copy_(1.0 + 0.1 * torch::randn_like(t));
    else
      t.copy_(0.08 * torch::randn_like(t));
  }
  for (auto& item : model->named_buffers(true))
    if (item.key().size() > 9 && item.key().compare(item.key().size() - 9, 9, "gate.bias") == 0)
      item.value().copy_(torch::rand_like(item.value()) * 0.6 - 0.3);
  model->eval();
  return model;
}

// A real SentencePiece model of moetrain's kind (data/tokenizer.h), trained on a small
// English-and-code text; vocab >= 300.
inline std::string tiny_sentencepiece(int64_t vocab) {
  const char* lines[] = {"the kernel maps a page into the address space of the process",
                         "int main(void) {", "    return map_page(addr, flags);", "}",
                         "a driver registers its device with the bus and probes it",
                         "  indented text with  double  spaces and tabs\tinside"};
  std::vector<std::string> text;
  for (int k = 0; k < 200; ++k) text.emplace_back(lines[k % 6]);
  std::vector<std::string_view> views(text.begin(), text.end());
  SentencePieceTrainOptions opt;
  opt.vocab_size = vocab;
  opt.num_threads = 1;
  return train_sentencepiece(views, opt);
}

inline std::vector<std::pair<std::string, torch::Tensor>> checkpoint_tensors(const Transformer& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model->named_parameters(true)) out.emplace_back(item.key(), item.value().detach());
  for (const auto& item : model->named_buffers(true)) out.emplace_back(item.key(), item.value().detach());
  return out;
}

// A step directory as the trainer writes it: model.safetensors and config.yaml are what export
// reads; the optimizer, RNG and state files are placeholders, listed in a valid MANIFEST.
inline fs::path write_checkpoint(const fs::path& root, const Transformer& model, const ModelConfig& cfg,
                                 const std::string& data_dir,
                                 std::vector<std::pair<std::string, torch::Tensor>> tensors = {},
                                 const std::string& tokenizer = "byte") {
  const fs::path step = root / "step-00000007";
  fs::create_directories(step);
  if (tensors.empty()) tensors = checkpoint_tensors(model);
  write_safetensors((step / "model.safetensors").string(), tensors);
  ExperimentConfig exp;
  exp.model = cfg;
  exp.data.dir = data_dir;
  exp.data.tokenizer = tokenizer;
  std::ofstream(step / "config.yaml") << config_to_yaml(exp);
  write_safetensors((step / "optimizer.safetensors").string(), {});
  write_safetensors((step / "rng.safetensors").string(), {});
  std::ofstream(step / "state.json") << "{\"format_version\": 2}\n";  // the layout of these tensors
  write_manifest(step.string());
  std::ofstream(root / "latest") << "step-00000007\n";
  return step;
}

inline torch::Tensor moetrain_logits(Transformer model, const torch::Tensor& ids) {  // a holder: shares the module
  torch::NoGradGuard no_grad;
  return model->logits(model->forward(ids).hidden);
}

struct ExportResult {
  int rc = -1;
  std::string err;
};

inline ExportResult run_export(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  ExportResult r;
  ::testing::internal::CaptureStderr();
  r.rc = cmd_export(static_cast<int>(argv.size()), argv.data());
  r.err = ::testing::internal::GetCapturedStderr();
  return r;
}

}  // namespace moetrain::export_test
