// defines: SourceFile, Document, Corpus, find_sources, read_source_file,
// read_corpus, is_val_document — from data.sources globs to documents with a
// deterministic train/validation assignment.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "data/data_config.h"
#include "data/hash.h"

namespace moetrain {

class ProgressBar;

// One input file as found on disk; `hash` (FNV-1a 64 of the raw bytes, before
// gunzip) is filled in when the file is read.
struct SourceFile {
  std::string path;  // as the glob produced it (absolute for absolute globs)
  int64_t size = 0;
  int64_t mtime_ns = 0;
  std::string hash;
};

// A document is a byte range of its file's (decompressed) text.
struct Document {
  uint32_t file = 0;   // index into Corpus::files
  uint32_t index = 0;  // position among the file's separator-split pieces (empty pieces keep their number)
  size_t begin = 0, length = 0;
  bool val = false;
};

struct Corpus {
  std::vector<SourceFile> files;
  std::vector<std::string> texts;  // decompressed text per file
  std::vector<Document> docs;      // file order, then index order

  std::string_view text(const Document& d) const { return std::string_view(texts[d.file]).substr(d.begin, d.length); }
  int64_t bytes() const;
  int64_t num_docs(bool val) const;
};

// Expands every glob of data.sources (in order; a file matched twice is kept once)
// and drops paths matching any data.exclude glob. Throws DataError when there are
// no sources, or a glob matches no file (or only excluded ones) — naming the glob.
std::vector<SourceFile> find_sources(const DataConfig& cfg);

// The whole file as text; `.gz` files and any file with the gzip magic (dictzip
// `.dz`) are gunzipped, concatenated members too.
// Updates *raw_hash with the bytes on disk when given. Throws DataError on an
// unreadable or corrupt file.
std::string read_source_file(const std::string& path, Fnv1a64* raw_hash = nullptr);

// Reads every file, splits documents (whole file, or by data.doc_separator),
// skips whitespace-only documents and assigns the split. Throws DataError when
// the inputs hold no text, or fewer than 2 documents (one is needed per side).
Corpus read_corpus(std::vector<SourceFile> files, const DataConfig& cfg, ProgressBar* progress = nullptr);

// The split depends on the document's identity alone (source path + piece index),
// so adding or removing other files never moves a document across the split.
bool is_val_document(const std::string& path, uint32_t index, double val_fraction);
double document_split_key(const std::string& path, uint32_t index);

}  // namespace moetrain
