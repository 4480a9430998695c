// defines: hf_tokenizer_json, hf_tokenizer_config_json — moetrain's SentencePiece BPE
// tokenizer as the tokenizer.json + tokenizer_config.json pair that transformers'
// AutoTokenizer loads with the `tokenizers` library alone (no sentencepiece or
// protobuf package needed), encoding exactly as data/tokenizer.h does:
//   normalizer  ' ' → '▁' (identity normalization otherwise, no dummy prefix)
//   model       BPE over the pieces (vocab = piece → id), byte fallback, unk <unk>;
//               merges: for every normal piece in id order, each split at a UTF-8
//               character boundary whose halves are both pieces, left-length order —
//               the list transformers' own SentencePiece converter derives
//   decoder     '▁' → ' ', byte fallback, fuse
//   special     <unk> 0, <s> 1, </s> 2 (never added: moetrain's documents only end with eos);
//               split_special_tokens so a literal "<s>" in text stays text, as in training.
#pragma once

#include <cstdint>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"

namespace moetrain {

nlohmann::json hf_tokenizer_json(const SentencePieceTokenizer& tok);
nlohmann::json hf_tokenizer_config_json(const SentencePieceTokenizer& tok, int64_t model_max_length);

}  // namespace moetrain
