#include "data/meta.h"

#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "data/data_error.h"
#include "trainer/experiment_config.h"

namespace moetrain {

using nlohmann::json;

std::string data_meta_path(const std::string& data_dir) {
  return (std::filesystem::path(data_dir) / "meta.json").string();
}

namespace {

json split_to_json(const SplitMeta& s) {
  return {{"file", s.file}, {"tokens", s.tokens}, {"documents", s.documents}, {"hash", s.hash}};
}

SplitMeta split_from_json(const json& j) {
  return {j.at("file").get<std::string>(), j.at("tokens").get<int64_t>(), j.at("documents").get<int64_t>(),
          j.at("hash").get<std::string>()};
}

}  // namespace

json data_meta_to_json(const DataMeta& m) {
  json sources = json::array();
  for (const auto& s : m.sources)
    sources.push_back({{"path", s.path}, {"size", s.size}, {"mtime_ns", s.mtime_ns}, {"hash", s.hash}});
  return {{"format_version", m.format_version},
          {"tokenizer",
           {{"kind", m.tokenizer},
            {"file", m.tokenizer_file},
            {"hash", m.tokenizer_hash},
            {"vocab_size", m.vocab_size},
            {"eos_id", m.eos_id},
            {"bos_id", m.bos_id},
            {"unk_id", m.unk_id}}},
          {"dtype", m.dtype},
          {"splits", {{"train", split_to_json(m.train)}, {"val", split_to_json(m.val)}}},
          {"settings", m.settings},
          {"stats", m.stats},
          {"sources", sources}};
}

DataMeta data_meta_from_json(const json& j) {
  DataMeta m;
  try {
    m.format_version = j.at("format_version").get<int>();
    if (m.format_version != kDataFormatVersion) return m;  // the caller reports the version
    const json& t = j.at("tokenizer");
    m.tokenizer = t.at("kind").get<std::string>();
    m.tokenizer_file = t.at("file").get<std::string>();
    m.tokenizer_hash = t.at("hash").get<std::string>();
    m.vocab_size = t.at("vocab_size").get<int64_t>();
    m.eos_id = t.at("eos_id").get<int64_t>();
    m.bos_id = t.value("bos_id", int64_t{-1});
    m.unk_id = t.value("unk_id", int64_t{-1});
    m.dtype = j.at("dtype").get<std::string>();
    m.train = split_from_json(j.at("splits").at("train"));
    m.val = split_from_json(j.at("splits").at("val"));
    m.settings = j.value("settings", json::object());
    m.stats = j.value("stats", json::object());
    for (const auto& s : j.value("sources", json::array()))
      m.sources.push_back({s.at("path").get<std::string>(), s.at("size").get<int64_t>(),
                           s.at("mtime_ns").get<int64_t>(), s.at("hash").get<std::string>()});
  } catch (const json::exception& e) {
    throw DataError(fmt::format("meta.json: missing or malformed field ({})", e.what()));
  }
  return m;
}

DataMeta read_data_meta(const std::string& data_dir) {
  const std::string path = data_meta_path(data_dir);
  std::ifstream f(path);
  if (!f)
    throw DataError(fmt::format("{}: no prepared data here (missing meta.json); run `moetrain data prepare CONFIG` first",
                                data_dir));
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    throw DataError(fmt::format("{}: not valid JSON ({}); re-run `moetrain data prepare`", path, e.what()));
  }
  DataMeta m = data_meta_from_json(j);
  if (m.format_version != kDataFormatVersion)
    throw DataError(fmt::format("{}: data format version {} (this moetrain reads {}); re-run `moetrain data prepare`",
                                path, m.format_version, kDataFormatVersion));
  token_dtype_size(m.dtype);  // validates
  return m;
}

std::string token_dtype_for_vocab(int64_t vocab_size) { return vocab_size < 65536 ? "uint16" : "uint32"; }

int64_t token_dtype_size(const std::string& dtype) {
  if (dtype == "uint16") return 2;
  if (dtype == "uint32") return 4;
  throw DataError(fmt::format("meta.json: unknown token dtype '{}' (expected uint16 or uint32)", dtype));
}

void check_compatible(const DataMeta& meta, const ModelConfig& model, const TrainConfig& train) {
  std::vector<std::string> problems;
  if (meta.tokenizer == "sentencepiece" && model.vocab_size != meta.vocab_size)
    problems.push_back(fmt::format(
        "model.vocab_size is {} but the data's SentencePiece tokenizer has {} tokens; they must be equal "
        "(set model.vocab_size: {}, or re-run `moetrain data prepare` with this config)",
        model.vocab_size, meta.vocab_size, meta.vocab_size));
  else if (model.vocab_size < meta.vocab_size)
    problems.push_back(fmt::format("model.vocab_size is {} but the data's {} tokenizer needs at least {}",
                                   model.vocab_size, meta.tokenizer, meta.vocab_size));
  const int64_t need = train.seq_len + 1;
  if (meta.train.tokens < need)
    problems.push_back(fmt::format("the training split has {} tokens, shorter than one sequence (train.seq_len + 1 = {})",
                                   meta.train.tokens, need));
  if (meta.val.tokens < need)
    problems.push_back(fmt::format(
        "the validation split has {} tokens, shorter than one sequence (train.seq_len + 1 = {}); raise data.val_fraction",
        meta.val.tokens, need));
  if (problems.empty()) return;
  std::string msg = "the prepared data does not fit this config:";
  for (const auto& p : problems) msg += "\n  " + p;
  throw DataError(msg);
}

}  // namespace moetrain
