// moetrain data prepare FILE [--set k=v]... [--force]: tokenizer + token files
// for the config's data section (see data/prepare.h).
#include <cstring>
#include <iostream>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"
#include "data/data_error.h"
#include "data/prepare.h"
#include "data/progress.h"
#include "trainer/experiment_config.h"

namespace moetrain {

namespace {

constexpr const char* kUsage =
    "usage: moetrain data prepare FILE [--set KEY=VALUE]... [--force]\n\n"
    "subcommands:\n"
    "  prepare    tokenize the config's data.sources into data.dir (train.bin, val.bin, meta.json)\n";

int cmd_data_prepare(int argc, char** argv) {
  ArgParser args("data prepare", "FILE [--set KEY=VALUE]... [--force]",
                 "Reads the text files of data.sources (globs, `**` recursive, .gz decompressed) minus\n"
                 "data.exclude, trains the tokenizer (SentencePiece BPE with model.vocab_size tokens, or\n"
                 "bytes), splits documents into train/validation and writes data.dir/{train,val}.bin\n"
                 "(uint16/uint32 token ids, eos after each document), the tokenizer and meta.json.\n"
                 "Does nothing (\"up to date\") when the settings and every input file are unchanged.");
  args.positional("FILE", "experiment config (YAML)");
  args.flag("force", "prepare again even when up to date");
  args.flag("quiet", "no progress bars");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    PrepareOptions opt;
    opt.force = args.has("force");
    opt.progress = !args.has("quiet");
    opt.min_tokens = cfg.train.seq_len + 1;
    PrepareResult r;
    try {
      r = prepare_data(cfg.data, cfg.model.vocab_size, opt);
    } catch (const DataError& e) {
      throw UsageError(e.what());  // bad input: exit 2
    }
    const DataMeta& m = r.meta;
    if (r.up_to_date) {
      std::cout << fmt::format("{}: up to date ({} train + {} val tokens, {} tokenizer, vocab {})\n", cfg.data.dir,
                               m.train.tokens, m.val.tokens, m.tokenizer, m.vocab_size);
      return 0;
    }
    std::cout << fmt::format("prepared {} ({})\n", cfg.data.dir, r.reason);
    std::cout << fmt::format("  tokenizer  {} (vocab {}, eos {}){}\n", m.tokenizer, m.vocab_size, m.eos_id,
                             m.tokenizer_file.empty() ? "" : ", " + m.tokenizer_file);
    std::cout << fmt::format("  train      {} tokens, {} documents\n", m.train.tokens, m.train.documents);
    std::cout << fmt::format("  val        {} tokens, {} documents\n", m.val.tokens, m.val.documents);
    std::cout << fmt::format("  sources    {} files, {} bytes of text, {:.2f} bytes/token, dtype {}\n", m.sources.size(),
                             m.stats.value("text_bytes", int64_t{0}), m.stats.value("bytes_per_token", 0.0), m.dtype);
    std::cout << fmt::format("  time       {:.1f} s (tokenizer {:.1f} s, encoding {:.1f} s)\n", r.seconds,
                             r.tokenizer_seconds, r.encode_seconds);
    std::cout << fmt::format("tokens/s: {:.0f} ({} tokens encoded in {:.1f} s)\n", r.tokens_per_s,
                             m.train.tokens + m.val.tokens, r.encode_seconds);
    return 0;
  });
}

}  // namespace

int cmd_data(int argc, char** argv) {
  if (argc >= 1 && std::strcmp(argv[0], "prepare") == 0) return cmd_data_prepare(argc - 1, argv + 1);
  const bool help = argc >= 1 && (std::strcmp(argv[0], "--help") == 0 || std::strcmp(argv[0], "-h") == 0);
  if (!help && argc >= 1) std::cerr << "moetrain data: unknown subcommand '" << argv[0] << "'\n\n";
  (help ? std::cout : std::cerr) << kUsage;
  return help ? 0 : 2;
}

}  // namespace moetrain
