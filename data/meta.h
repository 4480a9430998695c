// defines: DataMeta, SplitMeta, kDataFormatVersion, read_data_meta,
// data_meta_to_json, data_meta_from_json, token_dtype_for_vocab, token_dtype_size,
// check_compatible — the meta.json that describes a prepared data directory.
//
// A data directory (data.dir) holds train.bin and val.bin (raw little-endian
// uint16 when the vocab < 65536, else uint32; documents separated by eos), the
// tokenizer file (tokenizer.model for SentencePiece; none for byte) and
// meta.json. meta.json is written last, so a directory without it is not a
// dataset; everything a reader needs (dtype, counts, tokenizer) is in it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/corpus.h"
#include "models/model_config.h"

namespace moetrain {

struct TrainConfig;

constexpr int kDataFormatVersion = 1;

struct SplitMeta {
  std::string file;       // relative to the data dir: "train.bin" / "val.bin"
  int64_t tokens = 0;     // eos included
  int64_t documents = 0;
  std::string hash;       // FNV-1a 64 of the file's bytes
};

struct DataMeta {
  int format_version = kDataFormatVersion;
  std::string tokenizer;       // "byte" | "sentencepiece"
  std::string tokenizer_file;  // relative to the data dir; empty for byte
  std::string tokenizer_hash;  // FNV-1a 64 of the tokenizer file
  int64_t vocab_size = 0;      // of the tokenizer
  int64_t eos_id = -1, bos_id = -1, unk_id = -1;
  std::string dtype;           // "uint16" | "uint32"
  SplitMeta train, val;
  std::vector<SourceFile> sources;  // path, size, mtime_ns, hash of every input
  nlohmann::json settings;          // every input that decides the output; the up-to-date check compares it
  nlohmann::json stats;             // informational: bytes, seconds, tokens_per_s
};

std::string data_meta_path(const std::string& data_dir);

nlohmann::json data_meta_to_json(const DataMeta& m);
DataMeta data_meta_from_json(const nlohmann::json& j);  // throws DataError on missing fields

// DIR/meta.json. Throws DataError when it is missing ("run moetrain data prepare"),
// unparsable or of another format version.
DataMeta read_data_meta(const std::string& data_dir);

std::string token_dtype_for_vocab(int64_t vocab_size);  // "uint16" below 65536, else "uint32"
int64_t token_dtype_size(const std::string& dtype);     // 2 | 4; throws DataError otherwise

// The checks the trainer runs before building anything; throws DataError listing
// every problem: a model vocab smaller than the tokenizer's (or, for SentencePiece,
// different from it), splits shorter than one sequence (seq_len + 1 tokens).
void check_compatible(const DataMeta& meta, const ModelConfig& model, const TrainConfig& train);

}  // namespace moetrain
