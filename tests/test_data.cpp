// The token-file loader on hand-written arange files: exact window contents,
// batches independent of ranks and accumulation, resume equivalence, the fixed
// validation order, epoch accounting and every bad-input error.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "data/data_error.h"
#include "data/dataset.h"
#include "data/meta.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using namespace moetrain;
using moetrain::testing::TempDir;
using moetrain::testing::write_file;

namespace {

// Writes train.bin / val.bin holding arange(n) (token i == i) and a meta.json
// written out by hand, so every window's contents are known exactly.
void write_arange_dataset(const std::filesystem::path& dir, int64_t n_train, int64_t n_val, int64_t vocab,
                          const std::string& dtype = "uint16") {
  const int width = dtype == "uint16" ? 2 : 4;
  for (auto [name, n] : {std::pair<const char*, int64_t>{"train.bin", n_train}, {"val.bin", n_val}}) {
    std::string bytes;
    for (int64_t i = 0; i < n; ++i)
      for (int b = 0; b < width; ++b) bytes.push_back(static_cast<char>((i >> (8 * b)) & 0xff));
    write_file(dir / name, bytes);
  }
  const std::string meta = R"({
  "format_version": 1,
  "tokenizer": {"kind": "byte", "file": "", "hash": "", "vocab_size": )" + std::to_string(vocab) + R"(, "eos_id": 0},
  "dtype": ")" + dtype + R"(",
  "splits": {
    "train": {"file": "train.bin", "tokens": )" + std::to_string(n_train) + R"(, "documents": 1, "hash": ""},
    "val": {"file": "val.bin", "tokens": )" + std::to_string(n_val) + R"(, "documents": 1, "hash": ""}
  }
})";
  write_file(dir / "meta.json", meta);
}

TrainConfig train_cfg(int64_t global_batch, int64_t micro_batch, int64_t seq_len = 16, int64_t seed = 1234) {
  TrainConfig t;
  t.global_batch = global_batch;
  t.micro_batch = micro_batch;
  t.seq_len = seq_len;
  t.seed = seed;
  return t;
}

void expect_arange_rows(const Batch& b, const std::vector<int64_t>& starts) {
  ASSERT_EQ(b.inputs.dtype(), torch::kLong);
  ASSERT_EQ(b.inputs.sizes(), b.targets.sizes());
  ASSERT_EQ(b.inputs.size(0), static_cast<int64_t>(starts.size()));
  const int64_t T = b.inputs.size(1);
  for (size_t i = 0; i < starts.size(); ++i) {
    auto want = torch::arange(starts[i], starts[i] + T, torch::kLong);
    EXPECT_TRUE(torch::equal(b.inputs[i], want)) << "row " << i;
    EXPECT_TRUE(torch::equal(b.targets[i], want + 1)) << "row " << i;
  }
}

TEST(DataLoader, WindowsAreExactArangeSlices) {
  TempDir dir;
  write_arange_dataset(dir.path(), 50000, 4000, 60000);
  DataLoader dl(dir.path().string(), train_cfg(8, 4));
  for (int64_t step : {0, 1, 17, 123456}) {
    std::vector<int64_t> starts;
    for (int64_t i = 0; i < 8; ++i) {
      starts.push_back(dl.window_start(step, i));
      ASSERT_GE(starts.back(), 0);
      ASSERT_LE(starts.back() + 16 + 1, 50000);  // the window (inputs + last target) fits
    }
    expect_arange_rows(dl.global_batch(step), starts);
  }
}

TEST(DataLoader, Uint32Files) {
  TempDir dir;
  write_arange_dataset(dir.path(), 70000, 100, 100000, "uint32");  // ids above 65535
  DataLoader dl(dir.path().string(), train_cfg(4, 4));
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < 4; ++i) starts.push_back(dl.window_start(5, i));
  expect_arange_rows(dl.global_batch(5), starts);
}

TEST(DataLoader, OffsetsCoverTheSplitAndDependOnSeedAndStep) {
  TempDir dir;
  write_arange_dataset(dir.path(), 1000, 100, 60000);
  DataLoader a(dir.path().string(), train_cfg(16, 16, 16, 1));
  DataLoader b(dir.path().string(), train_cfg(16, 16, 16, 2));
  int64_t lo = 1 << 30, hi = -1, same_seed_diff = 0;
  for (int64_t s = 0; s < 200; ++s)
    for (int64_t i = 0; i < 16; ++i) {
      lo = std::min(lo, a.window_start(s, i));
      hi = std::max(hi, a.window_start(s, i));
      same_seed_diff += a.window_start(s, i) != b.window_start(s, i);
    }
  EXPECT_EQ(lo, 0);
  EXPECT_EQ(hi, 1000 - 16 - 1);  // 3200 draws over 984 offsets reach both ends
  EXPECT_GT(same_seed_diff, 3000);
  EXPECT_FALSE(torch::equal(a.global_batch(0).inputs, a.global_batch(1).inputs));
}

TEST(DataLoader, GlobalBatchIndependentOfRanksAndAccumulation) {
  TempDir dir;
  write_arange_dataset(dir.path(), 20000, 500, 60000);
  DataLoader ref(dir.path().string(), train_cfg(8, 8));
  for (int64_t step : {0, 3, 99}) {
    const Batch want = ref.global_batch(step);
    for (int64_t ranks : {1, 2, 4}) {
      for (int64_t micro : {1, 2, 4, 8}) {
        if (8 % (micro * ranks) != 0) continue;
        DataLoader dl(dir.path().string(), train_cfg(8, micro));
        const int64_t accum = dl.accumulation_steps(ranks);
        EXPECT_EQ(accum * micro * ranks, 8);
        // Each (micro-step, rank) slice computed on its own, then put back at its rows.
        std::vector<torch::Tensor> in(8), tg(8);
        std::set<int64_t> seen;
        for (int64_t m = 0; m < accum; ++m)
          for (int64_t r = 0; r < ranks; ++r) {
            Batch b = dl.micro_batch(step, m, r, ranks);
            ASSERT_EQ(b.inputs.size(0), micro);
            for (int64_t k = 0; k < micro; ++k) {
              const int64_t row = (m * ranks + r) * micro + k;
              ASSERT_TRUE(seen.insert(row).second) << "row " << row << " served twice";
              in[row] = b.inputs[k];
              tg[row] = b.targets[k];
            }
          }
        ASSERT_EQ(seen.size(), 8u);
        EXPECT_TRUE(torch::equal(torch::stack(in), want.inputs)) << "ranks " << ranks << " micro " << micro;
        EXPECT_TRUE(torch::equal(torch::stack(tg), want.targets)) << "ranks " << ranks << " micro " << micro;
      }
    }
  }
  DataLoader dl(dir.path().string(), train_cfg(8, 3));
  EXPECT_THROW(dl.accumulation_steps(1), DataError);
  EXPECT_THROW(ref.micro_batch(0, 1, 0, 1), std::out_of_range);
}

TEST(DataLoader, ResumeReadsWhatTheUninterruptedRunReads) {
  TempDir dir;
  write_arange_dataset(dir.path(), 5000, 500, 60000);
  const TrainConfig cfg = train_cfg(4, 2);
  DataLoader full(dir.path().string(), cfg);
  std::vector<torch::Tensor> uninterrupted;
  nlohmann::json saved;
  for (int64_t s = 0; s < 10; ++s) {
    if (s == 6) saved = full.state();  // the checkpoint: batches of steps 0..5 were consumed
    for (int64_t m = 0; m < 2; ++m) uninterrupted.push_back(full.next_micro_batch(m, 0, 1).inputs);
    full.advance();
  }
  DataLoader resumed(dir.path().string(), cfg);
  resumed.load_state(nlohmann::json::parse(saved.dump()).get<DataLoaderState>());
  EXPECT_EQ(resumed.state().step, 6);
  EXPECT_EQ(resumed.state().tokens, 6 * 4 * 16);
  for (int64_t s = 6; s < 10; ++s) {
    for (int64_t m = 0; m < 2; ++m)
      EXPECT_TRUE(torch::equal(resumed.next_micro_batch(m, 0, 1).inputs, uninterrupted[s * 2 + m])) << "step " << s;
    resumed.advance();
  }
  EXPECT_EQ(nlohmann::json(resumed.state()), nlohmann::json(full.state()));

  DataLoader other_seed(dir.path().string(), train_cfg(4, 2, 16, 99));
  EXPECT_THROW(other_seed.load_state(saved.get<DataLoaderState>()), DataError);
  EXPECT_THROW(nlohmann::json::object().get<DataLoaderState>(), DataError);
}

TEST(DataLoader, EpochAccountingWarnsOnce) {
  TempDir dir;
  write_arange_dataset(dir.path(), 1000, 100, 60000);
  const TrainConfig cfg = train_cfg(4, 4, 16);  // 64 target tokens per step: > 1 epoch after step 16
  DataLoader dl(dir.path().string(), cfg);
  int warnings = 0;
  int64_t warned_at = -1;
  nlohmann::json saved;
  for (int64_t s = 0; s < 40; ++s) {
    dl.advance();
    EXPECT_DOUBLE_EQ(dl.epochs(), static_cast<double>((s + 1) * 64) / 1000.0);
    if (!dl.take_epoch_warning().empty()) {
      ++warnings;
      warned_at = dl.state().step;
    }
    if (s == 30) saved = dl.state();
  }
  EXPECT_EQ(warnings, 1);
  EXPECT_EQ(warned_at, 16);  // 16 · 64 = 1024 > 1000
  DataLoader resumed(dir.path().string(), cfg);
  resumed.load_state(saved.get<DataLoaderState>());
  resumed.advance();
  EXPECT_TRUE(resumed.take_epoch_warning().empty()) << "the warning survives a resume as given";
}

TEST(DataLoader, ValidationReadsFixedConsecutiveWindows) {
  TempDir dir;
  write_arange_dataset(dir.path(), 5000, 100, 60000);  // (100 - 1) / 16 = 6 windows
  DataLoader dl(dir.path().string(), train_cfg(4, 2));
  EXPECT_EQ(dl.val_windows(), 6);
  expect_arange_rows(dl.val_rows(0, 0, 4), {0, 16, 32, 48});
  expect_arange_rows(dl.val_rows(1, 0, 4), {64, 80, 0, 16});  // wraps after window 5
  // Rank slices of an eval batch reassemble to the whole batch.
  const Batch whole = dl.val_rows(1, 0, 4);
  auto a = dl.val_micro_batch(1, 0, 0, 2), b = dl.val_micro_batch(1, 0, 1, 2);
  EXPECT_TRUE(torch::equal(torch::cat({a.inputs, b.inputs}), whole.inputs));
  DataLoader again(dir.path().string(), train_cfg(4, 2, 16, 777));  // the seed does not matter
  EXPECT_TRUE(torch::equal(again.val_rows(0, 0, 4).targets, dl.val_rows(0, 0, 4).targets));
}

TEST(DataLoaderErrors, SizeMismatchMissingMetaShortSplitsBadIds) {
  TempDir dir;
  write_arange_dataset(dir.path(), 1000, 100, 60000);
  std::filesystem::resize_file(dir.path() / "train.bin", 1998);  // 999 tokens
  try {
    DataLoader dl(dir.path().string(), train_cfg(4, 4));
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("1998 bytes, but meta.json says 1000 tokens × 2 bytes"), std::string::npos)
        << e.what();
  }
  TempDir empty;
  try {
    DataLoader dl(empty.path().string(), train_cfg(4, 4));
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("run `moetrain data prepare"), std::string::npos) << e.what();
  }
  TempDir shortval;
  write_arange_dataset(shortval.path(), 1000, 16, 60000);
  EXPECT_THROW(DataLoader(shortval.path().string(), train_cfg(4, 4, 16)), DataError);
  EXPECT_NO_THROW(DataLoader(shortval.path().string(), train_cfg(4, 4, 15)));

  TempDir badids;
  write_arange_dataset(badids.path(), 1000, 100, 500);  // ids up to 999 with a 500-token vocab
  TokenFile f((badids.path() / "train.bin").string(), 1000, "uint16", 500);
  std::vector<int64_t> buf(10);
  EXPECT_NO_THROW(f.read(0, 10, buf.data()));
  EXPECT_EQ(buf[9], 9);
  EXPECT_THROW(f.read(600, 10, buf.data()), DataError);
  EXPECT_THROW(f.read(995, 10, buf.data()), std::out_of_range);
}

TEST(CheckCompatible, VocabAndSequenceRules) {
  DataMeta m;
  m.tokenizer = "sentencepiece";
  m.vocab_size = 4096;
  m.train.tokens = 10000;
  m.val.tokens = 500;
  ModelConfig model;
  model.vocab_size = 4096;
  TrainConfig train = train_cfg(4, 4, 128);
  EXPECT_NO_THROW(check_compatible(m, model, train));
  model.vocab_size = 8192;  // SentencePiece: must be equal, even when larger
  EXPECT_THROW(check_compatible(m, model, train), DataError);
  m.tokenizer = "byte";
  m.vocab_size = 257;
  model.vocab_size = 2048;  // byte: larger is fine (ids >= 257 unused)
  EXPECT_NO_THROW(check_compatible(m, model, train));
  model.vocab_size = 256;
  try {
    check_compatible(m, model, train_cfg(4, 4, 500));
    FAIL();
  } catch (const DataError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("needs at least 257"), std::string::npos) << msg;
    EXPECT_NE(msg.find("validation split has 500 tokens, shorter than one sequence"), std::string::npos) << msg;
  }
}

}  // namespace
