// defines: TokenFile, Batch, DataLoaderState (+ JSON), DataLoader — memory-mapped
// token splits and deterministic, resumable batches.
//
// Training batches are a pure function of (train.seed, step): row i of the global
// batch of step s is the window of seq_len + 1 tokens starting at
//   hash_below(h(seed, s, i), train_tokens - seq_len)     (splitmix64 chain, data/hash.h)
// so any slice can be computed on its own, with no RNG state to save or replay.
// Data-parallel rank r of R at micro-step m takes rows
//   [(m·R + r)·micro_batch, (m·R + r + 1)·micro_batch)
// of that global batch; the union over (m, r) is the global batch whatever R and
// the accumulation split, so the data seen does not depend on them, and a resumed
// run (same seed, same step) reads exactly what the uninterrupted one would have.
// Windows may cross document boundaries (documents end with eos) and are drawn
// with replacement.
//
// Validation reads a fixed sequence of windows: window w starts at w·seq_len
// (the inputs tile the split; each token is a target at most once). Eval batch b
// holds windows b·global_batch + i, wrapping around when the split is shorter
// than eval_batches · global_batch windows, with the same rank slicing.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "data/meta.h"

namespace moetrain {

struct TrainConfig;

// A read-only mmap of a token file; its size is checked against meta.json.
class TokenFile {
 public:
  TokenFile() = default;
  TokenFile(const std::string& path, int64_t tokens, const std::string& dtype, int64_t vocab_size);  // throws DataError
  ~TokenFile();
  TokenFile(TokenFile&& o) noexcept;
  TokenFile& operator=(TokenFile&& o) noexcept;
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  int64_t size() const { return tokens_; }
  int64_t at(int64_t i) const;
  // out[0..count) = tokens [start, start + count); throws DataError on an id >= vocab.
  void read(int64_t start, int64_t count, int64_t* out) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t bytes_ = 0;
  int64_t tokens_ = 0, width_ = 2, vocab_size_ = 0;
};

struct Batch {
  torch::Tensor inputs;   // [B, T] int64, CPU
  torch::Tensor targets;  // [B, T] int64: inputs shifted left by one
};

// What a checkpoint saves. Batches depend on (seed, step) only; the rest is
// bookkeeping and consistency checks.
struct DataLoaderState {
  int64_t step = 0;           // optimizer steps whose batches were consumed
  int64_t tokens = 0;         // target tokens consumed (Σ global_batch · seq_len)
  bool epoch_warned = false;  // the one-time "more than one epoch" warning was given
  int64_t seed = 0;           // train.seed the batches came from
  int64_t train_tokens = 0;   // size of the training split they came from
};
void to_json(nlohmann::json& j, const DataLoaderState& s);
void from_json(const nlohmann::json& j, DataLoaderState& s);  // throws DataError on missing fields

class DataLoader {
 public:
  // Opens data_dir (meta.json, train.bin, val.bin). Throws DataError when it is
  // not prepared, a file's size disagrees with meta.json, or a split is shorter
  // than one window (seq_len + 1 tokens).
  DataLoader(const std::string& data_dir, const TrainConfig& train);

  const DataMeta& meta() const { return meta_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t global_batch_size() const { return global_batch_; }

  // --- training batches: pure functions of (seed, step) ---
  int64_t window_start(int64_t step, int64_t row) const;
  Batch rows(int64_t step, int64_t row_begin, int64_t count) const;
  Batch global_batch(int64_t step) const;
  Batch micro_batch(int64_t step, int64_t micro_step, int64_t rank, int64_t ranks) const;
  // global_batch / (micro_batch · ranks); throws DataError unless it divides.
  int64_t accumulation_steps(int64_t ranks) const;

  // --- the cursor a checkpoint saves ---
  const DataLoaderState& state() const { return state_; }
  // Throws DataError when `s` came from another seed or training split.
  void load_state(const DataLoaderState& s);
  Batch next_micro_batch(int64_t micro_step, int64_t rank, int64_t ranks) const {
    return micro_batch(state_.step, micro_step, rank, ranks);
  }
  void advance();         // after each optimizer step
  double epochs() const;  // tokens consumed / training tokens
  // Non-empty exactly once per run history: the warning to print when epochs() first exceeds 1.
  std::string take_epoch_warning();

  // --- validation, in a fixed order ---
  int64_t val_windows() const;
  int64_t val_window_start(int64_t window) const { return (window % val_windows()) * seq_len_; }
  Batch val_rows(int64_t batch, int64_t row_begin, int64_t count) const;
  Batch val_micro_batch(int64_t batch, int64_t micro_step, int64_t rank, int64_t ranks) const;

 private:
  int64_t slice_begin(int64_t micro_step, int64_t rank, int64_t ranks) const;
  Batch make_batch(const TokenFile& f, const std::vector<int64_t>& starts) const;

  DataMeta meta_;
  TokenFile train_, val_;
  int64_t seq_len_, global_batch_, micro_batch_;
  uint64_t seed_;
  DataLoaderState state_;
};

}  // namespace moetrain
