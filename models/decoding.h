// defines: GenerateOptions, GenerateStats, generate_cached, generate_uncached,
// generate_speculative_mtp — autoregressive generation from a prompt:
//   generate_cached           one prefill over the prompt, then one token per step over
//                             the latent KV cache (absorbed MLA; the fast path);
//   generate_uncached         the reference twin: a full forward over the whole
//                             sequence for every new token (naive MLA, no cache);
//   generate_speculative_mtp  greedy self-speculative decoding with MTP module 1 as
//                             the draft (DeepSeek-V3 §5.4.3): each main-model step
//                             verifies [last token, draft] at once; a matching draft
//                             is accepted together with the main model's next token,
//                             a wrong one is dropped (the main cache is cropped). Every
//                             emitted token is the main model's argmax, so the output
//                             equals generate_cached's greedy output.
// All return the new tokens only, stopping after max_new_tokens or after eos_id.
#pragma once

#include <cstdint>
#include <vector>

#include "models/sampling.h"
#include "models/transformer.h"

namespace moetrain {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;  // greedy by default
  int64_t eos_id = -1;       // stop after emitting it; -1: never
  uint64_t seed = 0;         // the sampler's CPU generator
};

struct GenerateStats {
  int64_t main_steps = 0;  // main-model forward calls (the prefill included)
  int64_t drafted = 0;     // speculative: draft tokens verified
  int64_t accepted = 0;    // speculative: draft tokens accepted
  int64_t kv_cache_bytes_per_token = 0;  // the main model's latent cache, all layers (0 uncached)
  double acceptance_rate() const { return drafted > 0 ? static_cast<double>(accepted) / drafted : 0.0; }
};

std::vector<int64_t> generate_cached(Transformer& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& opt, GenerateStats* stats = nullptr);

std::vector<int64_t> generate_uncached(Transformer& model, const std::vector<int64_t>& prompt,
                                       const GenerateOptions& opt, GenerateStats* stats = nullptr);

// Throws std::invalid_argument without MTP modules or with temperature > 0.
std::vector<int64_t> generate_speculative_mtp(Transformer& model, const std::vector<int64_t>& prompt,
                                              const GenerateOptions& opt, GenerateStats* stats = nullptr);

}  // namespace moetrain
