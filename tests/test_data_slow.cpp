// Prepares the real default corpus (configs/tiny.yaml: the Linux kernel
// documentation, SentencePiece vocab 4096) into a temp dir; label `slow`.
// Prints the timings; the budget on a 2-core machine is ~5 minutes.
#include <gtest/gtest.h>

#include <filesystem>
#include <iostream>

#include "data/dataset.h"
#include "data/prepare.h"
#include "data/tokenizer.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/experiment_config.h"

using namespace moetrain;

TEST(DataSlow, PrepareLinuxDocs) {
  ExperimentConfig cfg = load_experiment_config(std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml");
  if (!std::filesystem::exists("/usr/share/doc/linux-doc-6.1/Documentation")) GTEST_SKIP() << "linux-doc-6.1 not installed";
  moetrain::testing::TempDir dir;
  cfg.data.dir = (dir.path() / "linux-docs").string();
  if (cfg.data.exclude.empty()) cfg.data.exclude = {"**/translations/**"};
  PrepareOptions opt;
  opt.min_tokens = cfg.train.seq_len + 1;
  PrepareResult r = prepare_data(cfg.data, cfg.model.vocab_size, opt);
  const DataMeta& m = r.meta;
  std::cout << "prepare: " << r.seconds << " s (tokenizer " << r.tokenizer_seconds << " s, encode " << r.encode_seconds
            << " s), " << m.train.tokens + m.val.tokens << " tokens, " << r.tokens_per_s << " tokens/s (encode), "
            << (m.train.tokens + m.val.tokens) / r.seconds << " tokens/s (overall), " << m.sources.size() << " files, "
            << m.train.documents << "+" << m.val.documents << " documents\n";
  EXPECT_LT(r.seconds, 300.0);
  EXPECT_EQ(m.vocab_size, 4096);
  for (const auto& s : m.sources) EXPECT_EQ(s.path.find("/translations/"), std::string::npos) << s.path;
  EXPECT_TRUE(prepare_data(cfg.data, cfg.model.vocab_size, opt).up_to_date);

  check_compatible(m, cfg.model, cfg.train);
  DataLoader dl(cfg.data.dir, cfg.train);
  auto tok = load_tokenizer(cfg.data.dir);
  Batch b = dl.global_batch(0);
  auto row = b.inputs[0];
  std::vector<int64_t> ids(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
  std::cout << "sample window:\n" << tok->decode(ids) << "\n";
}
