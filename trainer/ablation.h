// defines: AblationSpec, AblationVariant, load_ablation, run_ablation,
// write_ablation_report — `moetrain ablate FILE`: trains every variant of an
// ablation file (an experiment plus per-variant --set overrides and seeds) on
// the same data, model and token budget, as child `moetrain train` processes
// (`parallel` at a time, one thread each), skips runs already finished (a
// done.json beside their metrics), and writes runs/<name>/report.{json,md}.
//
// Ablation file (strict: unknown keys are errors, as in experiment configs):
//   name: balance-tiny
//   experiment: ../tiny.yaml       # relative to this file
//   runs_dir: runs                 # runs/<name>/<variant>/seed-<s>/
//   parallel: 2
//   seeds: [1234]                  # default seeds of every variant
//   set: ["train.threads=1"]       # overrides shared by all variants
//   variants:
//     - name: aux_loss_1e-3
//       set: ["balance.strategy=aux_loss", "balance.aux_loss_coef=1e-3"]
//       seeds: [1234, 1235]        # optional
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moetrain {

struct AblationVariant {
  std::string name;
  std::vector<std::string> sets;
  std::vector<int64_t> seeds;
};

struct AblationSpec {
  std::string name;
  std::string experiment;  // resolved path of the experiment config
  std::string runs_dir = "runs";
  int64_t parallel = 1;
  std::vector<int64_t> seeds{1234};
  std::vector<std::string> sets;
  std::vector<AblationVariant> variants;

  std::string root() const { return runs_dir + "/" + name; }
  std::string run_dir(const AblationVariant& v, int64_t seed) const;
  // The full override list of one run (shared, variant, seed, output dirs).
  std::vector<std::string> run_overrides(const AblationVariant& v, int64_t seed) const;
};

// Throws ConfigErrors (file:line:col) for a malformed file; every variant's
// experiment config is loaded and validated too, before anything runs.
AblationSpec load_ablation(const std::string& path);

// Runs what is not finished yet; `moetrain` is the executable to spawn. Returns
// the number of failed runs.
int run_ablation(const AblationSpec& spec, const std::string& moetrain, const std::string& python);

// report.json + report.md from the runs' metrics.jsonl; plots via
// scripts/plot_ablation.py when `python` is non-empty.
void write_ablation_report(const AblationSpec& spec, const std::string& python, const std::string& source_dir);

}  // namespace moetrain
