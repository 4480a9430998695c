// defines: DataConfig — where text comes from and how it becomes token files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moetrain {

struct DataConfig {
  std::string dir = "data_cache/default";  // token files + metadata land here
  std::vector<std::string> sources;        // globs of plain-text (optionally .gz) documents; `**` recurses
  std::vector<std::string> exclude;        // globs matched against each found path (e.g. "**/translations/**")
  std::string tokenizer = "byte";          // byte | sentencepiece
  double val_fraction = 0.05;              // share of documents held out for validation
  std::string doc_separator;               // empty: one document per file
  int64_t input_sentence_size = 200000;    // SentencePiece training sample (bounds its time)
};

}  // namespace moetrain
