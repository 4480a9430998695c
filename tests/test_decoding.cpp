// Decoding: absorbed MLA (W^UK folded into the query, W^UV after attending over
// the cached latent) equals the naive training form; cached decoding (prefill +
// one token at a time, latent KV cache) equals a full forward; the cache holds
// kv_lora_rank + qk_rope_head_dim numbers per token and layer; generation with the
// cache equals the uncached reference twin; greedy self-speculative decoding with
// the MTP draft equals plain greedy decoding. All in fp64 on CPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdio>
#include <vector>

#include "models/decoding.h"
#include "models/mla.h"
#include "models/transformer.h"

using namespace moetrain;

class DecodingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::set_num_threads(1);
    torch::manual_seed(0);
  }
};

namespace {

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

ModelConfig small_config(int64_t q_lora_rank, bool yarn, int64_t mtp = 0) {
  ModelConfig c;
  c.vocab_size = 96;
  c.hidden_size = 48;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.intermediate_size = 64;
  c.moe_intermediate_size = 16;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 24;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 6;
  c.v_head_dim = 10;  // != nope: W^UK and W^UV have different shapes
  c.n_routed_experts = 6;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.first_k_dense_replace = 1;
  c.num_nextn_predict_layers = mtp;
  c.init_std = 0.15;
  if (yarn) {  // cos/sin attention factor != 1 and a softmax mscale^2: position offsets must line up
    c.rope_scaling.enabled = true;
    c.rope_scaling.factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 8;
    c.rope_scaling.mscale = 1.0;
    c.rope_scaling.mscale_all_dim = 0.5;
    c.max_position_embeddings = 64;
  }
  return c;
}

Transformer fp64_model(const ModelConfig& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  Transformer m(cfg);
  {
    torch::NoGradGuard no_grad;
    for (auto& p : m->named_parameters())
      if (p.key().find("norm.weight") != std::string::npos) p.value().copy_(1.0 + 0.3 * torch::randn_like(p.value()));
  }
  m->to(torch::kDouble);
  m->eval();
  return m;
}

}  // namespace

TEST_F(DecodingTest, AbsorbedMlaEqualsNaive) {
  for (int64_t q_lora : {0, 20}) {
    for (bool yarn : {false, true}) {
      const ModelConfig cfg = small_config(q_lora, yarn);
      torch::manual_seed(1);
      MLA attn(cfg);
      attn->to(torch::kDouble);
      RotaryEmbedding rope(cfg);
      const torch::Tensor x = torch::randn({2, 11, cfg.hidden_size}, torch::kDouble);
      const RopeTables tables = rope.tables(11, torch::kCPU, torch::kDouble);
      MLACache cache;
      const torch::Tensor absorbed = attn->forward_absorbed(x, tables, cache);
      const torch::Tensor naive = attn->forward(x, tables);
      EXPECT_LT(max_abs_diff(absorbed, naive), 1e-12) << "q_lora " << q_lora << " yarn " << yarn;
      EXPECT_LT(max_abs_diff(absorbed, attn->forward_reference(x, tables)), 1e-12);
      // The cache: the normalized latent and the rotated shared key, nothing per head.
      EXPECT_EQ(cache.length(), 11);
      EXPECT_EQ(cache.latent().sizes().vec(), (std::vector<int64_t>{2, 11, cfg.kv_lora_rank}));
      EXPECT_EQ(cache.k_rope().sizes().vec(), (std::vector<int64_t>{2, 11, cfg.qk_rope_head_dim}));
      EXPECT_EQ(cache.numbers_per_token(), cfg.kv_lora_rank + cfg.qk_rope_head_dim);
      EXPECT_LT(max_abs_diff(cache.latent(), attn->kv_norm(attn->wkv_a(x).narrow(-1, 0, cfg.kv_lora_rank))), 1e-15);
    }
  }
}

TEST_F(DecodingTest, AbsorbedLogitsEqualNaiveLogits) {
  // The whole model: one forward_cached call over the full sequence (absorbed MLA in
  // every layer) against the training forward (naive MLA through SDPA).
  for (int64_t q_lora : {0, 20}) {
    const ModelConfig cfg = small_config(q_lora, false);
    Transformer model = fp64_model(cfg, 2);
    torch::NoGradGuard no_grad;
    const torch::Tensor tokens = torch::randint(cfg.vocab_size, {2, 13}, torch::kLong);
    KVCache cache = model->new_cache();
    const torch::Tensor absorbed = model->logits(model->forward_cached(tokens, cache));
    const torch::Tensor naive = model->logits(model->forward(tokens).hidden);
    const double err = max_abs_diff(absorbed, naive);
    std::printf("q_lora %ld: max |logits(absorbed) - logits(naive)| = %.3e (logits up to %.2f)\n",
                static_cast<long>(q_lora), err, naive.abs().max().item<double>());
    EXPECT_LT(err, 1e-10);
  }
}

TEST_F(DecodingTest, CachedDecodeEqualsFullForward) {
  // Prefill 4 tokens, then 8 single-token steps: every position's logits equal the
  // full forward's over the same 12 tokens.
  for (int64_t q_lora : {0, 20}) {
    for (bool yarn : {false, true}) {
      const ModelConfig cfg = small_config(q_lora, yarn);
      Transformer model = fp64_model(cfg, 3);
      torch::NoGradGuard no_grad;
      const int64_t B = 2, n = 12, prefill = 4;
      const torch::Tensor tokens = torch::randint(cfg.vocab_size, {B, n}, torch::kLong);
      KVCache cache = model->new_cache();
      std::vector<torch::Tensor> pieces = {model->forward_cached(tokens.narrow(1, 0, prefill), cache)};
      for (int64_t t = prefill; t < n; ++t) pieces.push_back(model->forward_cached(tokens.narrow(1, t, 1), cache));
      EXPECT_EQ(cache.length(), n);
      const torch::Tensor cached = model->logits(torch::cat(pieces, 1));
      const torch::Tensor full = model->logits(model->forward(tokens).hidden);
      const double err = max_abs_diff(cached, full);
      EXPECT_LT(err, 1e-10) << "q_lora " << q_lora << " yarn " << yarn;
      // Per token and layer: kv_lora_rank + qk_rope_head_dim fp64 numbers.
      EXPECT_EQ(cache.bytes_per_token(), cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 8);
    }
  }
}

TEST_F(DecodingTest, CropThenContinueEqualsFullForward) {
  const ModelConfig cfg = small_config(0, true);
  Transformer model = fp64_model(cfg, 4);
  torch::NoGradGuard no_grad;
  torch::Tensor tokens = torch::randint(cfg.vocab_size, {1, 9}, torch::kLong);
  KVCache cache = model->new_cache();
  model->forward_cached(tokens.narrow(1, 0, 7), cache);
  model->forward_cached(torch::tensor({{5, 6}}, torch::kLong), cache);  // a rejected draft of 2
  cache.crop(7);
  const torch::Tensor h = model->forward_cached(tokens.narrow(1, 7, 2), cache);
  const torch::Tensor full = model->forward(tokens).hidden.narrow(1, 7, 2);
  EXPECT_LT(max_abs_diff(h, full), 1e-10);
}

TEST_F(DecodingTest, CachedGenerationEqualsTheUncachedTwin) {
  const ModelConfig cfg = small_config(20, true);
  Transformer model = fp64_model(cfg, 5);
  const std::vector<int64_t> prompt = {3, 17, 42, 8, 8, 91};
  GenerateOptions opt;
  opt.max_new_tokens = 20;
  GenerateStats cached_stats, plain_stats;
  const auto cached = generate_cached(model, prompt, opt, &cached_stats);
  const auto plain = generate_uncached(model, prompt, opt, &plain_stats);
  EXPECT_EQ(cached, plain);
  EXPECT_EQ(cached.size(), 20u);
  EXPECT_EQ(cached_stats.main_steps, 20);  // prefill + 19 single-token steps
  // Sampling: the same seed draws the same tokens from (numerically) the same distributions.
  opt.sampling.temperature = 0.9;
  opt.sampling.top_k = 20;
  opt.sampling.top_p = 0.95;
  opt.seed = 7;
  EXPECT_EQ(generate_cached(model, prompt, opt), generate_uncached(model, prompt, opt));
  // eos stops generation right after it is emitted.
  opt.sampling = SamplingOptions{};
  opt.eos_id = cached[4];
  const auto stopped = generate_cached(model, prompt, opt);
  ASSERT_LE(stopped.size(), 5u);
  EXPECT_EQ(stopped.back(), opt.eos_id);
}

TEST_F(DecodingTest, SpeculativeMtpEqualsGreedy) {
  // Random models (drafts mostly rejected) over several seeds and prompts; then a
  // model whose every prediction is token 0 (final norms zeroed: all logits 0, argmax
  // 0), where every draft is accepted. Output must equal plain greedy decoding.
  int64_t drafted = 0, accepted = 0;
  for (uint64_t seed = 0; seed < 4; ++seed) {
    ModelConfig cfg = small_config(seed % 2 ? 20 : 0, seed >= 2, /*mtp=*/seed == 3 ? 2 : 1);
    cfg.vocab_size = 12;  // a small vocabulary: greedy text repeats, so some drafts hit
    Transformer model = fp64_model(cfg, 100 + seed);
    const std::vector<int64_t> prompt = {1, 5, static_cast<int64_t>(seed), 7};
    GenerateOptions opt;
    opt.max_new_tokens = 40;
    GenerateStats st;
    const auto spec = generate_speculative_mtp(model, prompt, opt, &st);
    EXPECT_EQ(spec, generate_cached(model, prompt, opt)) << "seed " << seed;
    EXPECT_EQ(spec.size(), 40u);
    drafted += st.drafted;
    accepted += st.accepted;
    // Steps: prefill + one per draft; each accepted draft saves one.
    EXPECT_EQ(st.main_steps, 1 + st.drafted);
  }
  std::printf("random models: %ld of %ld drafts accepted\n", static_cast<long>(accepted), static_cast<long>(drafted));
  EXPECT_GT(drafted, 0);
  EXPECT_GT(accepted, 0);  // both the accept and the reject branch ran

  const ModelConfig cfg = small_config(0, false, 1);
  Transformer model = fp64_model(cfg, 9);
  {
    torch::NoGradGuard no_grad;
    model->norm->weight.zero_();
    model->mtp_module(0).norm->weight.zero_();
  }
  GenerateOptions opt;
  opt.max_new_tokens = 9;
  GenerateStats st;
  const auto spec = generate_speculative_mtp(model, {4, 2}, opt, &st);
  EXPECT_EQ(spec, std::vector<int64_t>(9, 0));
  EXPECT_EQ(spec, generate_cached(model, {4, 2}, opt));
  EXPECT_EQ(st.accepted, st.drafted);
  EXPECT_EQ(st.main_steps, 5);  // prefill (1 token) + 4 verifications of 2 tokens each
}

TEST_F(DecodingTest, SpeculativeNeedsMtpAndGreedy) {
  Transformer plain = fp64_model(small_config(0, false, 0), 1);
  GenerateOptions opt;
  EXPECT_THROW(generate_speculative_mtp(plain, {1, 2}, opt), std::invalid_argument);
  Transformer mtp = fp64_model(small_config(0, false, 1), 1);
  opt.sampling.temperature = 1.0;
  EXPECT_THROW(generate_speculative_mtp(mtp, {1, 2}, opt), std::invalid_argument);
  EXPECT_THROW(generate_cached(mtp, {}, GenerateOptions{}), std::invalid_argument);
  EXPECT_THROW(generate_cached(mtp, {96}, GenerateOptions{}), std::invalid_argument);
}
