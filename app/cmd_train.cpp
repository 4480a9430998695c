// moetrain train FILE [--set k=v]...: trains a model end to end.
#include <iostream>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"
#include "data/data_error.h"
#include "trainer/experiment_config.h"
#include "trainer/trainer.h"

namespace moetrain {

int cmd_train(int argc, char** argv) {
  ArgParser args("train", "FILE [--set KEY=VALUE]...",
                 "Train the model of an experiment config on its prepared data (moetrain data prepare FILE).\n"
                 "Console progress with ETA; metrics in logging.dir/metrics.jsonl.");
  args.positional("FILE", "experiment config (YAML)");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    TrainResult r;
    try {
      r = train(cfg);
    } catch (const DataError& e) {
      throw UsageError(e.what());  // bad or missing data: exit 2, before any training
    }
    std::cout << fmt::format("done: {} steps, final loss {:.4f}, val loss {:.4f} (ppl {:.2f}), MaxVio_global {:.3f}\n",
                             r.steps, r.final_loss, r.val_loss, r.val_ppl, r.maxvio_global);
    return 0;
  });
}

}  // namespace moetrain
