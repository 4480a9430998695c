// `data prepare` end to end on tiny temp corpora (.txt and .gz): globs, the
// document split, output files and meta.json, up-to-date detection, crash-safe
// writes, every bad-input error and the command's exit codes.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <zlib.h>

#include "data/corpus.h"
#include "data/data_error.h"
#include "data/dataset.h"
#include "data/glob.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

namespace moetrain {
int cmd_data(int argc, char** argv);
}

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;
namespace fs = std::filesystem;

namespace {

void write_gz(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  gzFile f = gzopen(path.c_str(), "wb");
  gzwrite(f, text.data(), static_cast<unsigned>(text.size()));
  gzclose(f);
}

std::string doc_text(int i) {
  std::string s = "Document " + std::to_string(i) + ": the kernel maps a page of memory for the driver.\n";
  for (int k = 0; k < i % 5 + 2; ++k) s += "    indented line " + std::to_string(k) + " of the device queue\n";
  return s + "ünïcödé tail\n";
}

// 12 documents in 4 files, two of them gzipped, one split by a separator;
// plus a translations/ file that data.exclude drops.
struct TinyCorpus {
  TempDir dir;
  std::set<std::string> docs;  // every document's text
  DataConfig cfg;
  TinyCorpus() {
    int i = 0;
    for (const char* name : {"a/one.txt", "a/b/two.txt"}) {
      docs.insert(doc_text(i));
      write_file(dir.path() / "src" / name, doc_text(i++));
    }
    docs.insert(doc_text(i));
    write_gz(dir.path() / "src/a/b/c/three.txt.gz", doc_text(i++));
    std::string multi;
    for (int k = 0; k < 9; ++k) {
      docs.insert(doc_text(i));
      multi += doc_text(i++) + "\x1e";  // ASCII record separator
    }
    write_gz(dir.path() / "src/many.txt.gz", multi + "  \n");  // a whitespace-only tail is not a document
    write_file(dir.path() / "src/translations/skip.txt", "excluded text");
    write_file(dir.path() / "src/notes.md", "not matched");
    cfg.dir = (dir.path() / "out").string();
    cfg.sources = {(dir.path() / "src/**/*.txt").string(), (dir.path() / "src/**/*.gz").string()};
    cfg.exclude = {"**/translations/**"};
    cfg.tokenizer = "byte";
    cfg.doc_separator = "\x1e";
    cfg.val_fraction = 0.25;
  }
};

PrepareOptions quiet(int64_t min_tokens = 0) {
  PrepareOptions o;
  o.progress = false;
  o.min_tokens = min_tokens;
  return o;
}

std::vector<int64_t> read_split(const std::string& dir, const SplitMeta& s, const DataMeta& m) {
  TokenFile f((fs::path(dir) / s.file).string(), s.tokens, m.dtype, m.vocab_size);
  std::vector<int64_t> ids(f.size());
  f.read(0, f.size(), ids.data());
  return ids;
}

// Decodes a split back into its documents (eos-terminated).
std::vector<std::string> split_docs(const std::vector<int64_t>& ids, const Tokenizer& tok) {
  std::vector<std::string> out;
  std::vector<int64_t> cur;
  for (int64_t id : ids) {
    if (id == tok.eos_id()) {
      out.push_back(tok.decode(cur));
      cur.clear();
    } else {
      cur.push_back(id);
    }
  }
  EXPECT_TRUE(cur.empty()) << "every split ends with eos";
  return out;
}

void expect_split_by_document(const TinyCorpus& c, const DataMeta& m) {
  auto tok = load_tokenizer(c.cfg.dir);
  auto train = split_docs(read_split(c.cfg.dir, m.train, m), *tok);
  auto val = split_docs(read_split(c.cfg.dir, m.val, m), *tok);
  EXPECT_EQ(static_cast<int64_t>(train.size()), m.train.documents);
  EXPECT_EQ(static_cast<int64_t>(val.size()), m.val.documents);
  EXPECT_GE(val.size(), 1u);
  std::set<std::string> all(train.begin(), train.end());
  for (const auto& d : val) EXPECT_TRUE(all.insert(d).second) << "document on both sides: " << d;
  EXPECT_EQ(all, c.docs);
}

TEST(Glob, RecursiveStarAndExclude) {
  TempDir d;
  for (const char* f : {"x/a.txt", "x/y/b.txt", "x/y/z/c.txt", "x/y/z/c.md", "x/.hidden/d.txt", "x/e.txt.gz"})
    write_file(d.path() / f, "t");
  const std::string root = d.path().string();
  auto rel = [&](std::vector<std::string> v) {
    for (auto& s : v) s = fs::path(s).lexically_relative(d.path()).string();
    return v;
  };
  EXPECT_EQ(rel(glob_expand(root + "/x/**/*.txt")), (std::vector<std::string>{"x/a.txt", "x/y/b.txt", "x/y/z/c.txt"}));
  EXPECT_EQ(rel(glob_expand(root + "/x/*/*.txt")), (std::vector<std::string>{"x/y/b.txt"}));
  EXPECT_EQ(rel(glob_expand(root + "/x/**")).size(), 5u);
  EXPECT_EQ(rel(glob_expand(root + "/x/y/z/c.md")), (std::vector<std::string>{"x/y/z/c.md"}));
  EXPECT_TRUE(glob_expand(root + "/nope/**/*.txt").empty());
  EXPECT_TRUE(glob_match("**/y/**", root + "/x/y/z/c.txt"));
  EXPECT_TRUE(glob_match("/a/**/b/*.gz", "/a/b/c.gz"));
  EXPECT_FALSE(glob_match("**/translations/**", "/docs/translation/a.rst"));
}

TEST(Corpus, ReadsPlainGzipConcatenatedAndDictzip) {
  TempDir d;
  write_file(d.path() / "plain.txt", "plain text\n");
  write_gz(d.path() / "one.txt.gz", "gzipped text\n");
  write_gz(d.path() / "dict.dz", "gzip by magic, not by name\n");
  std::string twice;
  {
    std::ifstream f(d.path() / "one.txt.gz", std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    twice = ss.str() + ss.str();  // `cat a.gz a.gz` is valid gzip
  }
  write_file(d.path() / "two.gz", twice);
  Fnv1a64 h;
  EXPECT_EQ(read_source_file((d.path() / "plain.txt").string(), &h), "plain text\n");
  EXPECT_EQ(h.hex(), fnv1a64_hex("plain text\n"));
  EXPECT_EQ(read_source_file((d.path() / "one.txt.gz").string()), "gzipped text\n");
  EXPECT_EQ(read_source_file((d.path() / "dict.dz").string()), "gzip by magic, not by name\n");
  EXPECT_EQ(read_source_file((d.path() / "two.gz").string()), "gzipped text\ngzipped text\n");
  write_file(d.path() / "cut.gz", twice.substr(0, twice.size() / 2 - 5));
  EXPECT_THROW(read_source_file((d.path() / "cut.gz").string()), DataError);
  EXPECT_THROW(read_source_file((d.path() / "absent.txt").string()), DataError);
}

TEST(Corpus, DocumentSplitIsStableAndHasBothSides) {
  TinyCorpus c;
  Corpus corpus = read_corpus(find_sources(c.cfg), c.cfg);
  EXPECT_EQ(corpus.files.size(), 4u);  // translations/ excluded, .md not matched
  EXPECT_EQ(corpus.docs.size(), 12u);
  // Temp paths are random, so the hash may pick no document; then exactly one is forced.
  int64_t by_hash = 0;
  for (const auto& d : corpus.docs) by_hash += is_val_document(corpus.files[d.file].path, d.index, c.cfg.val_fraction);
  for (const auto& d : corpus.docs) {
    if (by_hash > 0 && by_hash < 12) {
      EXPECT_EQ(d.val, is_val_document(corpus.files[d.file].path, d.index, c.cfg.val_fraction));
    }
  }
  EXPECT_EQ(corpus.num_docs(true), by_hash == 0 ? 1 : by_hash == 12 ? 11 : by_hash);
  DataConfig none = c.cfg;
  none.val_fraction = 1e-9;  // the hash picks nobody: the lowest key still goes to validation
  Corpus forced = read_corpus(find_sources(none), none);
  EXPECT_EQ(forced.num_docs(true), 1);
}

TEST(Prepare, ByteEndToEndThenUpToDateThenReprepare) {
  TinyCorpus c;
  PrepareResult r = prepare_data(c.cfg, 2048, quiet());
  EXPECT_FALSE(r.up_to_date);
  EXPECT_EQ(r.reason, "no prepared data");
  for (const char* f : {"train.bin", "val.bin", "meta.json"}) EXPECT_TRUE(fs::exists(fs::path(c.cfg.dir) / f)) << f;
  const DataMeta m = read_data_meta(c.cfg.dir);
  EXPECT_EQ(m.tokenizer, "byte");
  EXPECT_EQ(m.vocab_size, 257);
  EXPECT_EQ(m.dtype, "uint16");
  EXPECT_EQ(m.train.documents + m.val.documents, 12);
  int64_t bytes = 0;
  for (const auto& d : c.docs) bytes += static_cast<int64_t>(d.size()) + 1;  // + eos
  EXPECT_EQ(m.train.tokens + m.val.tokens, bytes);
  EXPECT_EQ(static_cast<int64_t>(fs::file_size(fs::path(c.cfg.dir) / "train.bin")), 2 * m.train.tokens);
  EXPECT_EQ(m.sources.size(), 4u);
  expect_split_by_document(c, m);

  PrepareResult again = prepare_data(c.cfg, 2048, quiet());
  EXPECT_TRUE(again.up_to_date) << again.reason;
  EXPECT_EQ(again.meta.train.hash, m.train.hash);

  const fs::path touched = c.dir.path() / "src/a/one.txt";
  fs::last_write_time(touched, fs::last_write_time(touched) + std::chrono::seconds(10));
  PrepareResult re = prepare_data(c.cfg, 2048, quiet());
  EXPECT_FALSE(re.up_to_date);
  EXPECT_NE(re.reason.find("one.txt was modified"), std::string::npos) << re.reason;
  EXPECT_EQ(re.meta.train.hash, m.train.hash) << "same content, same tokens";
  EXPECT_TRUE(prepare_data(c.cfg, 2048, quiet()).up_to_date);

  write_file(c.dir.path() / "src/new.txt", "a brand new document\n");
  EXPECT_NE(prepare_data(c.cfg, 2048, quiet()).reason.find("set of source files"), std::string::npos);
  DataConfig other = c.cfg;
  other.val_fraction = 0.4;
  EXPECT_EQ(prepare_data(other, 2048, quiet()).reason, "settings changed");
  fs::remove(fs::path(c.cfg.dir) / "val.bin");
  EXPECT_EQ(prepare_data(other, 2048, quiet()).reason, "val.bin is missing or damaged");
  PrepareOptions force = quiet();
  force.force = true;
  EXPECT_EQ(prepare_data(other, 2048, force).reason, "--force");
}

TEST(Prepare, SentencePieceEndToEnd) {
  TinyCorpus c;
  c.cfg.tokenizer = "sentencepiece";
  PrepareResult r = prepare_data(c.cfg, 300, quiet());
  const DataMeta& m = r.meta;
  EXPECT_EQ(m.vocab_size, 300);
  EXPECT_EQ(m.eos_id, 2);
  EXPECT_EQ(m.tokenizer_file, "tokenizer.model");
  EXPECT_TRUE(fs::exists(fs::path(c.cfg.dir) / "tokenizer.model"));
  EXPECT_GT(r.tokens_per_s, 0);
  expect_split_by_document(c, m);
  EXPECT_TRUE(prepare_data(c.cfg, 300, quiet()).up_to_date);
  EXPECT_EQ(prepare_data(c.cfg, 320, quiet()).reason, "settings changed");  // vocab follows the model

  ModelConfig model;
  model.vocab_size = 320;
  TrainConfig train;
  train.seq_len = 16;
  EXPECT_NO_THROW(check_compatible(read_data_meta(c.cfg.dir), model, train));
  model.vocab_size = 300;
  EXPECT_THROW(check_compatible(read_data_meta(c.cfg.dir), model, train), DataError);
}

TEST(Prepare, HugeDocumentsAreEncodedInPiecesExactly) {
  // A 2.5 MB document is encoded as several 1 MiB pieces on 2 threads; its
  // tokens must equal encoding it whole.
  TempDir d;
  std::string big;
  for (int i = 0; big.size() < 2500000; ++i) big += doc_text(i % 50) + (i % 3 ? "" : "\n");
  write_file(d.path() / "src/big.txt", big);
  write_file(d.path() / "src/small.txt", doc_text(1));
  write_file(d.path() / "src/small2.txt", doc_text(2));
  DataConfig cfg;
  cfg.dir = (d.path() / "out").string();
  cfg.sources = {(d.path() / "src/*.txt").string()};
  cfg.tokenizer = "sentencepiece";
  cfg.val_fraction = 0.01;
  const DataMeta m = prepare_data(cfg, 300, quiet()).meta;
  auto tok = load_tokenizer(cfg.dir);
  std::vector<int64_t> want = tok->encode(big);
  want.push_back(tok->eos_id());
  std::vector<int64_t> all = read_split(cfg.dir, m.train, m);  // big.txt is on one side or the other
  const std::vector<int64_t> val = read_split(cfg.dir, m.val, m);
  all.insert(all.end(), val.begin(), val.end());
  EXPECT_NE(std::search(all.begin(), all.end(), want.begin(), want.end()), all.end());
  EXPECT_GT(want.size(), 500000u);
}

TEST(Prepare, FailedRunKeepsTheOldDatasetAndLeavesNoTemp) {
  TinyCorpus c;
  prepare_data(c.cfg, 2048, quiet());
  const std::string before = read_data_meta(c.cfg.dir).train.hash;
  write_file(fs::path(c.cfg.dir) / ".tmp-prepare-999999/junk", "from a crashed run");
  PrepareOptions big = quiet(1000000);
  big.force = true;
  EXPECT_THROW(prepare_data(c.cfg, 2048, big), DataError);  // too small for seq_len: nothing written
  EXPECT_EQ(read_data_meta(c.cfg.dir).train.hash, before);
  PrepareOptions force = quiet();
  force.force = true;
  prepare_data(c.cfg, 2048, force);
  for (const auto& e : fs::directory_iterator(c.cfg.dir))
    EXPECT_NE(e.path().filename().string().rfind(".tmp-prepare-", 0), 0u) << e.path();
}

void expect_data_error(const DataConfig& cfg, int64_t vocab, const std::string& needle, int64_t min_tokens = 0) {
  try {
    prepare_data(cfg, vocab, quiet(min_tokens));
    ADD_FAILURE() << "expected DataError containing: " << needle;
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(fs::path(cfg.dir) / "meta.json"));
}

TEST(PrepareErrors, BadInputsAreDataErrorsAndWriteNothing) {
  TinyCorpus c;
  DataConfig cfg = c.cfg;
  cfg.sources.push_back((c.dir.path() / "missing/**/*.rst").string());
  expect_data_error(cfg, 2048, "'" + cfg.sources.back() + "' matches no file");
  cfg = c.cfg;
  cfg.sources = {};
  expect_data_error(cfg, 2048, "data.sources is empty");
  cfg.sources = {(c.dir.path() / "src/translations/*").string()};
  expect_data_error(cfg, 2048, "excluded by data.exclude");
  write_file(c.dir.path() / "empty/a.txt", "");
  write_file(c.dir.path() / "empty/b.txt", " \n\n");
  cfg.sources = {(c.dir.path() / "empty/*.txt").string()};
  expect_data_error(cfg, 2048, "hold no text");
  cfg.sources = {(c.dir.path() / "src/a/one.txt").string()};
  expect_data_error(cfg, 2048, "only 1 document");
  write_file(c.dir.path() / "bad/x.txt.gz", "this is not gzip data");
  cfg.sources = {(c.dir.path() / "bad/*.gz").string()};
  expect_data_error(cfg, 2048, "x.txt.gz: corrupt or truncated gzip");
  expect_data_error(c.cfg, 100, "byte tokenizer needs at least 257");
  expect_data_error(c.cfg, 2048, "the corpus is too small", 100000);
  cfg = c.cfg;
  cfg.tokenizer = "sentencepiece";
  expect_data_error(cfg, 100, "SentencePiece could not train");
}

// --- the command -------------------------------------------------------------------

int run_data(std::vector<std::string> args, std::string* out = nullptr) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  int rc = cmd_data(static_cast<int>(argv.size()), argv.data());
  std::string o = ::testing::internal::GetCapturedStdout();
  o += ::testing::internal::GetCapturedStderr();
  if (out) *out = o;
  return rc;
}

TEST(CmdData, PrepareUpToDateAndExitCodes) {
  TinyCorpus c;
  const std::string yaml = "model:\n  vocab_size: 512\ntrain:\n  seq_len: 32\ndata:\n  dir: " + c.cfg.dir +
                           "\n  tokenizer: byte\n  val_fraction: 0.25\n  doc_separator: \"\\x1e\"\n  sources: [\"" +
                           c.cfg.sources[0] + "\", \"" + c.cfg.sources[1] + "\"]\n";
  const std::string cfg = write_file(c.dir.path() / "exp.yaml", yaml);
  std::string out;
  EXPECT_EQ(run_data({"prepare", cfg, "--quiet"}, &out), 0) << out;
  EXPECT_NE(out.find("tokens/s: "), std::string::npos) << out;
  EXPECT_EQ(run_data({"prepare", cfg}, &out), 0) << out;
  EXPECT_NE(out.find("up to date"), std::string::npos) << out;
  EXPECT_EQ(run_data({"prepare", cfg, "--force", "--quiet"}, &out), 0) << out;
  EXPECT_NE(out.find("prepared"), std::string::npos) << out;
  EXPECT_EQ(run_data({"prepare", cfg, "--set", "data.sources=/nonexistent/*.txt"}, &out), 2);
  EXPECT_NE(out.find("'/nonexistent/*.txt' matches no file"), std::string::npos) << out;
  EXPECT_EQ(run_data({"prepare", cfg, "--set", "train.seq_len=100000"}, &out), 2);
  EXPECT_EQ(run_data({"prepare", cfg, "--set", "data.bogus=1"}, &out), 2);
  EXPECT_EQ(run_data({"prepare"}, &out), 2);
  EXPECT_EQ(run_data({"frob"}, &out), 2);
  EXPECT_EQ(run_data({}, &out), 2);
  EXPECT_EQ(run_data({"--help"}, &out), 0);
  EXPECT_EQ(run_data({"prepare", "--help"}, &out), 0);
  EXPECT_NE(out.find("usage: moetrain data prepare"), std::string::npos) << out;
}

}  // namespace
