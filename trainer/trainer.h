// defines: TrainResult, train — the training loop (readable top to bottom, like
// llm.c's): batches from the deterministic loader, forward, LM loss + balance
// losses, backward with gradient accumulation, clip, AdamW, the loss-free bias
// update once per optimizer step, metrics, periodic evaluation, a text sample.
#pragma once

#include <string>
#include <vector>

#include "trainer/experiment_config.h"

namespace moetrain {

struct TrainResult {
  int64_t steps = 0;
  double final_loss = 0.0;      // training loss of the last step
  double val_loss = 0.0;        // last evaluation
  double val_ppl = 0.0;
  double maxvio_global = 0.0;   // last evaluation, mean over MoE layers
  int64_t skipped_steps = 0;
  std::vector<double> losses;   // per optimizer step
};

TrainResult train(const ExperimentConfig& cfg);

}  // namespace moetrain
