// moetrain config show FILE [--set k=v]... [--hf]: the resolved, validated config, or
// its model section as a Hugging Face DeepseekV3 config.json.
#include <iostream>

#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "io/hf.h"
#include "trainer/experiment_config.h"

namespace moetrain {

int cmd_config_show(int argc, char** argv) {
  ArgParser args("config show", "FILE [--set KEY=VALUE]... [--hf]",
                 "Print the config after `base:` inheritance and --set overrides, validated, as YAML.\n"
                 "With --hf, print only the model as the config.json of a Hugging Face DeepseekV3 directory\n"
                 "(what `moetrain export` writes, without token ids), e.g. to build the peer model of a benchmark.");
  args.positional("FILE", "experiment config (YAML)");
  args.flag("hf", "print the model section as a Hugging Face DeepseekV3 config.json");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    if (args.has("hf")) {
      std::cout << hf_config_to_json(cfg.model).dump(2) << "\n";
      return 0;
    }
    std::cout << "# resolved from " << args.pos(0) << " (config hash " << config_hash(cfg) << ")\n"
              << config_to_yaml(cfg);
    return 0;
  });
}

}  // namespace moetrain
