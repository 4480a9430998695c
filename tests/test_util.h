// defines: TempDir, shell_quoted, write_file, run_capture, sentence_corpus, tiny_moe_config — small
// helpers shared by the tests.
#pragma once

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include <sys/wait.h>

#include "models/model_config.h"

namespace moetrain::testing {

// A fresh directory under the system temp dir, removed with its contents — unless the
// environment variable named by keep_env is set (to look at what a failing test wrote).
class TempDir {
 public:
  explicit TempDir(const char* keep_env = nullptr) : keep_env_(keep_env) {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("moetrain-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    if (keep_env_ != nullptr && std::getenv(keep_env_) != nullptr) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  const char* keep_env_;
  std::filesystem::path path_;
};

// s as one single-quoted shell word.
inline std::string shell_quoted(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

inline std::string write_file(const std::filesystem::path& path, const std::string& text) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
  return path.string();
}

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing stdout+stderr.
inline RunResult run_capture(const std::string& cmd) {
  RunResult r;
  FILE* pipe = popen((cmd + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.output.append(buf.data(), n);
  int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Repetitive English-like text (`lines` sentences, varied by doc): learnable in a few
// dozen steps by a byte-level model.
inline std::string sentence_corpus(int doc, int lines) {
  const char* subjects[] = {"the cat", "a dog", "the bird", "my friend"};
  const char* verbs[] = {"sat on", "looked at", "jumped over", "walked to"};
  const char* objects[] = {"the mat.", "the tree.", "a box.", "the door."};
  std::string s;
  for (int i = 0; i < lines; ++i) {
    int k = (i * 7 + doc * 3) % 64;
    s += std::string(subjects[k % 4]) + " " + verbs[(k / 4) % 4] + " " + objects[(k / 16) % 4] + "\n";
  }
  return s;
}

// A 2-layer MLA + MoE model small enough for exact CPU tests (4 experts, top-2, 1 shared).
inline ModelConfig tiny_moe_config(int64_t vocab_size, int64_t mtp_depth, double init_std) {
  ModelConfig c;
  c.vocab_size = vocab_size;
  c.hidden_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 16;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 8;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.first_k_dense_replace = 1;
  c.num_nextn_predict_layers = mtp_depth;
  c.init_std = init_std;
  return c;
}

}  // namespace moetrain::testing
