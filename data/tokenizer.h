// defines: Tokenizer (encode/decode/vocab_size/eos_id), ByteTokenizer,
// SentencePieceTokenizer, SentencePieceTrainOptions, train_sentencepiece,
// load_tokenizer.
//
// Special-token layout (fixed; recorded in meta.json):
//   byte:          ids 0..255 = bytes, eos = 256; vocab 257. A model may have a
//                  larger vocab_size (ids >= 257 are never produced).
//   sentencepiece: unk = 0, bos = 1, eos = 2, no pad; ids 3..258 = byte-fallback
//                  pieces <0x00>..<0xFF>; then the learned BPE merges. The model's
//                  vocab_size must equal the tokenizer's.
// Only eos is written into token files (after every document); bos/unk exist
// because SentencePiece needs them, and unk never occurs thanks to byte fallback.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace moetrain {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Line-local: encode(a + "\n" + b) == encode(a + "\n") followed by encode(b),
  // which lets prepare encode long documents in pieces on several threads.
  virtual std::vector<int64_t> encode(std::string_view text) const = 0;
  // Ids of special tokens (eos, bos) are dropped; ids outside the vocabulary
  // (a model with a larger vocab_size can sample them) become U+FFFD.
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t eos_id() const = 0;
  virtual std::string kind() const = 0;  // "byte" | "sentencepiece"
};

// Exact on any bytes: decode(encode(x)) == x, invalid UTF-8 included.
class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int64_t kEos = 256;
  static constexpr int64_t kVocab = 257;
  std::vector<int64_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override { return kVocab; }
  int64_t eos_id() const override { return kEos; }
  std::string kind() const override { return "byte"; }
};

// SentencePiece BPE trained by train_sentencepiece (identity normalization, no
// dummy prefix, whitespace kept, byte fallback), so decode(encode(x)) == x for
// valid UTF-8 text without U+2581 ('▁', SentencePiece's space marker, which
// decodes to ' '); invalid UTF-8 comes back as U+FFFD.
//
// Text is encoded line by line with '\n' as its byte-fallback piece <0x0A>: no
// piece contains '\n' (training sees lines), so this equals encoding the whole
// text at once, minus SentencePiece's superlinear cost on long inputs.
class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model_path);  // throws DataError
  static std::unique_ptr<SentencePieceTokenizer> from_serialized(const std::string& model_proto);
  ~SentencePieceTokenizer() override;
  std::vector<int64_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override;
  int64_t eos_id() const override;
  std::string kind() const override { return "sentencepiece"; }
  std::string piece(int64_t id) const;  // for debugging and tests
  // What kind of piece an id is (the model proto's type; user-defined pieces, which moetrain never
  // trains, read as normal), for converters such as io/hf_tokenizer.
  enum class PieceKind { kNormal, kUnknown, kControl, kByte, kOther };
  PieceKind piece_kind(int64_t id) const;

 private:
  SentencePieceTokenizer();
  void init_ids();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int newline_id_ = -1;
};

struct SentencePieceTrainOptions {
  int64_t vocab_size = 4096;
  int num_threads = 2;
  double character_coverage = 0.9995;  // rarer characters fall back to bytes
  bool verbose = false;                // SentencePiece's own INFO log on stderr
};

// Trains BPE on `sentences` (one training line each; the caller samples them —
// see prepare.cpp) and returns the serialized model. SentencePiece's shuffling
// and sampling are disabled and its RNG seeded, so the result depends on the
// sentences alone. Throws DataError when SentencePiece refuses (e.g. a vocab
// smaller than the required characters + 259 specials).
std::string train_sentencepiece(const std::vector<std::string_view>& sentences, const SentencePieceTrainOptions& opt);

// The tokenizer recorded in DIR/meta.json (its file's hash is checked).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& data_dir);

}  // namespace moetrain
