// Tokenizers: exact round trips (byte: any bytes; SentencePiece: UTF-8 text with
// whitespace, newlines and characters it never saw), the fixed id layout,
// deterministic training and load_tokenizer's checks.
#include <gtest/gtest.h>

#include <random>

#include "data/data_error.h"
#include "data/hash.h"
#include "data/meta.h"
#include "data/tokenizer.h"
#include "test_util.h"

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

// A few KB of English-like lines over a small alphabet (SentencePiece needs
// vocab > characters + 259 specials).
std::string training_text() {
  const char* words[] = {"the", "kernel", "memory", "page", "driver", "device", "lock", "map", "task", "queue",
                         "and", "of", "to", "in", "is", "a", "for", "with", "read", "write"};
  std::mt19937 rng(7);
  std::string text;
  for (int line = 0; line < 300; ++line) {
    int n = 3 + static_cast<int>(rng() % 9);
    if (line % 7 == 0) text += "    ";  // indentation, as in rst
    for (int w = 0; w < n; ++w) text += std::string(w ? " " : "") + words[rng() % 20];
    text += line % 5 == 0 ? ".\n\n" : ",\n";
  }
  return text;
}

std::vector<std::string_view> lines_of(const std::string& text) {
  std::vector<std::string_view> out;
  size_t p = 0;
  while (p < text.size()) {
    size_t q = std::min(text.find('\n', p), text.size());
    if (q > p) out.push_back(std::string_view(text).substr(p, q - p));
    p = q + 1;
  }
  return out;
}

std::string tiny_model(int64_t vocab = 320) {
  static const std::string text = training_text();
  SentencePieceTrainOptions opt;
  opt.vocab_size = vocab;
  return train_sentencepiece(lines_of(text), opt);
}

const std::vector<std::string>& samples() {
  static const std::vector<std::string> s = {
      "the kernel maps a page",
      "  two leading spaces and   runs   of spaces  ",
      "lines\nwith\n\nnewlines\n",
      "\n\n\n",
      "tabs\tand\r\ncarriage returns",
      "unseen Capitals, digits 0123456789 and punctuation: {}[]()!?",
      "ünïcödé, 日本語, emoji 🙂 — never in the training text",
      "",
      " ",
      "driver\n    indented code block\n        deeper",
  };
  return s;
}

TEST(ByteTokenizer, ExactOnArbitraryBytes) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.vocab_size(), 257);
  EXPECT_EQ(tok.eos_id(), 256);
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  std::vector<std::string> inputs = samples();
  inputs.push_back(all);
  inputs.push_back("\xff\xfe invalid \xc3 utf-8 \x80");
  inputs.push_back(std::string("nul\0inside", 10));
  for (const auto& s : inputs) {
    auto ids = tok.encode(s);
    ASSERT_EQ(ids.size(), s.size());
    for (auto id : ids) ASSERT_TRUE(id >= 0 && id < 256);
    EXPECT_EQ(tok.decode(ids), s);
  }
}

TEST(ByteTokenizer, DecodeDropsEosAndMarksOutOfRange) {
  ByteTokenizer tok;
  EXPECT_EQ(tok.decode({'a', 256, 'b'}), "ab");
  EXPECT_EQ(tok.decode({'a', 300, -1}), "a\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(SentencePiece, RoundTripIsExact) {
  auto tok = SentencePieceTokenizer::from_serialized(tiny_model());
  EXPECT_EQ(tok->vocab_size(), 320);
  for (const auto& s : samples()) {
    auto ids = tok->encode(s);
    for (auto id : ids) ASSERT_TRUE(id >= 0 && id < 320);
    EXPECT_EQ(tok->decode(ids), s) << "input: [" << s << "]";
  }
  // The training text itself, as one string.
  const std::string text = training_text();
  auto ids = tok->encode(text);
  EXPECT_EQ(tok->decode(ids), text);
  EXPECT_LT(ids.size(), text.size() * 2 / 3) << "BPE should compress its own training text";
}

TEST(SentencePiece, FixedSpecialLayout) {
  auto tok = SentencePieceTokenizer::from_serialized(tiny_model());
  EXPECT_EQ(tok->piece(0), "<unk>");
  EXPECT_EQ(tok->piece(1), "<s>");
  EXPECT_EQ(tok->piece(2), "</s>");
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->piece(3), "<0x00>");
  EXPECT_EQ(tok->piece(258), "<0xFF>");
  // '\n' is its byte piece; eos is dropped by decode; out-of-range ids show as U+FFFD.
  EXPECT_EQ(tok->encode("\n"), std::vector<int64_t>{3 + '\n'});
  auto ids = tok->encode("the page");
  ids.insert(ids.begin() + 1, 2);
  EXPECT_EQ(tok->decode(ids), "the page");
  EXPECT_EQ(tok->decode({5000, -3}), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(SentencePiece, LineByLineEqualsConcatenation) {
  // encode() splits at '\n'; pieces never contain '\n', so splitting anywhere at
  // a newline gives the same ids as encoding the pieces separately.
  auto tok = SentencePieceTokenizer::from_serialized(tiny_model());
  auto a = tok->encode("the kernel\n  lock");
  auto b = tok->encode("the kernel");
  auto c = tok->encode("  lock");
  b.push_back(3 + '\n');
  b.insert(b.end(), c.begin(), c.end());
  EXPECT_EQ(a, b);
}

TEST(SentencePiece, TrainingIsDeterministic) { EXPECT_EQ(fnv1a64_hex(tiny_model()), fnv1a64_hex(tiny_model())); }

TEST(SentencePiece, TooSmallVocabIsADataError) {
  try {
    tiny_model(100);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("SentencePiece could not train a 100-token"), std::string::npos) << e.what();
  }
}

DataMeta sp_meta(const std::string& proto) {
  DataMeta m;
  m.tokenizer = "sentencepiece";
  m.tokenizer_file = "tokenizer.model";
  m.tokenizer_hash = fnv1a64_hex(proto);
  m.vocab_size = 320;
  m.eos_id = 2;
  m.dtype = "uint16";
  m.train = {"train.bin", 0, 0, ""};
  m.val = {"val.bin", 0, 0, ""};
  return m;
}

TEST(LoadTokenizer, FromMetaJson) {
  TempDir dir;
  const std::string proto = tiny_model();
  write_file(dir.path() / "tokenizer.model", proto);
  write_file(dir.path() / "meta.json", data_meta_to_json(sp_meta(proto)).dump());
  auto tok = load_tokenizer(dir.path().string());
  EXPECT_EQ(tok->kind(), "sentencepiece");
  EXPECT_EQ(tok->decode(tok->encode("the lock\nmap")), "the lock\nmap");

  DataMeta byte = sp_meta(proto);
  byte.tokenizer = "byte";
  byte.tokenizer_file = "";
  write_file(dir.path() / "meta.json", data_meta_to_json(byte).dump());
  EXPECT_EQ(load_tokenizer(dir.path().string())->kind(), "byte");
}

TEST(LoadTokenizer, RejectsAChangedModelFileAndMissingMeta) {
  TempDir dir;
  const std::string proto = tiny_model();
  write_file(dir.path() / "meta.json", data_meta_to_json(sp_meta(proto)).dump());
  write_file(dir.path() / "tokenizer.model", tiny_model(330));
  EXPECT_THROW(load_tokenizer(dir.path().string()), DataError);
  TempDir empty;
  try {
    load_tokenizer(empty.path().string());
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("moetrain data prepare"), std::string::npos) << e.what();
  }
}

}  // namespace
