// moetrain train FILE [--set k=v]... [--resume auto|PATH]: trains a model end to end.
#include <iostream>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"
#include "data/data_error.h"
#include "trainer/checkpoint.h"
#include "trainer/experiment_config.h"
#include "trainer/trainer.h"

namespace moetrain {

int cmd_train(int argc, char** argv) {
  ArgParser args("train", "FILE [--set KEY=VALUE]... [--resume auto|PATH] [--init-from HF_DIR]",
                 "Train the model of an experiment config on its prepared data (moetrain data prepare FILE).\n"
                 "Console progress with ETA; metrics in logging.dir/metrics.jsonl; checkpoints in checkpoint.dir.\n"
                 "SIGINT/SIGTERM: finish the step, save a checkpoint, exit 0. SIGUSR1: save at the next step.");
  args.positional("FILE", "experiment config (YAML)");
  args.option("resume", "auto|PATH",
              "auto: continue from the newest complete checkpoint in checkpoint.dir (a fresh start when it holds "
              "none); PATH: a step-* directory or a checkpoint.dir, which must hold one");
  args.option("init-from", "HF_DIR", "start from the weights of a Hugging Face DeepseekV3 directory (same architecture)");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    DistEnv dist;
    try {
      dist = DistEnv::from_env();  // torchrun / moetrain launch variables
    } catch (const DistError& e) {
      throw UsageError(e.what());  // a malformed launch environment: exit 2
    }
    TrainResult r;
    try {
      TrainOptions options;
      if (args.given("resume")) options.resume = args.get("resume");
      if (args.given("init-from")) options.init_from = args.get("init-from");
      options.dist = dist;
      r = train(cfg, options);
    } catch (const DataError& e) {
      throw UsageError(e.what());  // bad or missing data: exit 2, before any training
    } catch (const CheckpointError& e) {
      throw UsageError(e.what());  // missing, damaged or incompatible checkpoint: exit 2, before any training
    }
    if (dist.rank != 0) return 0;  // rank 0 reports for the job
    if (r.stopped_by_signal) {
      std::cout << fmt::format("stopped by signal at step {}; checkpoint {} (resume with --resume auto)\n", r.steps,
                               r.last_checkpoint);
      return 0;
    }
    std::cout << fmt::format("done: {} steps, final loss {:.4f}, val loss {:.4f} (ppl {:.2f}), MaxVio_global {:.3f}\n",
                             r.steps, r.final_loss, r.val_loss, r.val_ppl, r.maxvio_global);
    return 0;
  });
}

}  // namespace moetrain
