#include "data/dataset.h"

#include <cstring>
#include <filesystem>

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/data_error.h"
#include "data/hash.h"
#include "trainer/experiment_config.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token files are little-endian and read in place");

namespace moetrain {

// ---------------------------------------------------------------------------
// TokenFile

TokenFile::TokenFile(const std::string& path, int64_t tokens, const std::string& dtype, int64_t vocab_size)
    : path_(path), tokens_(tokens), width_(token_dtype_size(dtype)), vocab_size_(vocab_size) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw DataError(fmt::format("{}: missing; re-run `moetrain data prepare`", path));
  struct stat st {};
  ::fstat(fd, &st);
  const auto expected = static_cast<uint64_t>(tokens) * static_cast<uint64_t>(width_);
  if (static_cast<uint64_t>(st.st_size) != expected) {
    ::close(fd);
    throw DataError(fmt::format(
        "{}: {} bytes, but meta.json says {} tokens × {} bytes ({}) = {}; the file is truncated or stale — "
        "re-run `moetrain data prepare --force`",
        path, st.st_size, tokens, width_, dtype, expected));
  }
  bytes_ = static_cast<size_t>(expected);
  if (bytes_ > 0) {
    map_ = ::mmap(nullptr, bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      ::close(fd);
      throw std::runtime_error(fmt::format("{}: mmap failed", path));
    }
    ::madvise(map_, bytes_, MADV_RANDOM);  // windows are scattered: no readahead of whole files
  }
  ::close(fd);  // the mapping keeps the file open
}

TokenFile::~TokenFile() {
  if (map_) ::munmap(map_, bytes_);
}

TokenFile::TokenFile(TokenFile&& o) noexcept { *this = std::move(o); }

TokenFile& TokenFile::operator=(TokenFile&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(map_, bytes_);
    path_ = std::move(o.path_);
    map_ = o.map_;
    bytes_ = o.bytes_;
    tokens_ = o.tokens_;
    width_ = o.width_;
    vocab_size_ = o.vocab_size_;
    o.map_ = nullptr;
    o.bytes_ = 0;
    o.tokens_ = 0;
  }
  return *this;
}

int64_t TokenFile::at(int64_t i) const {
  int64_t v;
  read(i, 1, &v);
  return v;
}

void TokenFile::read(int64_t start, int64_t count, int64_t* out) const {
  if (start < 0 || count < 0 || start + count > tokens_)
    throw std::out_of_range(fmt::format("{}: tokens [{}, {}) outside [0, {})", path_, start, start + count, tokens_));
  int64_t max_id = 0;
  if (width_ == 2) {
    const auto* p = static_cast<const uint16_t*>(map_) + start;
    for (int64_t i = 0; i < count; ++i) max_id = std::max<int64_t>(max_id, out[i] = p[i]);
  } else {
    const auto* p = static_cast<const uint32_t*>(map_) + start;
    for (int64_t i = 0; i < count; ++i) max_id = std::max<int64_t>(max_id, out[i] = p[i]);
  }
  // A corrupt file must not index past the embedding table.
  if (max_id >= vocab_size_)
    throw DataError(fmt::format("{}: token id {} near offset {} is >= the vocab size {}; the file is corrupt", path_,
                                max_id, start, vocab_size_));
}

// ---------------------------------------------------------------------------
// state

void to_json(nlohmann::json& j, const DataLoaderState& s) {
  j = {{"step", s.step},
       {"tokens", s.tokens},
       {"epoch_warned", s.epoch_warned},
       {"seed", s.seed},
       {"train_tokens", s.train_tokens}};
}

void from_json(const nlohmann::json& j, DataLoaderState& s) {
  try {
    s.step = j.at("step").get<int64_t>();
    s.tokens = j.at("tokens").get<int64_t>();
    s.epoch_warned = j.at("epoch_warned").get<bool>();
    s.seed = j.at("seed").get<int64_t>();
    s.train_tokens = j.at("train_tokens").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(fmt::format("data loader state: missing or malformed field ({})", e.what()));
  }
}

// ---------------------------------------------------------------------------
// DataLoader

DataLoader::DataLoader(const std::string& data_dir, const TrainConfig& train)
    : meta_(read_data_meta(data_dir)),
      seq_len_(train.seq_len),
      global_batch_(train.global_batch),
      micro_batch_(train.micro_batch),
      seed_(static_cast<uint64_t>(train.seed)) {
  const std::filesystem::path dir(data_dir);
  train_ = TokenFile((dir / meta_.train.file).string(), meta_.train.tokens, meta_.dtype, meta_.vocab_size);
  val_ = TokenFile((dir / meta_.val.file).string(), meta_.val.tokens, meta_.dtype, meta_.vocab_size);
  for (const TokenFile* f : {&train_, &val_})
    if (f->size() < seq_len_ + 1)
      throw DataError(fmt::format("{}: the {} split has {} tokens, shorter than one sequence (train.seq_len + 1 = {})",
                                  data_dir, f == &train_ ? "training" : "validation", f->size(), seq_len_ + 1));
  state_.seed = train.seed;
  state_.train_tokens = train_.size();
}

int64_t DataLoader::window_start(int64_t step, int64_t row) const {
  const uint64_t h = hash_combine(hash_combine(splitmix64(seed_), static_cast<uint64_t>(step)), static_cast<uint64_t>(row));
  return static_cast<int64_t>(hash_below(h, static_cast<uint64_t>(train_.size() - seq_len_)));
}

Batch DataLoader::make_batch(const TokenFile& f, const std::vector<int64_t>& starts) const {
  const auto b = static_cast<int64_t>(starts.size());
  torch::Tensor buf = torch::empty({b, seq_len_ + 1}, torch::kLong);
  int64_t* p = buf.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) f.read(starts[i], seq_len_ + 1, p + i * (seq_len_ + 1));
  return {buf.narrow(1, 0, seq_len_).contiguous(), buf.narrow(1, 1, seq_len_).contiguous()};
}

Batch DataLoader::rows(int64_t step, int64_t row_begin, int64_t count) const {
  if (row_begin < 0 || count < 0 || row_begin + count > global_batch_)
    throw std::out_of_range(fmt::format("rows [{}, {}) outside the global batch of {}", row_begin, row_begin + count,
                                        global_batch_));
  std::vector<int64_t> starts(count);
  for (int64_t i = 0; i < count; ++i) starts[i] = window_start(step, row_begin + i);
  return make_batch(train_, starts);
}

Batch DataLoader::global_batch(int64_t step) const { return rows(step, 0, global_batch_); }

int64_t DataLoader::accumulation_steps(int64_t ranks) const {
  if (ranks < 1 || global_batch_ % (micro_batch_ * ranks) != 0)
    throw DataError(fmt::format("train.global_batch ({}) must be a multiple of train.micro_batch ({}) × ranks ({})",
                                global_batch_, micro_batch_, ranks));
  return global_batch_ / (micro_batch_ * ranks);
}

int64_t DataLoader::slice_begin(int64_t micro_step, int64_t rank, int64_t ranks) const {
  const int64_t accum = accumulation_steps(ranks);
  if (micro_step < 0 || micro_step >= accum || rank < 0 || rank >= ranks)
    throw std::out_of_range(fmt::format("micro-step {} / rank {} outside {} micro-steps × {} ranks", micro_step, rank,
                                        accum, ranks));
  return (micro_step * ranks + rank) * micro_batch_;
}

Batch DataLoader::micro_batch(int64_t step, int64_t micro_step, int64_t rank, int64_t ranks) const {
  return rows(step, slice_begin(micro_step, rank, ranks), micro_batch_);
}

void DataLoader::load_state(const DataLoaderState& s) {
  if (s.seed != state_.seed)
    throw DataError(fmt::format("the checkpoint's batches came from train.seed {}, this run has {}; resuming would "
                                "not replay the same data",
                                s.seed, state_.seed));
  if (s.train_tokens != state_.train_tokens)
    throw DataError(fmt::format("the checkpoint was trained on a split of {} tokens, data.dir now holds {}; the data "
                                "changed since (re-prepare the original data, or start a new run)",
                                s.train_tokens, state_.train_tokens));
  state_ = s;
}

void DataLoader::advance() {
  state_.step += 1;
  state_.tokens += global_batch_ * seq_len_;
}

double DataLoader::epochs() const { return static_cast<double>(state_.tokens) / static_cast<double>(train_.size()); }

std::string DataLoader::take_epoch_warning() {
  if (state_.epoch_warned || epochs() <= 1.0) return "";
  state_.epoch_warned = true;
  return fmt::format("training has consumed {:.2f} epochs of the training data ({} of {} tokens): text repeats from "
                     "here on, and the validation loss stops tracking generalization as closely",
                     epochs(), state_.tokens, train_.size());
}

int64_t DataLoader::val_windows() const { return (val_.size() - 1) / seq_len_; }

Batch DataLoader::val_rows(int64_t batch, int64_t row_begin, int64_t count) const {
  if (batch < 0 || row_begin < 0 || count < 0 || row_begin + count > global_batch_)
    throw std::out_of_range(fmt::format("validation rows [{}, {}) of batch {} outside the global batch of {}", row_begin,
                                        row_begin + count, batch, global_batch_));
  std::vector<int64_t> starts(count);
  for (int64_t i = 0; i < count; ++i) starts[i] = val_window_start(batch * global_batch_ + row_begin + i);
  return make_batch(val_, starts);
}

Batch DataLoader::val_micro_batch(int64_t batch, int64_t micro_step, int64_t rank, int64_t ranks) const {
  return val_rows(batch, slice_begin(micro_step, rank, ranks), micro_batch_);
}

}  // namespace moetrain
