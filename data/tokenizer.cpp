#include "data/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <unordered_map>

#include <fmt/format.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "data/data_error.h"
#include "data/hash.h"
#include "data/meta.h"

namespace moetrain {

namespace {

constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Feeds string_views to the trainer without copying the whole sample up front.
class ViewIterator : public sentencepiece::SentenceIterator {
 public:
  explicit ViewIterator(const std::vector<std::string_view>& v) : v_(v) { load(); }
  bool done() const override { return i_ >= v_.size(); }
  void Next() override {
    ++i_;
    load();
  }
  const std::string& value() const override { return cur_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void load() {
    if (i_ < v_.size()) cur_.assign(v_[i_].data(), v_[i_].size());
  }
  const std::vector<std::string_view>& v_;
  size_t i_ = 0;
  std::string cur_;
};

}  // namespace

// ---------------------------------------------------------------------------
// byte

std::vector<int64_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int64_t id : ids) {
    if (id >= 0 && id < 256) out.push_back(static_cast<char>(id));
    else if (id != kEos) out += kReplacement;
  }
  return out;
}

// ---------------------------------------------------------------------------
// SentencePiece

SentencePieceTokenizer::SentencePieceTokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& model_path) : SentencePieceTokenizer() {
  auto st = sp_->Load(model_path);
  if (!st.ok()) throw DataError(fmt::format("{}: cannot load SentencePiece model ({})", model_path, st.ToString()));
  init_ids();
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_serialized(const std::string& model_proto) {
  std::unique_ptr<SentencePieceTokenizer> t(new SentencePieceTokenizer());
  auto st = t->sp_->LoadFromSerializedProto(model_proto);
  if (!st.ok()) throw DataError(fmt::format("cannot load SentencePiece model ({})", st.ToString()));
  t->init_ids();
  return t;
}

void SentencePieceTokenizer::init_ids() {
  newline_id_ = sp_->PieceToId("<0x0A>");
  if (newline_id_ == sp_->unk_id())
    throw DataError("SentencePiece model has no byte-fallback pieces (train it with byte_fallback=true)");
}

int64_t SentencePieceTokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int64_t SentencePieceTokenizer::eos_id() const { return sp_->eos_id(); }
std::string SentencePieceTokenizer::piece(int64_t id) const { return sp_->IdToPiece(static_cast<int>(id)); }

SentencePieceTokenizer::PieceKind SentencePieceTokenizer::piece_kind(int64_t id) const {
  const int i = static_cast<int>(id);
  if (sp_->IsUnknown(i)) return PieceKind::kUnknown;
  if (sp_->IsControl(i)) return PieceKind::kControl;
  if (sp_->IsByte(i)) return PieceKind::kByte;
  if (sp_->IsUnused(i)) return PieceKind::kOther;
  return PieceKind::kNormal;
}

std::vector<int64_t> SentencePieceTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 1);
  std::vector<int> tmp;
  size_t p = 0;
  while (p <= text.size()) {
    size_t q = text.find('\n', p);
    if (q == std::string_view::npos) q = text.size();
    if (q > p) {
      auto st = sp_->Encode(text.substr(p, q - p), &tmp);
      if (!st.ok()) throw std::runtime_error("SentencePiece encode failed: " + st.ToString());
      ids.insert(ids.end(), tmp.begin(), tmp.end());
    }
    if (q == text.size()) break;
    ids.push_back(newline_id_);
    p = q + 1;
  }
  return ids;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids) const {
  // SentencePiece rejects out-of-range ids; decode the valid runs between them.
  std::string out, part;
  std::vector<int> run;
  auto flush = [&] {
    if (run.empty()) return;
    auto st = sp_->Decode(run, &part);
    if (!st.ok()) throw std::runtime_error("SentencePiece decode failed: " + st.ToString());
    out += part;
    run.clear();
  };
  const int64_t n = vocab_size();
  for (int64_t id : ids) {
    if (id >= 0 && id < n) {
      run.push_back(static_cast<int>(id));
    } else {
      flush();
      out += kReplacement;
    }
  }
  flush();
  return out;
}

std::string train_sentencepiece(const std::vector<std::string_view>& sentences, const SentencePieceTrainOptions& opt) {
  if (sentences.empty()) throw DataError("no text to train the SentencePiece tokenizer on");
  // Pinned choices (see tokenizer.h): exact round trips, a fixed id layout, and
  // no sampling or shuffling inside SentencePiece (prepare.cpp samples).
  const std::unordered_map<std::string, std::string> kwargs = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"allow_whitespace_only_pieces", "true"},  // runs of indentation become one piece (~10% fewer tokens on rst)
      {"character_coverage", fmt::format("{}", opt.character_coverage)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"num_threads", std::to_string(opt.num_threads)},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      {"minloglevel", opt.verbose ? "0" : "1"},
  };
  sentencepiece::SetRandomGeneratorSeed(0x5eed);
  ViewIterator it(sentences);
  std::string model;
  auto st = sentencepiece::SentencePieceTrainer::Train(kwargs, &it, &model);
  if (!st.ok())
    throw DataError(fmt::format("SentencePiece could not train a {}-token BPE tokenizer: {}", opt.vocab_size,
                                st.ToString()));
  return model;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& data_dir) {
  const DataMeta meta = read_data_meta(data_dir);
  if (meta.tokenizer == "byte") return std::make_unique<ByteTokenizer>();
  if (meta.tokenizer != "sentencepiece")
    throw DataError(fmt::format("{}: unknown tokenizer kind '{}'", data_meta_path(data_dir), meta.tokenizer));
  const std::string path = (std::filesystem::path(data_dir) / meta.tokenizer_file).string();
  std::ifstream f(path, std::ios::binary);
  if (!f) throw DataError(fmt::format("{}: tokenizer file missing; re-run `moetrain data prepare`", path));
  std::ostringstream ss;
  ss << f.rdbuf();
  const std::string proto = std::move(ss).str();
  if (fnv1a64_hex(proto) != meta.tokenizer_hash)
    throw DataError(fmt::format("{}: tokenizer file does not match meta.json (hash {} != {}); re-run `moetrain data prepare`",
                                path, fnv1a64_hex(proto), meta.tokenizer_hash));
  auto t = SentencePieceTokenizer::from_serialized(proto);
  if (t->vocab_size() != meta.vocab_size)
    throw DataError(fmt::format("{}: tokenizer has {} pieces but meta.json says {}", path, t->vocab_size(), meta.vocab_size));
  return t;
}

}  // namespace moetrain
