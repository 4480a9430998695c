#include "data/corpus.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <sys/stat.h>
#include <zlib.h>

#include "data/data_error.h"
#include "data/glob.h"
#include "data/progress.h"

namespace moetrain {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string gunzip(const std::string& raw, const std::string& path) {
  z_stream zs{};
  // 16 + MAX_WBITS: expect a gzip header (not raw zlib).
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) throw std::runtime_error("zlib: inflateInit2 failed");
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(raw.data()));
  zs.avail_in = static_cast<uInt>(raw.size());
  std::string out;
  char buf[1 << 16];
  int rc = Z_OK;
  while (true) {
    zs.next_out = reinterpret_cast<Bytef*>(buf);
    zs.avail_out = sizeof(buf);
    rc = inflate(&zs, Z_NO_FLUSH);
    out.append(buf, sizeof(buf) - zs.avail_out);
    if (rc == Z_STREAM_END) {
      if (zs.avail_in == 0) break;
      inflateReset(&zs);  // `cat a.gz b.gz` is a valid gzip file: keep going
      continue;
    }
    if (rc != Z_OK) break;
    if (zs.avail_in == 0 && zs.avail_out != 0) break;  // input ended mid-stream
  }
  inflateEnd(&zs);
  if (rc != Z_STREAM_END)
    throw DataError(fmt::format("{}: corrupt or truncated gzip data ({})", path, zs.msg ? zs.msg : "unexpected end"));
  return out;
}

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; });
}

}  // namespace

int64_t Corpus::bytes() const {
  int64_t n = 0;
  for (const auto& d : docs) n += static_cast<int64_t>(d.length);
  return n;
}

int64_t Corpus::num_docs(bool val) const {
  return std::count_if(docs.begin(), docs.end(), [&](const Document& d) { return d.val == val; });
}

std::vector<SourceFile> find_sources(const DataConfig& cfg) {
  if (cfg.sources.empty()) throw DataError("data.sources is empty: list the text files (globs) to train on");
  std::vector<SourceFile> out;
  std::set<std::string> seen;
  for (const auto& pattern : cfg.sources) {
    const std::vector<std::string> found = glob_expand(pattern);
    if (found.empty()) throw DataError(fmt::format("data.sources: '{}' matches no file", pattern));
    size_t kept = 0;
    for (const auto& path : found) {
      bool excluded = std::any_of(cfg.exclude.begin(), cfg.exclude.end(),
                                  [&](const std::string& ex) { return glob_match(ex, path); });
      if (excluded) continue;
      ++kept;
      if (!seen.insert(path).second) continue;
      struct stat st {};
      if (::stat(path.c_str(), &st) != 0) throw DataError(fmt::format("{}: cannot stat", path));
      out.push_back({path, static_cast<int64_t>(st.st_size),
                     static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000LL + st.st_mtim.tv_nsec, ""});
    }
    if (kept == 0)
      throw DataError(fmt::format("data.sources: all {} files matching '{}' are excluded by data.exclude", found.size(),
                                  pattern));
  }
  return out;
}

std::string read_source_file(const std::string& path, Fnv1a64* raw_hash) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw DataError(fmt::format("{}: cannot open", path));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) throw DataError(fmt::format("{}: read error", path));
  std::string raw = std::move(ss).str();
  if (raw_hash) raw_hash->update(raw);
  // By magic as well as by name: dictzip files (`.dz`, e.g. dict-gcide) are gzip.
  const bool magic = raw.size() >= 2 && static_cast<unsigned char>(raw[0]) == 0x1f &&
                     static_cast<unsigned char>(raw[1]) == 0x8b;
  if (magic || ends_with(path, ".gz")) return gunzip(raw, path);
  return raw;
}

double document_split_key(const std::string& path, uint32_t index) {
  Fnv1a64 f;
  f.update(path);
  return hash_unit(hash_combine(f.h, index));
}

bool is_val_document(const std::string& path, uint32_t index, double val_fraction) {
  return document_split_key(path, index) < val_fraction;
}

Corpus read_corpus(std::vector<SourceFile> files, const DataConfig& cfg, ProgressBar* progress) {
  Corpus c;
  c.files = std::move(files);
  c.texts.reserve(c.files.size());
  for (uint32_t fi = 0; fi < c.files.size(); ++fi) {
    SourceFile& sf = c.files[fi];
    Fnv1a64 h;
    c.texts.push_back(read_source_file(sf.path, &h));
    sf.hash = h.hex();
    const std::string& text = c.texts.back();
    const std::string& sep = cfg.doc_separator;
    size_t begin = 0;
    uint32_t index = 0;
    while (begin <= text.size()) {
      size_t end = sep.empty() ? std::string::npos : text.find(sep, begin);
      if (end == std::string::npos) end = text.size();
      std::string_view piece = std::string_view(text).substr(begin, end - begin);
      if (!blank(piece)) c.docs.push_back({fi, index, begin, end - begin, false});
      ++index;
      if (end == text.size()) break;
      begin = end + sep.size();
    }
    if (progress) progress->add(sf.size);
  }
  if (c.docs.empty()) throw DataError("data.sources: the input files hold no text (all empty or whitespace)");
  if (c.docs.size() < 2)
    throw DataError(fmt::format(
        "data.sources: only 1 document; need at least 2 (one for validation) — add files or set data.doc_separator"));

  // The split: val_fraction of documents by hash; at least one on each side.
  size_t n_val = 0, lowest = 0, highest = 0;
  std::vector<double> key(c.docs.size());
  for (size_t i = 0; i < c.docs.size(); ++i) {
    Document& d = c.docs[i];
    key[i] = document_split_key(c.files[d.file].path, d.index);
    d.val = key[i] < cfg.val_fraction;
    n_val += d.val;
    if (key[i] < key[lowest]) lowest = i;
    if (key[i] > key[highest]) highest = i;
  }
  if (n_val == 0) c.docs[lowest].val = true;
  if (n_val == c.docs.size()) c.docs[highest].val = false;
  return c;
}

}  // namespace moetrain
