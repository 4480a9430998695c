// defines: kLossChunkTokens, EvalResult, evaluate — the validation loss of the
// trainer (and of `moetrain eval FILE --checkpoint PATH`): eval_batches global
// batches of the validation split read in a fixed order (data/dataset.h).
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "data/dataset.h"
#include "models/transformer.h"
#include "trainer/experiment_config.h"

namespace moetrain {

constexpr int64_t kLossChunkTokens = 4096;  // rows of logits alive at once in the LM loss

struct EvalResult {
  double loss = 0.0;                  // mean over micro-batches of their mean next-token loss
  int64_t tokens = 0;                 // target tokens scored
  std::vector<double> maxvio_layers;  // MaxVio of the loads over the whole evaluated set, current biases
};

// Every micro-batch holds micro_batch windows of seq_len targets, so the mean of the micro-batch
// means is the mean over all scored tokens. The expert loads it produces never reach the balancer.
EvalResult evaluate(Transformer& model, const DataLoader& loader, const ExperimentConfig& cfg, torch::Device device);

}  // namespace moetrain
