// defines: TrainResult, train — the training loop (readable top to bottom, like
// llm.c's): batches from the deterministic loader, forward, LM loss + balance
// losses, backward with gradient accumulation, clip, AdamW, the loss-free bias
// update once per optimizer step, metrics, periodic evaluation, a text sample,
// checkpoints (trainer/checkpoint.h: every checkpoint.every steps, on SIGUSR1, at
// the end, and on SIGINT/SIGTERM before returning early) and resume.
//
// Test-only fault injection: MOETRAIN_TEST_INJECT="KIND:STEP[-STEP2],..." with
// STEP the 1-based optimizer step; KIND is nan_loss (the loss becomes NaN before
// backward), nan_grad (the first parameter's gradient becomes NaN), spike (the
// reported loss is multiplied by 1000, for the spike detector), sigterm / sigusr1
// (raise() the signal during that step), exit (the process _Exit(3)s at the end of
// that step). KIND@RANK fires on that data-parallel rank only. Never set it in real runs.
//
// Data parallel (WORLD_SIZE > 1, TrainOptions::dist): see "Data parallel" in
// docs/training.md; rank r reads micro-batches (step, m, r, world), gradients are
// averaged, loss sums and expert counts summed, stop / save signals agreed, and
// rank 0 alone writes metrics, progress, samples and checkpoints.
#pragma once

#include <string>
#include <vector>

#include "trainer/distributed.h"
#include "trainer/experiment_config.h"

namespace moetrain {

struct TrainResult {
  int64_t steps = 0;
  double final_loss = 0.0;      // training loss of the last step
  double val_loss = 0.0;        // last evaluation
  double val_ppl = 0.0;
  double maxvio_global = 0.0;   // last evaluation, mean over MoE layers
  int64_t skipped_steps = 0;
  std::vector<double> losses;   // per optimizer step taken by THIS call (a resumed run starts at resumed_step)
  int64_t resumed_step = -1;    // the checkpoint step this call resumed from; -1 = fresh start
  bool stopped_by_signal = false;  // SIGINT/SIGTERM: saved at a step boundary and returned early
  std::string last_checkpoint;     // directory of the last checkpoint written ("" if none)
};

struct TrainOptions {
  // "" = fresh start (a fresh metrics.jsonl); "auto" or PATH: see "Resume" in trainer/checkpoint.h.
  std::string resume;
  // A Hugging Face DeepseekV3 directory whose weights start a fresh run (ignored
  // when resuming from a checkpoint). Its architecture must equal cfg.model's.
  std::string init_from;
  // This process's place in a data-parallel job (DistEnv::from_env() in `moetrain train`);
  // the default is one process.
  DistEnv dist;
};

TrainResult train(const ExperimentConfig& cfg, const TrainOptions& options = {});

}  // namespace moetrain
