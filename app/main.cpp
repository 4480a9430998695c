// moetrain: the command-line entry point. Thin: pick the command, hand it argv.
#include <cstring>
#include <iostream>
#include <string>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"

namespace {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(int argc, char** argv);
};

// "config" has one subcommand today; keep the two-word form users expect.
int cmd_config(int argc, char** argv) {
  if (argc >= 1 && std::strcmp(argv[0], "show") == 0) return moetrain::cmd_config_show(argc - 1, argv + 1);
  std::cerr << "usage: moetrain config show FILE [--set KEY=VALUE]...\n";
  return (argc >= 1 && (std::strcmp(argv[0], "--help") == 0 || std::strcmp(argv[0], "-h") == 0)) ? 0 : 2;
}

const Command kCommands[] = {
    {"config", "config show FILE: print the resolved, validated config", cmd_config},
    {"params", "analytic parameter, FLOP and memory counts of a config", moetrain::cmd_params},
    {"data", "data prepare FILE: train the tokenizer and write token files", moetrain::cmd_data},
    {"train", "train a model from an experiment config", moetrain::cmd_train},
    {"ablate", "compare balancing strategies: run an ablation file's variants, write a report", moetrain::cmd_ablate},
    {"export", "export CHECKPOINT --format hf --out DIR: write a Hugging Face DeepseekV3 directory", moetrain::cmd_export},
    {"eval", "score a checkpoint or Hugging Face model on text, token ids or the validation split", moetrain::cmd_eval},
    {"bench", "time training steps of a config on synthetic tokens (tokens/s, TFLOP/s, MFU)", moetrain::cmd_bench},
    {"generate", "continue a prompt (latent KV cache; sampling; --speculative mtp)", moetrain::cmd_generate},
    {"launch", "launch --nproc N -- COMMAND...: run N local data-parallel ranks (torchrun's variables)", moetrain::cmd_launch},
};

void print_usage(std::ostream& os) {
  os << "moetrain " << MOETRAIN_VERSION << ": train DeepSeek-V3-style MoE language models\n\n"
     << "usage: moetrain <command> [options]   (moetrain <command> --help for details)\n\ncommands:\n";
  for (const auto& c : kCommands) os << fmt::format("  {:<10} {}\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(std::cerr);
    return 2;
  }
  std::string name = argv[1];
  if (name == "-h" || name == "--help" || name == "help") {
    print_usage(std::cout);
    return 0;
  }
  if (name == "--version") {
    std::cout << "moetrain " << MOETRAIN_VERSION << "\n";
    return 0;
  }
  for (const auto& c : kCommands)
    if (name == c.name) return c.run(argc - 2, argv + 2);
  std::cerr << "moetrain: unknown command '" << name << "'\n\n";
  print_usage(std::cerr);
  return 2;
}
