// defines: SamplingOptions, sampling_probs, sample_token — next-token choice from
// one position's logits: greedy (temperature 0, the default), or a draw from the
// softmax at `temperature` restricted to the top_k most likely tokens and then to
// the nucleus (the smallest set of most likely tokens whose mass reaches top_p),
// in that order (as transformers' TopK → TopP warpers).
#pragma once

#include <ATen/core/Generator.h>
#include <torch/torch.h>

namespace moetrain {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (argmax; top_k / top_p unused)
  int64_t top_k = 0;         // 0: no top-k filter
  double top_p = 1.0;        // 1: no nucleus filter; in (0, 1]
};

// logits: [V] -> probabilities [V] (fp64) after temperature, top-k and top-p;
// filtered tokens get exactly 0. Needs temperature > 0.
torch::Tensor sampling_probs(const torch::Tensor& logits, const SamplingOptions& opt);

// logits: [V] (any device / float dtype) -> token id. Greedy: the first argmax.
// Otherwise one draw from sampling_probs using `gen` (a CPU generator).
int64_t sample_token(const torch::Tensor& logits, const SamplingOptions& opt, at::Generator& gen);

}  // namespace moetrain
