// moetrain config show FILE [--set k=v]...: the resolved, validated config.
#include <iostream>

#include "app/cli.h"
#include "app/commands.h"
#include "trainer/experiment_config.h"

namespace moetrain {

int cmd_config_show(int argc, char** argv) {
  ArgParser args("config show", "FILE [--set KEY=VALUE]...",
                 "Print the config after `base:` inheritance and --set overrides, validated, as YAML.");
  args.positional("FILE", "experiment config (YAML)");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    std::cout << "# resolved from " << args.pos(0) << " (config hash " << config_hash(cfg) << ")\n"
              << config_to_yaml(cfg);
    return 0;
  });
}

}  // namespace moetrain
