#include "models/decoding.h"

#include <ATen/CPUGeneratorImpl.h>

#include <stdexcept>

namespace moetrain {

namespace {

// ids -> [1, n] int64 on the model's device
torch::Tensor row(const std::vector<int64_t>& ids, const Transformer& model) {
  return torch::tensor(ids, torch::kInt64).view({1, -1}).to(model->embed->weight.device());
}

// Appends tokens to `out`; says when generation is over.
class Emitter {
 public:
  Emitter(const GenerateOptions& opt, std::vector<int64_t>& out) : opt_(opt), out_(out) {}
  bool done() const {
    return static_cast<int64_t>(out_.size()) >= opt_.max_new_tokens || (!out_.empty() && out_.back() == opt_.eos_id);
  }
  // Returns done() after adding t.
  bool emit(int64_t t) {
    out_.push_back(t);
    return done();
  }

 private:
  const GenerateOptions& opt_;
  std::vector<int64_t>& out_;
};

void check_prompt(const std::vector<int64_t>& prompt, const Transformer& model) {
  if (prompt.empty()) throw std::invalid_argument("generate: the prompt has no tokens");
  for (int64_t t : prompt)
    if (t < 0 || t >= model->cfg.vocab_size)
      throw std::invalid_argument("generate: prompt token " + std::to_string(t) + " is outside the vocabulary (" +
                                  std::to_string(model->cfg.vocab_size) + ")");
}

}  // namespace

std::vector<int64_t> generate_cached(Transformer& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& opt, GenerateStats* stats) {
  check_prompt(prompt, model);
  torch::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  GenerateStats s;
  std::vector<int64_t> out;
  Emitter emitter(opt, out);
  if (opt.max_new_tokens > 0) {
    KVCache cache = model->new_cache();
    torch::Tensor h = model->forward_cached(row(prompt, model), cache);  // prefill: [1, n, D]
    ++s.main_steps;
    int64_t next = sample_token(model->logits(h[0][-1]), opt.sampling, gen);
    while (!emitter.emit(next)) {
      h = model->forward_cached(row({next}, model), cache);  // [1, 1, D]
      ++s.main_steps;
      next = sample_token(model->logits(h[0][0]), opt.sampling, gen);
    }
    s.kv_cache_bytes_per_token = cache.bytes_per_token();
  }
  if (stats) *stats = s;
  return out;
}

std::vector<int64_t> generate_uncached(Transformer& model, const std::vector<int64_t>& prompt,
                                       const GenerateOptions& opt, GenerateStats* stats) {
  check_prompt(prompt, model);
  torch::NoGradGuard no_grad;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  GenerateStats s;
  std::vector<int64_t> seq = prompt, out;
  Emitter emitter(opt, out);
  while (opt.max_new_tokens > 0) {
    const torch::Tensor h = model->forward(row(seq, model)).hidden;  // [1, |seq|, D]
    ++s.main_steps;
    const int64_t next = sample_token(model->logits(h[0][-1]), opt.sampling, gen);
    seq.push_back(next);
    if (emitter.emit(next)) break;
  }
  if (stats) *stats = s;
  return out;
}

std::vector<int64_t> generate_speculative_mtp(Transformer& model, const std::vector<int64_t>& prompt,
                                              const GenerateOptions& opt, GenerateStats* stats) {
  if (model->cfg.num_nextn_predict_layers < 1)
    throw std::invalid_argument("speculative decoding with MTP needs a model with num_nextn_predict_layers >= 1");
  if (opt.sampling.temperature > 0.0)
    throw std::invalid_argument("speculative decoding with MTP is greedy only (temperature 0)");
  check_prompt(prompt, model);
  torch::NoGradGuard no_grad;
  GenerateStats s;
  std::vector<int64_t> out;
  Emitter emitter(opt, out);
  auto argmax = [&](const torch::Tensor& hidden) { return model->logits(hidden).argmax(-1).item<int64_t>(); };
  if (opt.max_new_tokens <= 0) return out;

  // Invariant at the top of the loop, with seq = prompt + out: the main cache and the
  // MTP cache both hold positions 0..|seq|-2, `last` = seq.back() is not yet in the
  // main cache, and `draft` is the MTP guess for the token after `last`.
  KVCache cache = model->new_cache();
  MLACache mtp_cache;
  const int64_t n = static_cast<int64_t>(prompt.size());
  const torch::Tensor h = model->forward_cached(row(prompt, model), cache);  // [1, n, D]
  ++s.main_steps;
  int64_t last = argmax(h[0][n - 1]);
  if (emitter.emit(last)) {
    if (stats) *stats = s;
    return out;
  }
  // MTP position i combines h_i with Emb(t_{i+1}): the prompt shifted by one plus `last`.
  std::vector<int64_t> shifted(prompt.begin() + 1, prompt.end());
  shifted.push_back(last);
  torch::Tensor m = model->mtp_forward_cached(0, h, row(shifted, model), mtp_cache);  // [1, n, D]
  int64_t draft = argmax(m[0][n - 1]);

  s.kv_cache_bytes_per_token = cache.bytes_per_token();
  while (true) {
    const torch::Tensor hv = model->forward_cached(row({last, draft}, model), cache);  // [1, 2, D]
    ++s.main_steps;
    ++s.drafted;
    const int64_t verified = argmax(hv[0][0]);  // the main model's token after `last`
    if (verified == draft) {
      ++s.accepted;
      if (emitter.emit(draft)) break;
      const int64_t bonus = argmax(hv[0][1]);  // its token after the draft: free
      if (emitter.emit(bonus)) break;
      m = model->mtp_forward_cached(0, hv, row({draft, bonus}, model), mtp_cache);
      draft = argmax(m[0][1]);
      last = bonus;
    } else {
      cache.crop(cache.length() - 1);  // the draft's entry
      if (emitter.emit(verified)) break;
      m = model->mtp_forward_cached(0, hv.narrow(1, 0, 1), row({verified}, model), mtp_cache);
      draft = argmax(m[0][0]);
      last = verified;
    }
  }
  if (stats) *stats = s;
  return out;
}

}  // namespace moetrain
