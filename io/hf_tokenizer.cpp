#include "io/hf_tokenizer.h"

#include <algorithm>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace moetrain {

namespace {

using Json = nlohmann::json;
using Kind = SentencePieceTokenizer::PieceKind;

bool utf8_continuation(unsigned char c) { return (c & 0xC0) == 0x80; }

int64_t utf8_chars(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += utf8_continuation(c) ? 0 : 1;
  return n;
}

}  // namespace

Json hf_tokenizer_json(const SentencePieceTokenizer& tok) {
  const int64_t n = tok.vocab_size();
  std::unordered_map<std::string, int64_t> ids;
  Json vocab = Json::object();
  Json added = Json::array();
  for (int64_t id = 0; id < n; ++id) {
    const std::string piece = tok.piece(id);
    ids.emplace(piece, id);
    vocab[piece] = id;
    const Kind kind = tok.piece_kind(id);
    if (kind == Kind::kUnknown || kind == Kind::kControl)
      added.push_back({{"id", id}, {"content", piece}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  // (result id, left chars, right chars, left id, right id) orders the merges.
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>> merges;
  for (int64_t id = 0; id < n; ++id) {
    if (tok.piece_kind(id) != Kind::kNormal) continue;
    const std::string piece = tok.piece(id);
    for (size_t k = 1; k < piece.size(); ++k) {
      if (utf8_continuation(static_cast<unsigned char>(piece[k]))) continue;  // split between characters only
      auto l = ids.find(piece.substr(0, k)), r = ids.find(piece.substr(k));
      if (l == ids.end() || r == ids.end()) continue;
      merges.emplace_back(id, utf8_chars(l->first), utf8_chars(r->first), l->second, r->second);
    }
  }
  std::sort(merges.begin(), merges.end());
  Json merge_list = Json::array();
  for (const auto& m : merges) merge_list.push_back({tok.piece(std::get<3>(m)), tok.piece(std::get<4>(m))});

  const std::string space_marker = "\xE2\x96\x81";  // U+2581 '▁'
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", space_marker}}},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder",
           {{"type", "Sequence"},
            {"decoders", Json::array({{{"type", "Replace"}, {"pattern", {{"String", space_marker}}}, {"content", " "}},
                                      {{"type", "ByteFallback"}},
                                      {{"type", "Fuse"}}})}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", "<unk>"},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", true},
            {"byte_fallback", true},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merge_list}}}};
}

Json hf_tokenizer_config_json(const SentencePieceTokenizer& tok, int64_t model_max_length) {
  return {{"tokenizer_class", "PreTrainedTokenizerFast"},
          {"bos_token", tok.piece(1)},
          {"eos_token", tok.piece(tok.eos_id())},
          {"unk_token", tok.piece(0)},
          {"pad_token", nullptr},
          {"add_bos_token", false},
          {"add_eos_token", false},
          {"split_special_tokens", true},
          {"clean_up_tokenization_spaces", false},
          {"model_max_length", model_max_length}};
}

}  // namespace moetrain
