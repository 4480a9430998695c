#include "data/prepare.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <memory>
#include <thread>

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include "data/corpus.h"
#include "data/data_error.h"
#include "data/hash.h"
#include "data/progress.h"
#include "data/tokenizer.h"

namespace moetrain {

namespace fs = std::filesystem;

namespace {

constexpr uint64_t kSampleSeed = 0x5eed;       // which lines train the tokenizer
constexpr size_t kMaxSentenceBytes = 4192;     // SentencePiece skips longer lines anyway
constexpr const char* kTokenizerFile = "tokenizer.model";

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

void note(const PrepareOptions& opt, const std::string& msg) {
  if (opt.progress) std::fprintf(stderr, "%s\n", msg.c_str());
}

// Writes and fsyncs, so the rename that publishes the file never points at
// data still in flight.
void write_durable(const fs::path& path, const std::string& bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error(fmt::format("{}: cannot create", path.string()));
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error(fmt::format("{}: write failed (disk full?)", path.string()));
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw std::runtime_error(fmt::format("{}: fsync failed", path.string()));
}

void fsync_dir(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

// Removes the temp dir unless the prepare committed.
struct TempDirGuard {
  fs::path path;
  ~TempDirGuard() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

// Up to input_sentence_size non-empty lines of the training documents: those
// with the smallest hash of their ordinal (a fixed-seed sample without
// replacement), kept in corpus order.
std::vector<std::string_view> sample_lines(const Corpus& c, int64_t max_lines) {
  std::vector<std::string_view> lines;
  for (const auto& d : c.docs) {
    if (d.val) continue;  // the tokenizer never sees validation text
    std::string_view t = c.text(d);
    size_t p = 0;
    while (p < t.size()) {
      size_t q = std::min(t.find('\n', p), t.size());
      if (q > p && q - p <= kMaxSentenceBytes) lines.push_back(t.substr(p, q - p));
      p = q + 1;
    }
  }
  if (static_cast<int64_t>(lines.size()) <= max_lines) return lines;
  std::vector<std::pair<uint64_t, uint32_t>> keyed(lines.size());
  for (uint32_t i = 0; i < lines.size(); ++i) keyed[i] = {hash_combine(kSampleSeed, i), i};
  std::nth_element(keyed.begin(), keyed.begin() + max_lines, keyed.end());
  std::vector<uint32_t> keep;
  for (int64_t i = 0; i < max_lines; ++i) keep.push_back(keyed[i].second);
  std::sort(keep.begin(), keep.end());
  std::vector<std::string_view> out;
  for (uint32_t i : keep) out.push_back(lines[i]);
  return out;
}

// Documents are encoded in pieces of about kChunkBytes cut right after a '\n',
// so one huge document (dict-gcide is a single 40 MB file) still keeps every
// worker busy. Both tokenizers encode line by line (tokenizer.h), so the pieces'
// ids concatenate to the whole document's.
constexpr size_t kChunkBytes = 1 << 20;

struct Encoded {
  std::vector<std::vector<uint32_t>> chunks;  // in document order, then text order
  std::vector<size_t> first;                  // document i owns chunks [first[i], first[i + 1])
};

Encoded encode_documents(const Corpus& c, const std::vector<const Tokenizer*>& toks, ProgressBar& bar) {
  std::vector<std::string_view> pieces;
  Encoded out;
  for (const auto& d : c.docs) {
    out.first.push_back(pieces.size());
    std::string_view t = c.text(d);
    while (!t.empty()) {
      size_t cut = t.size();
      if (t.size() > kChunkBytes) {
        size_t nl = t.find('\n', kChunkBytes);
        if (nl != std::string_view::npos) cut = nl + 1;
      }
      pieces.push_back(t.substr(0, cut));
      t.remove_prefix(cut);
    }
  }
  out.first.push_back(pieces.size());
  out.chunks.resize(pieces.size());
  // Workers take pieces in order from a shared counter; results land by index,
  // so the output does not depend on scheduling.
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> errors(toks.size());
  auto work = [&](size_t w) {
    try {
      for (size_t i = next++; i < pieces.size(); i = next++) {
        const std::vector<int64_t> ids = toks[w]->encode(pieces[i]);
        out.chunks[i].assign(ids.begin(), ids.end());
        bar.add(static_cast<int64_t>(pieces[i].size()));
      }
    } catch (...) {
      errors[w] = std::current_exception();
      next = pieces.size();
    }
  };
  std::vector<std::thread> pool;
  for (size_t w = 0; w < toks.size(); ++w) pool.emplace_back(work, w);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

// One split as raw little-endian tokens, eos after every document.
std::string pack_split(const Corpus& c, const Encoded& enc, bool val, int64_t eos,
                       int64_t width, SplitMeta& meta) {
  std::string bytes;
  auto put = [&](uint32_t t) {
    for (int64_t b = 0; b < width; ++b) bytes.push_back(static_cast<char>((t >> (8 * b)) & 0xff));
  };
  for (size_t i = 0; i < c.docs.size(); ++i) {
    if (c.docs[i].val != val) continue;
    for (size_t k = enc.first[i]; k < enc.first[i + 1]; ++k)
      for (uint32_t t : enc.chunks[k]) put(t);
    put(static_cast<uint32_t>(eos));
    meta.documents++;
  }
  meta.file = val ? "val.bin" : "train.bin";
  meta.tokens = static_cast<int64_t>(bytes.size()) / width;
  meta.hash = fnv1a64_hex(bytes);
  return bytes;
}

std::string staleness(const DataConfig& data, int64_t vocab, const std::vector<SourceFile>& found) {
  DataMeta meta;
  try {
    meta = read_data_meta(data.dir);
  } catch (const DataError&) {
    return "no prepared data";
  }
  if (meta.settings != prepare_settings(data, vocab)) return "settings changed";
  if (meta.sources.size() != found.size()) return "inputs changed: the set of source files differs";
  for (size_t i = 0; i < found.size(); ++i) {
    const SourceFile& a = meta.sources[i];
    const SourceFile& b = found[i];
    if (a.path != b.path) return "inputs changed: the set of source files differs";
    if (a.size != b.size || a.mtime_ns != b.mtime_ns) return fmt::format("inputs changed: {} was modified", b.path);
  }
  std::error_code ec;
  const int64_t w = token_dtype_size(meta.dtype);
  for (const SplitMeta* s : {&meta.train, &meta.val}) {
    auto size = fs::file_size(fs::path(data.dir) / s->file, ec);
    if (ec || static_cast<int64_t>(size) != s->tokens * w) return fmt::format("{} is missing or damaged", s->file);
  }
  if (!meta.tokenizer_file.empty()) {
    std::ifstream f(fs::path(data.dir) / meta.tokenizer_file, std::ios::binary);
    std::ostringstream ss;
    ss << f.rdbuf();
    if (!f || fnv1a64_hex(ss.str()) != meta.tokenizer_hash) return fmt::format("{} is missing or damaged", meta.tokenizer_file);
  }
  return "";
}

}  // namespace

nlohmann::json prepare_settings(const DataConfig& data, int64_t model_vocab_size) {
  const bool sp = data.tokenizer == "sentencepiece";
  return {{"format_version", kDataFormatVersion},
          {"tokenizer", data.tokenizer},
          {"vocab_size", sp ? model_vocab_size : ByteTokenizer::kVocab},
          {"input_sentence_size", sp ? data.input_sentence_size : 0},
          {"sample_seed", kSampleSeed},
          {"val_fraction", data.val_fraction},
          {"doc_separator", data.doc_separator},
          {"sources", data.sources},
          {"exclude", data.exclude}};
}

std::string data_staleness(const DataConfig& data, int64_t model_vocab_size) {
  return staleness(data, model_vocab_size, find_sources(data));
}

PrepareResult prepare_data(const DataConfig& data, int64_t model_vocab_size, const PrepareOptions& opt) {
  const auto t0 = std::chrono::steady_clock::now();
  PrepareResult r;
  const bool sp = data.tokenizer == "sentencepiece";
  if (!sp && data.tokenizer != "byte")
    throw DataError(fmt::format("data.tokenizer: unknown tokenizer '{}' (byte | sentencepiece)", data.tokenizer));
  if (!sp && model_vocab_size < ByteTokenizer::kVocab)
    throw DataError(fmt::format("model.vocab_size is {}; the byte tokenizer needs at least {} (256 bytes + eos)",
                                model_vocab_size, ByteTokenizer::kVocab));
  if (sp && model_vocab_size > std::numeric_limits<int32_t>::max())
    throw DataError("model.vocab_size is too large for SentencePiece");

  std::vector<SourceFile> files = find_sources(data);
  r.reason = opt.force ? "--force" : staleness(data, model_vocab_size, files);
  if (r.reason.empty()) {
    r.up_to_date = true;
    r.meta = read_data_meta(data.dir);
    r.seconds = seconds_since(t0);
    return r;
  }

  // --- read -------------------------------------------------------------------
  int64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += f.size;
  Corpus corpus;
  {
    ProgressBar bar(fmt::format("reading {} files", files.size()), total_bytes, "B", opt.progress);
    corpus = read_corpus(std::move(files), data, &bar);
  }
  note(opt, fmt::format("{} documents ({} validation), {} of text", corpus.docs.size(), corpus.num_docs(true),
                        ProgressBar::human(static_cast<double>(corpus.bytes())) + "B"));

  // --- tokenizer ----------------------------------------------------------------
  std::string model_proto;
  std::vector<std::unique_ptr<Tokenizer>> toks;
  const int threads = std::max(1, opt.threads);
  if (sp) {
    const auto t1 = std::chrono::steady_clock::now();
    std::vector<std::string_view> lines = sample_lines(corpus, data.input_sentence_size);
    note(opt, fmt::format("training SentencePiece BPE (vocab {}) on {} lines ...", model_vocab_size, lines.size()));
    SentencePieceTrainOptions so;
    so.vocab_size = model_vocab_size;
    so.num_threads = threads;
    model_proto = train_sentencepiece(lines, so);
    r.tokenizer_seconds = seconds_since(t1);
    note(opt, fmt::format("tokenizer trained in {:.1f} s", r.tokenizer_seconds));
    for (int i = 0; i < threads; ++i) toks.push_back(SentencePieceTokenizer::from_serialized(model_proto));
  } else {
    for (int i = 0; i < threads; ++i) toks.push_back(std::make_unique<ByteTokenizer>());
  }
  std::vector<const Tokenizer*> tok_ptrs;
  for (const auto& t : toks) tok_ptrs.push_back(t.get());

  // --- encode -------------------------------------------------------------------
  const auto t2 = std::chrono::steady_clock::now();
  Encoded ids;
  {
    ProgressBar bar(fmt::format("encoding ({} threads)", threads), corpus.bytes(), "B", opt.progress);
    ids = encode_documents(corpus, tok_ptrs, bar);
  }
  r.encode_seconds = seconds_since(t2);

  DataMeta& m = r.meta;
  m.tokenizer = data.tokenizer;
  m.tokenizer_file = sp ? kTokenizerFile : "";
  m.tokenizer_hash = sp ? fnv1a64_hex(model_proto) : "";
  m.vocab_size = toks[0]->vocab_size();
  m.eos_id = toks[0]->eos_id();
  m.bos_id = sp ? 1 : -1;
  m.unk_id = sp ? 0 : -1;
  m.dtype = token_dtype_for_vocab(m.vocab_size);
  const int64_t width = token_dtype_size(m.dtype);
  std::string train_bytes = pack_split(corpus, ids, false, m.eos_id, width, m.train);
  std::string val_bytes = pack_split(corpus, ids, true, m.eos_id, width, m.val);
  ids = Encoded();
  const int64_t tokens = m.train.tokens + m.val.tokens;
  r.tokens_per_s = static_cast<double>(tokens) / std::max(r.encode_seconds, 1e-9);
  for (const SplitMeta* s : {&m.train, &m.val})
    if (s->tokens < opt.min_tokens)
      throw DataError(fmt::format(
          "the corpus is too small: the {} split has {} tokens ({} documents), shorter than one sequence "
          "(train.seq_len + 1 = {}){}",
          s == &m.train ? "training" : "validation", s->tokens, s->documents, opt.min_tokens,
          s == &m.val ? "; raise data.val_fraction or add text" : "; add text"));
  m.sources = corpus.files;
  m.settings = prepare_settings(data, model_vocab_size);
  m.stats = {{"text_bytes", corpus.bytes()},
             {"bytes_per_token", static_cast<double>(corpus.bytes()) / std::max<int64_t>(tokens, 1)},
             {"tokenizer_seconds", r.tokenizer_seconds},
             {"encode_seconds", r.encode_seconds},
             {"tokens_per_s", r.tokens_per_s},
             {"threads", threads}};

  // --- write (temp dir, then publish with meta.json last) -------------------------
  const fs::path dir(data.dir);
  fs::create_directories(dir);
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().filename().string().rfind(".tmp-prepare-", 0) == 0) fs::remove_all(it->path(), ec);  // crashed runs
  TempDirGuard tmp{dir / fmt::format(".tmp-prepare-{}", ::getpid())};
  fs::create_directories(tmp.path);
  write_durable(tmp.path / m.train.file, train_bytes);
  write_durable(tmp.path / m.val.file, val_bytes);
  if (sp) write_durable(tmp.path / kTokenizerFile, model_proto);
  r.seconds = seconds_since(t0);
  m.stats["prepare_seconds"] = r.seconds;
  write_durable(tmp.path / "meta.json", data_meta_to_json(m).dump(2) + "\n");
  fsync_dir(tmp.path);

  fs::remove(dir / "meta.json", ec);  // from here until the last rename the dir is "not prepared"
  fsync_dir(dir);
  fs::rename(tmp.path / m.train.file, dir / m.train.file);
  fs::rename(tmp.path / m.val.file, dir / m.val.file);
  if (sp) fs::rename(tmp.path / kTokenizerFile, dir / kTokenizerFile);
  else fs::remove(dir / kTokenizerFile, ec);  // a stale SentencePiece model would mislead
  fs::rename(tmp.path / "meta.json", dir / "meta.json");
  fsync_dir(dir);
  r.seconds = seconds_since(t0);
  return r;
}

}  // namespace moetrain
