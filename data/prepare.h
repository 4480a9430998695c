// defines: PrepareOptions, PrepareResult, prepare_data, data_staleness,
// prepare_settings — `moetrain data prepare`: sources → tokenizer → train.bin /
// val.bin / meta.json in data.dir, skipped when nothing changed.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "data/data_config.h"
#include "data/meta.h"

namespace moetrain {

struct PrepareOptions {
  bool force = false;      // re-prepare even when up to date
  int threads = 2;         // encoding workers
  bool progress = true;    // progress bars and stage lines on stderr
  int64_t min_tokens = 0;  // each split must hold this many tokens (train.seq_len + 1)
};

struct PrepareResult {
  bool up_to_date = false;  // nothing was done
  std::string reason;       // why it was (re)prepared: "no prepared data", "inputs changed: …", "--force"
  DataMeta meta;
  double seconds = 0;            // whole call
  double tokenizer_seconds = 0;  // SentencePiece training
  double encode_seconds = 0;
  double tokens_per_s = 0;  // train + val tokens / encode seconds
};

// Prepares data.dir for a model of `model_vocab_size` (SentencePiece trains exactly
// that many tokens; the byte tokenizer needs >= 257). Bad inputs throw DataError
// before anything is written. Output is built in data.dir/.tmp-prepare-<pid>/ and
// moved into place with meta.json last (after the old one is removed), so an
// interrupted run never leaves a directory that looks prepared. Two prepares of
// the same data.dir at once are not supported.
PrepareResult prepare_data(const DataConfig& data, int64_t model_vocab_size, const PrepareOptions& opt = {});

// "" when data.dir holds data prepared from these settings and unchanged inputs
// (same paths, sizes and mtimes) with intact output files; otherwise the reason.
// Throws DataError for bad sources (as prepare_data would).
std::string data_staleness(const DataConfig& data, int64_t model_vocab_size);

// Everything besides the input files that decides prepare's output.
nlohmann::json prepare_settings(const DataConfig& data, int64_t model_vocab_size);

}  // namespace moetrain
