// moetrain ablate FILE: trains the variants of an ablation file (resumable) and
// writes runs/<name>/report.{json,md} with plots (trainer/ablation.h).
#include <climits>
#include <cstdlib>
#include <iostream>

#include <unistd.h>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"
#include "moetrain_paths.h"
#include "data/data_error.h"
#include "data/meta.h"
#include "data/prepare.h"
#include "trainer/ablation.h"
#include "trainer/experiment_config.h"

namespace moetrain {

int cmd_ablate(int argc, char** argv) {
  ArgParser args("ablate", "FILE [--report-only] [--no-prepare]",
                 "Train every variant of an ablation file (same data, model, seed(s), token budget), `parallel`\n"
                 "runs at a time as child `moetrain train` processes; finished runs are not re-run, an\n"
                 "interrupted one restarts. Writes runs/<name>/report.json, report.md and PNG plots\n"
                 "(scripts/plot_ablation.py with the setup's Python: $MOETRAIN_PYTHON).");
  args.positional("FILE", "ablation file (YAML)");
  args.flag("report-only", "only (re)write the report from finished runs");
  args.flag("no-prepare", "use data.dir as it is prepared (e.g. copied to a machine without data.sources)");
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    AblationSpec spec = load_ablation(args.pos(0));
    const char* env_python = std::getenv("MOETRAIN_PYTHON");
    const std::string python = env_python ? env_python : MOETRAIN_DEFAULT_PYTHON;
    if (!args.has("report-only")) {
      // Prepare the shared data once, before any child starts.
      ExperimentConfig first = load_experiment_config(spec.experiment, spec.run_overrides(spec.variants[0], spec.variants[0].seeds[0]));
      try {
        PrepareOptions opt;
        opt.min_tokens = first.train.seq_len + 1;
        if (args.has("no-prepare"))
          read_data_meta(first.data.dir);  // must be prepared; the runs check it against the model
        else
          prepare_data(first.data, first.model.vocab_size, opt);
      } catch (const DataError& e) {
        throw UsageError(e.what());
      }
      char exe[PATH_MAX];
      ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
      if (n <= 0) throw std::runtime_error("cannot find the moetrain executable (/proc/self/exe)");
      exe[n] = '\0';
      int failed = run_ablation(spec, exe, python);
      if (failed > 0) std::cerr << fmt::format("{} run(s) failed; the report covers the finished ones\n", failed);
    }
    write_ablation_report(spec, python, MOETRAIN_SOURCE_DIR_FOR_SCRIPTS);
    std::cout << fmt::format("report: {}/report.md\n", spec.root());
    return 0;
  });
}

}  // namespace moetrain
