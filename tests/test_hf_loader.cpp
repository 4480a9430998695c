// Unit tests of io/hf: config.json parsing and export, the name contract, and the
// weight loader's layouts (per-expert, fused, sharded), conversions and rejections,
// on tiny checkpoints written with write_safetensors.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "io/hf.h"
#include "io/safetensors.h"
#include "models/transformer.h"
#include "test_util.h"

namespace moetrain {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Tensors = std::vector<std::pair<std::string, torch::Tensor>>;

using moetrain::testing::TempDir;

// What transformers 5.17 save_pretrained writes for a tiny DeepseekV3 (trimmed of
// keys moetrain ignores: bos/eos, use_cache, dtype, ...).
Json saved_config() {
  return Json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "attention_bias": false, "attention_dropout": 0.0, "first_k_dense_replace": 1,
    "head_dim": 4, "hidden_act": "silu", "hidden_size": 16, "initializer_range": 0.02,
    "intermediate_size": 24, "kv_lora_rank": 8, "max_position_embeddings": 128,
    "moe_intermediate_size": 8, "n_group": 2, "n_routed_experts": 4, "n_shared_experts": 1,
    "norm_topk_prob": true, "num_attention_heads": 2, "num_experts_per_tok": 2,
    "num_hidden_layers": 3, "num_key_value_heads": 2, "num_nextn_predict_layers": 0,
    "pretraining_tp": 1, "q_lora_rank": null, "qk_head_dim": 8, "qk_nope_head_dim": 4,
    "qk_rope_head_dim": 4, "rms_norm_eps": 1e-06, "rope_interleave": true,
    "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
    "routed_scaling_factor": 2.5, "tie_word_embeddings": false, "topk_group": 1,
    "transformers_version": "5.17.0", "v_head_dim": 4, "vocab_size": 32
  })");
}

ModelConfig tiny_config(int64_t q_lora_rank = 8) {
  ModelConfig cfg = hf_config_from_json(saved_config(), "tiny");
  cfg.q_lora_rank = q_lora_rank;
  return cfg;
}

void expect_throw_with(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing '" << needle << "'";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' lacks '" << needle << "'";
  }
}

Transformer make_model(const ModelConfig& cfg, uint64_t seed) {
  torch::manual_seed(seed);
  Transformer model(cfg);
  torch::NoGradGuard no_grad;
  for (auto& r : model->routers()) r->bias.uniform_(-1.0, 1.0);
  for (auto& p : model->named_parameters()) {
    if (p.value().dim() == 1) p.value().uniform_(0.5, 1.5);  // norms, not all ones
  }
  return model;
}

// Every parameter and buffer of `a` equals `b`'s (and keeps `b`'s dtype).
void expect_same_tensors(Transformer& a, Transformer& b) {
  auto pb = b->named_parameters();
  for (auto& p : a->named_parameters()) {
    ASSERT_TRUE(pb.contains(p.key())) << p.key();
    EXPECT_TRUE(torch::equal(p.value(), pb[p.key()])) << p.key();
  }
  auto bb = b->named_buffers();
  for (auto& buf : a->named_buffers()) EXPECT_TRUE(torch::equal(buf.value(), bb[buf.key()])) << buf.key();
}

void write_single(const std::string& dir, const Tensors& tensors) {
  write_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
}

Tensors state_of(Transformer& model) {
  Tensors out;
  for (auto& kv : hf_state_dict(*model)) out.emplace_back(kv.first, kv.second.contiguous().clone());
  return out;
}

Tensors without(const Tensors& in, const std::string& name) {
  Tensors out;
  for (const auto& kv : in)
    if (kv.first != name) out.push_back(kv);
  return out;
}

// ---- config.json ----------------------------------------------------------------

TEST(HfConfig, ParsesWhatSavePretrainedWrites) {
  ModelConfig cfg = hf_config_from_json(saved_config(), "config.json");
  EXPECT_EQ(cfg.vocab_size, 32);
  EXPECT_EQ(cfg.hidden_size, 16);
  EXPECT_EQ(cfg.num_hidden_layers, 3);
  EXPECT_EQ(cfg.num_attention_heads, 2);
  EXPECT_EQ(cfg.intermediate_size, 24);
  EXPECT_EQ(cfg.moe_intermediate_size, 8);
  EXPECT_EQ(cfg.q_lora_rank, 0);  // null
  EXPECT_EQ(cfg.kv_lora_rank, 8);
  EXPECT_EQ(cfg.qk_nope_head_dim, 4);
  EXPECT_EQ(cfg.qk_rope_head_dim, 4);
  EXPECT_EQ(cfg.v_head_dim, 4);
  EXPECT_EQ(cfg.n_routed_experts, 4);
  EXPECT_EQ(cfg.n_shared_experts, 1);
  EXPECT_EQ(cfg.num_experts_per_tok, 2);
  EXPECT_EQ(cfg.n_group, 2);
  EXPECT_EQ(cfg.topk_group, 1);
  EXPECT_DOUBLE_EQ(cfg.routed_scaling_factor, 2.5);
  EXPECT_TRUE(cfg.norm_topk_prob);
  EXPECT_EQ(cfg.scoring_func, ScoringFunc::kSigmoid);
  EXPECT_EQ(cfg.first_k_dense_replace, 1);
  EXPECT_EQ(cfg.num_nextn_predict_layers, 0);
  EXPECT_DOUBLE_EQ(cfg.rope_theta, 5000.0);  // from rope_parameters
  EXPECT_FALSE(cfg.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(cfg.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(cfg.init_std, 0.02);
  EXPECT_EQ(cfg.max_position_embeddings, 128);
}

TEST(HfConfig, OptionalKeysTakeTransformersDefaults) {
  Json j = saved_config();
  for (const char* k : {"num_nextn_predict_layers", "rope_parameters", "rms_norm_eps", "initializer_range",
                        "max_position_embeddings", "rope_interleave", "hidden_act", "num_key_value_heads"})
    j.erase(k);
  j["q_lora_rank"] = 12;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  ModelConfig cfg = hf_config_from_json(j, "config.json");
  EXPECT_EQ(cfg.q_lora_rank, 12);
  EXPECT_EQ(cfg.num_nextn_predict_layers, 0);
  EXPECT_DOUBLE_EQ(cfg.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(cfg.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(cfg.init_std, 0.02);
  EXPECT_EQ(cfg.max_position_embeddings, 4096);
}

TEST(HfConfig, YarnFromRopeParametersAndLegacyRopeScaling) {
  Json j = saved_config();
  j["max_position_embeddings"] = 163840;
  j["rope_parameters"] = Json::parse(R"({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
      "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
      "mscale": 1.0, "mscale_all_dim": 1.0})");
  ModelConfig a = hf_config_from_json(j, "v5");
  EXPECT_TRUE(a.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(a.rope_scaling.factor, 40.0);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(a.rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(a.rope_scaling.beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(a.rope_scaling.mscale, 1.0);
  EXPECT_DOUBLE_EQ(a.rope_scaling.mscale_all_dim, 1.0);

  // The Hub's DeepSeek-V3 config.json (transformers 4 keys).
  j.erase("rope_parameters");
  j["rope_theta"] = 20000.0;
  j["rope_scaling"] = Json::parse(R"({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})");
  ModelConfig b = hf_config_from_json(j, "v4");
  EXPECT_TRUE(b.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(b.rope_theta, 20000.0);
  EXPECT_DOUBLE_EQ(b.rope_scaling.factor, 40.0);

  // No mscale: HF's None, kept as 0 (rope_attention_factor then uses mscale(factor)).
  j["rope_scaling"].erase("mscale");
  EXPECT_DOUBLE_EQ(hf_config_from_json(j, "no mscale").rope_scaling.mscale, 0.0);

  j["rope_scaling"] = nullptr;
  ModelConfig c = hf_config_from_json(j, "v4 plain");
  EXPECT_FALSE(c.rope_scaling.enabled);
  EXPECT_DOUBLE_EQ(c.rope_theta, 20000.0);
}

TEST(HfConfig, RejectsWhatMoetrainCannotReproduce) {
  struct Case {
    std::function<void(Json&)> edit;
    std::string needle;
  };
  const std::vector<Case> cases = {
      {[](Json& j) { j["model_type"] = "llama"; }, "model_type is 'llama'"},
      {[](Json& j) { j.erase("model_type"); }, "expected 'deepseek_v3'"},
      {[](Json& j) { j["rope_interleave"] = false; }, "rope_interleave: false"},
      {[](Json& j) { j["tie_word_embeddings"] = true; }, "tie_word_embeddings: true"},
      {[](Json& j) { j["hidden_act"] = "gelu"; }, "hidden_act 'gelu'"},
      {[](Json& j) { j["attention_bias"] = true; }, "attention_bias: true"},
      {[](Json& j) { j["scoring_func"] = "softmax"; }, "scoring_func 'softmax'"},
      {[](Json& j) { j["num_key_value_heads"] = 128; }, "num_key_value_heads (128)"},
      {[](Json& j) { j["quantization_config"] = Json::object(); }, "quantization_config"},
      {[](Json& j) { j.erase("vocab_size"); }, "missing key 'vocab_size'"},
      {[](Json& j) { j.erase("q_lora_rank"); }, "missing key 'q_lora_rank'"},
      {[](Json& j) { j["n_routed_experts"] = "4"; }, "'n_routed_experts' must be an integer"},
      {[](Json& j) { j["n_group"] = 3; }, "divisible by n_group"},
      {[](Json& j) { j["rope_parameters"]["rope_type"] = "linear"; }, "rope_type 'linear'"},
      {[](Json& j) { j["rope_parameters"]["llama3_extra"] = 1; }, "unsupported RoPE key 'llama3_extra'"},
  };
  for (const Case& c : cases) {
    Json j = saved_config();
    c.edit(j);
    expect_throw_with([&] { hf_config_from_json(j, "dir/config.json"); }, c.needle);
    expect_throw_with([&] { hf_config_from_json(j, "dir/config.json"); }, "dir/config.json");
  }
}

TEST(HfConfig, ExportRoundTrips) {
  for (int64_t q : {0, 8}) {
    for (bool yarn : {false, true}) {
      ModelConfig cfg = tiny_config(q);
      cfg.rope_scaling.enabled = yarn;
      if (yarn) {
        cfg.rope_scaling.factor = 4.0;
        cfg.rope_scaling.original_max_position_embeddings = 32;
        cfg.rope_scaling.mscale = 0.707;
        cfg.rope_scaling.mscale_all_dim = 0.707;
      }
      cfg.num_nextn_predict_layers = 1;
      Json j = hf_config_to_json(cfg);
      EXPECT_EQ(j["model_type"], "deepseek_v3");
      EXPECT_EQ(j["architectures"], Json::array({"DeepseekV3ForCausalLM"}));
      EXPECT_EQ(j["rope_interleave"], true);
      if (q == 0) {
        EXPECT_TRUE(j["q_lora_rank"].is_null());
      }
      ModelConfig back = hf_config_from_json(Json::parse(j.dump()), "exported");
      EXPECT_EQ(back.q_lora_rank, cfg.q_lora_rank);
      EXPECT_EQ(back.num_nextn_predict_layers, 1);
      EXPECT_EQ(back.rope_scaling.enabled, yarn);
      EXPECT_DOUBLE_EQ(back.rope_scaling.factor, cfg.rope_scaling.factor);
      EXPECT_DOUBLE_EQ(back.rope_scaling.mscale, cfg.rope_scaling.mscale);
      EXPECT_EQ(back.rope_scaling.original_max_position_embeddings,
                cfg.rope_scaling.original_max_position_embeddings);
      EXPECT_EQ(hf_config_to_json(back), j);
    }
  }
  ModelConfig softmax = tiny_config();
  softmax.scoring_func = ScoringFunc::kSoftmax;
  expect_throw_with([&] { hf_config_to_json(softmax); }, "sigmoid");
}

// ---- names ----------------------------------------------------------------------

TEST(HfNames, ContractBothWays) {
  EXPECT_EQ(hf_name_for("embed.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(hf_name_for("head.weight"), "lm_head.weight");
  EXPECT_EQ(hf_name_for("layers.2.attn.wkv_a.weight"), "model.layers.2.self_attn.kv_a_proj_with_mqa.weight");
  EXPECT_EQ(hf_name_for("layers.1.ffn.gate.bias"), "model.layers.1.mlp.gate.e_score_correction_bias");
  EXPECT_EQ(hf_name_for("layers.1.ffn.experts.w13", 3, -1, 0), "model.layers.1.mlp.experts.3.gate_proj.weight");
  EXPECT_EQ(hf_name_for("layers.1.ffn.experts.w13", 0, -1, 1), "model.layers.1.mlp.experts.0.up_proj.weight");
  EXPECT_EQ(hf_name_for("layers.1.ffn.experts.w2", 7), "model.layers.1.mlp.experts.7.down_proj.weight");
  expect_throw_with([] { hf_name_for("layers.1.ffn.experts.w13"); }, "expert index");
  expect_throw_with([] { hf_name_for("layers.1.ffn.experts.w13", 3); }, "part 0 (gate) or 1 (up)");
  expect_throw_with([] { hf_name_for("layers.1.ffn.experts.w2", 3, -1, 0); }, "part 0 (gate) or 1 (up)");
  expect_throw_with([] { hf_name_for("layers.1.attn.rope.cos"); }, "not in the HF name contract");

  for (int64_t q : {0, 8}) {
    ModelConfig cfg = tiny_config(q);
    Transformer model(cfg);
    std::set<std::string> seen;
    for (auto& kv : hf_state_dict(*model)) {
      HfTarget t;
      ASSERT_TRUE(hf_parse_name(kv.first, &t)) << kv.first;
      EXPECT_TRUE(seen.insert(kv.first).second) << kv.first;
      EXPECT_EQ(hf_name_for(t.name, t.expert, -1, t.part), kv.first);
    }
    // embed, norm, head; per layer 7 (q_lora) or 5 attention tensors and 2 norms;
    // one dense layer of 3; two MoE layers of gate, bias, 3 shared, 3 per expert.
    const size_t attn = q ? 7 : 5;
    const size_t expected = 3 + 3 * (attn + 2) + 3 + 2 * (2 + 3 + 3 * 4);
    EXPECT_EQ(seen.size(), expected);
  }
  HfTarget t;
  EXPECT_TRUE(hf_parse_name("model.layers.1.mlp.experts.gate_up_proj", &t));
  EXPECT_EQ(t.kind, HfTarget::Kind::kWhole);  // transformers 5's in-memory layout is moetrain's
  EXPECT_EQ(t.name, "layers.1.ffn.experts.w13");
  EXPECT_TRUE(hf_parse_name("model.layers.1.mlp.experts.4.up_proj.weight", &t));
  EXPECT_EQ(t.kind, HfTarget::Kind::kExpert);
  EXPECT_EQ(t.name, "layers.1.ffn.experts.w13");
  EXPECT_EQ(t.expert, 4);
  EXPECT_EQ(t.part, 1);
  for (const char* bad : {"model.layers.01.input_layernorm.weight", "model.layers.1.mlp.experts.+1.up_proj.weight",
                          "model.rotary_emb.inv_freq", "model.layers.1.self_attn.rotary_emb.inv_freq",
                          "model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv", "model.layers..norm.weight"})
    EXPECT_FALSE(hf_parse_name(bad, &t)) << bad;
}

// ---- weights --------------------------------------------------------------------

TEST(HfLoader, SaveThenLoadIsExact) {
  for (int64_t q : {0, 8}) {
    ModelConfig cfg = tiny_config(q);
    TempDir dir;
    Transformer a = make_model(cfg, 1), b = make_model(cfg, 2);
    save_hf_checkpoint(dir.path(), *a, cfg);
    ModelConfig back = load_hf_config(dir.path());
    EXPECT_EQ(back.q_lora_rank, q);
    EXPECT_GT(load_hf_weights(dir.path(), *b, back), 0);
    expect_same_tensors(a, b);
  }
}

TEST(HfLoader, FusedExpertLayout) {
  ModelConfig cfg = tiny_config();
  TempDir dir;
  Transformer a = make_model(cfg, 1), b = make_model(cfg, 2);
  Tensors tensors;
  for (auto& kv : state_of(a))
    if (kv.first.find(".mlp.experts.") == std::string::npos) tensors.push_back(kv);
  for (int64_t i = 1; i < 3; ++i) {
    auto& ex = *a->layer(i).moe->experts;
    const std::string p = "model.layers." + std::to_string(i) + ".mlp.experts.";
    tensors.emplace_back(p + "gate_up_proj", ex.w13.detach().clone());  // [E, 2I, D], gate rows first
    tensors.emplace_back(p + "down_proj", ex.w2.detach().clone());      // [E, D, I]
  }
  write_single(dir.path(), tensors);
  load_hf_weights(dir.path(), *b, cfg);
  expect_same_tensors(a, b);

  // Both layouts for one layer: the same rows filled twice.
  tensors.push_back({"model.layers.1.mlp.experts.2.up_proj.weight", torch::zeros({8, 16})});
  write_single(dir.path(), tensors);
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "already filled");
}

TEST(HfLoader, ShardedCheckpoint) {
  ModelConfig cfg = tiny_config();
  TempDir dir;
  Transformer a = make_model(cfg, 1), b = make_model(cfg, 2);
  Tensors all = state_of(a), s1, s2;
  Json map = Json::object();
  for (size_t k = 0; k < all.size(); ++k) {
    const bool first = k % 2 == 0;
    (first ? s1 : s2).push_back(all[k]);
    map[all[k].first] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  const fs::path d(dir.path());
  write_safetensors((d / "model-00001-of-00002.safetensors").string(), s1, {{"format", "pt"}});
  write_safetensors((d / "model-00002-of-00002.safetensors").string(), s2, {{"format", "pt"}});
  auto write_index = [&](const Json& m) {
    std::ofstream(d / "model.safetensors.index.json") << Json({{"metadata", {{"total_size", 0}}}, {"weight_map", m}});
  };
  write_index(map);
  EXPECT_EQ(load_hf_weights(dir.path(), *b, cfg), static_cast<int64_t>(all.size()));
  expect_same_tensors(a, b);

  // The index names a shard for a tensor that another shard holds.
  Json wrong = map;
  wrong[s1.front().first] = "model-00002-of-00002.safetensors";
  write_index(wrong);
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "listed in the index under shard");
  // The index lists a tensor no shard holds.
  Json extra = map;
  extra["model.layers.0.mlp.gate_proj.weight_scale_inv"] = "model-00001-of-00002.safetensors";
  write_index(extra);
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "which does not hold it");
  // A shard holds a tensor the index does not list.
  Json fewer = map;
  fewer.erase(s2.front().first);
  write_index(fewer);
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "not listed in model.safetensors.index.json");
  // A missing shard.
  write_index(map);
  fs::remove(d / "model-00002-of-00002.safetensors");
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "shard 'model-00002-of-00002.safetensors' is missing");
  // A shard path outside the directory.
  Json escape = map;
  escape[s1.front().first] = "../model.safetensors";
  write_index(escape);
  expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "not a plain file name");
}

TEST(HfLoader, RejectionsNameTheTensorAndLeaveTheModelUntouched) {
  ModelConfig cfg = tiny_config();
  Transformer a = make_model(cfg, 1), b = make_model(cfg, 2), b_copy = make_model(cfg, 2);
  const Tensors good = state_of(a);
  struct Case {
    Tensors tensors;
    std::vector<std::string> needles;
  };
  Tensors unknown = good, bad_shape = good, bad_expert = good, bad_dtype = good;
  unknown.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", torch::ones({2})});
  for (auto& kv : bad_shape)
    if (kv.first == "model.layers.1.self_attn.kv_b_proj.weight") kv.second = torch::zeros({16, 9});
  bad_expert.push_back({"model.layers.2.mlp.experts.4.up_proj.weight", torch::zeros({8, 16})});
  for (auto& kv : bad_dtype)
    if (kv.first == "model.norm.weight") kv.second = kv.second.to(torch::kInt32);
  Tensors no_bias = without(good, "model.layers.2.mlp.gate.e_score_correction_bias");
  const std::vector<Case> cases = {
      {without(good, "model.layers.1.mlp.experts.3.up_proj.weight"),
       {"lacks 1 tensor", "'model.layers.1.mlp.experts.3.up_proj.weight'", "layers.1.ffn.experts.w13' expert 3"}},
      {without(good, "lm_head.weight"), {"'lm_head.weight' (moetrain 'head.weight')"}},
      {no_bias, {"model.layers.2.mlp.gate.e_score_correction_bias"}},
      {unknown, {"unknown tensor 'model.layers.0.self_attn.rotary_emb.inv_freq'"}},
      {bad_shape,
       {"'model.layers.1.self_attn.kv_b_proj.weight'", "has shape [16, 9], expected [16, 8]"}},
      {bad_expert, {"expert index 4 out of range", "4 routed experts"}},
      {bad_dtype, {"'model.norm.weight'", "I32"}},
  };
  for (const Case& c : cases) {
    TempDir dir;
    write_single(dir.path(), c.tensors);
    for (const std::string& needle : c.needles)
      expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, needle);
    expect_same_tensors(b, b_copy);
  }
  // Weights of a q_lora model into a model without q compression.
  TempDir dir;
  write_single(dir.path(), good);
  Transformer plain(tiny_config(0));
  expect_throw_with([&] { load_hf_weights(dir.path(), *plain, cfg); }, "which the model does not have");
  TempDir empty;
  expect_throw_with([&] { load_hf_weights(empty.path(), *b, cfg); }, "no model.safetensors");
}

TEST(HfLoader, SkipsMtpLayers) {
  ModelConfig cfg = tiny_config();
  TempDir dir;
  Transformer a = make_model(cfg, 1), b = make_model(cfg, 2);
  Tensors tensors = state_of(a);
  tensors.push_back({"model.layers.3.input_layernorm.weight", torch::ones({16})});  // MTP layer (= L)
  tensors.push_back({"model.layers.3.mlp.experts.0.gate_proj.weight", torch::ones({8, 16})});
  write_single(dir.path(), tensors);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(load_hf_weights(dir.path(), *b, cfg), static_cast<int64_t>(tensors.size()) - 2);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("skipped 2 tensors of layer(s) 3"), std::string::npos) << err;
  expect_same_tensors(a, b);
}

TEST(HfLoader, ConvertsToTheDestinationDtypeAndKeepsTheRouterBiasFp32) {
  ModelConfig cfg = tiny_config();
  Transformer a = make_model(cfg, 1);
  {  // bf16 file -> fp32 model: bf16 values exactly
    TempDir dir;
    Tensors bf16;
    for (auto& kv : state_of(a)) bf16.emplace_back(kv.first, kv.second.to(torch::kBFloat16));
    write_single(dir.path(), bf16);
    Transformer b = make_model(cfg, 2);
    load_hf_weights(dir.path(), *b, cfg);
    auto pa = a->named_parameters();
    for (auto& p : b->named_parameters()) {
      EXPECT_EQ(p.value().scalar_type(), torch::kFloat) << p.key();
      EXPECT_TRUE(torch::equal(p.value(), pa[p.key()].to(torch::kBFloat16).to(torch::kFloat))) << p.key();
    }
  }
  {  // fp32 file -> bf16 model: the router bias stays fp32 and exact
    TempDir dir;
    write_single(dir.path(), state_of(a));
    Transformer b = make_model(cfg, 2);
    b->to(torch::kBFloat16);
    load_hf_weights(dir.path(), *b, cfg);
    auto ra = a->routers(), rb = b->routers();
    ASSERT_EQ(ra.size(), 2u);
    for (size_t k = 0; k < ra.size(); ++k) {
      EXPECT_EQ(rb[k]->bias.scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::equal(rb[k]->bias, ra[k]->bias));
      EXPECT_EQ(rb[k]->weight.scalar_type(), torch::kBFloat16);
    }
    EXPECT_TRUE(torch::equal(b->head->weight, a->head->weight.to(torch::kBFloat16)));
  }
}

// ---- multi-token prediction ----------------------------------------------------------

ModelConfig mtp_config(int64_t depth) {
  ModelConfig cfg = tiny_config();
  cfg.num_nextn_predict_layers = depth;
  return cfg;
}

TEST(HfMtp, NamesBothWays) {
  // L = 3: MTP module k is HF layer 3 + k.
  EXPECT_EQ(hf_name_for("mtp.0.enorm.weight", -1, 3), "model.layers.3.enorm.weight");
  EXPECT_EQ(hf_name_for("mtp.1.hnorm.weight", -1, 3), "model.layers.4.hnorm.weight");
  EXPECT_EQ(hf_name_for("mtp.0.eh_proj.weight", -1, 3), "model.layers.3.eh_proj.weight");
  EXPECT_EQ(hf_name_for("mtp.0.norm.weight", -1, 3), "model.layers.3.shared_head.norm.weight");
  EXPECT_EQ(hf_name_for("mtp.0.block.attn_norm.weight", -1, 3), "model.layers.3.input_layernorm.weight");
  EXPECT_EQ(hf_name_for("mtp.0.block.attn.wkv_b.weight", -1, 61), "model.layers.61.self_attn.kv_b_proj.weight");
  EXPECT_EQ(hf_name_for("mtp.0.block.ffn.gate.bias", -1, 61), "model.layers.61.mlp.gate.e_score_correction_bias");
  EXPECT_EQ(hf_name_for("mtp.0.block.ffn.experts.w2", 5, 61), "model.layers.61.mlp.experts.5.down_proj.weight");
  expect_throw_with([] { hf_name_for("mtp.0.enorm.weight"); }, "need num_hidden_layers");
  expect_throw_with([] { hf_name_for("mtp.0.block.bogus", -1, 3); }, "not in the HF name contract");

  HfTarget t;
  ASSERT_TRUE(hf_parse_name("model.layers.61.shared_head.norm.weight", &t, 61));
  EXPECT_EQ(t.name, "mtp.0.norm.weight");
  EXPECT_EQ(t.layer, 61);
  ASSERT_TRUE(hf_parse_name("model.layers.61.mlp.experts.7.up_proj.weight", &t, 61));
  EXPECT_EQ(t.kind, HfTarget::Kind::kExpert);
  EXPECT_EQ(t.name, "mtp.0.block.ffn.experts.w13");
  EXPECT_EQ(t.expert, 7);
  EXPECT_EQ(t.part, 1);
  ASSERT_TRUE(hf_parse_name("model.layers.61.embed_tokens.weight", &t, 61));
  EXPECT_EQ(t.kind, HfTarget::Kind::kSharedCopy);
  EXPECT_EQ(t.name, "embed.weight");
  ASSERT_TRUE(hf_parse_name("model.layers.62.shared_head.head.weight", &t, 61));
  EXPECT_EQ(t.kind, HfTarget::Kind::kSharedCopy);
  EXPECT_EQ(t.name, "head.weight");
  // Without L every layer is a decoder layer, and MTP-only names are unknown.
  ASSERT_TRUE(hf_parse_name("model.layers.61.input_layernorm.weight", &t));
  EXPECT_EQ(t.name, "layers.61.attn_norm.weight");
  EXPECT_FALSE(hf_parse_name("model.layers.61.enorm.weight", &t));

  // The whole state dict of an MTP model: unique names, parse and name_for invert each
  // other, and each module carries DeepSeek's copies of the embedding and head.
  ModelConfig cfg = mtp_config(2);
  Transformer model(cfg);
  std::set<std::string> seen;
  for (auto& kv : hf_state_dict(*model)) {
    ASSERT_TRUE(hf_parse_name(kv.first, &t, 3)) << kv.first;
    EXPECT_TRUE(seen.insert(kv.first).second) << kv.first;
    if (t.kind != HfTarget::Kind::kSharedCopy) {
      EXPECT_EQ(hf_name_for(t.name, t.expert, 3, t.part), kv.first);
    }
  }
  for (const char* name : {"model.layers.3.enorm.weight", "model.layers.4.eh_proj.weight",
                           "model.layers.3.shared_head.norm.weight", "model.layers.4.mlp.experts.3.gate_proj.weight",
                           "model.layers.3.embed_tokens.weight", "model.layers.4.shared_head.head.weight"})
    EXPECT_TRUE(seen.count(name)) << name;
  // per module: enorm, hnorm, eh_proj, shared_head.norm, 2 copies, 7 attention + 2 norms, MoE 2 + 3 + 12
  const size_t main = 3 + 3 * (7 + 2) + 3 + 2 * (2 + 3 + 3 * 4);
  EXPECT_EQ(seen.size(), main + 2 * (4 + 2 + 7 + 2 + 2 + 3 + 3 * 4));
}

TEST(HfMtp, SaveThenLoadIsExact) {
  ModelConfig cfg = mtp_config(2);
  TempDir dir;
  Transformer a = make_model(cfg, 1), b = make_model(cfg, 2);
  save_hf_checkpoint(dir.path(), *a, cfg);
  ModelConfig back = load_hf_config(dir.path());
  EXPECT_EQ(back.num_nextn_predict_layers, 2);
  ::testing::internal::CaptureStderr();
  const int64_t n = load_hf_weights(dir.path(), *b, back);
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "");  // the copies equal the main tensors: nothing to report
  EXPECT_EQ(n, static_cast<int64_t>(hf_state_dict(*a).size()));
  expect_same_tensors(a, b);
  // Sharded through write_hf_weights in bf16: the MTP router biases stay fp32 too.
  TempDir sharded;
  const auto files = write_hf_weights(sharded.path(), *a, torch::kBFloat16, 10000);
  EXPECT_GT(files.size(), 2u);
  std::ofstream(fs::path(sharded.path()) / "config.json") << hf_config_to_json(cfg).dump();
  Transformer c = make_model(cfg, 3);
  load_hf_weights(sharded.path(), *c, cfg);
  EXPECT_TRUE(torch::equal(c->mtp_module(1).block->moe->gate->bias, a->mtp_module(1).block->moe->gate->bias));
  EXPECT_TRUE(torch::equal(c->mtp_module(1).eh_proj->weight,
                           a->mtp_module(1).eh_proj->weight.to(torch::kBFloat16).to(torch::kFloat)));
}

TEST(HfMtp, CheckpointsWithoutOrWithPartialMtp) {
  ModelConfig cfg = mtp_config(1);
  ModelConfig plain_cfg = mtp_config(0);
  Transformer plain = make_model(plain_cfg, 1);
  Tensors main_only = state_of(plain);
  {  // No MTP tensor at all (what save_pretrained writes): the main model loads, MTP keeps its init.
    TempDir dir;
    write_single(dir.path(), main_only);
    Transformer b = make_model(cfg, 2);
    const torch::Tensor before = b->mtp_module(0).eh_proj->weight.clone();
    ::testing::internal::CaptureStderr();
    load_hf_weights(dir.path(), *b, cfg);
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("holds no multi-token-prediction tensors (layers 3..3)"), std::string::npos) << err;
    EXPECT_TRUE(torch::equal(b->mtp_module(0).eh_proj->weight, before));
    EXPECT_TRUE(torch::equal(b->head->weight, plain->head->weight));
  }
  Transformer a = make_model(cfg, 4);
  const Tensors full = state_of(a);
  {  // Part of a module: strict.
    TempDir dir;
    write_single(dir.path(), without(full, "model.layers.3.hnorm.weight"));
    Transformer b = make_model(cfg, 2);
    expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); },
                      "'model.layers.3.hnorm.weight' (moetrain 'mtp.0.hnorm.weight')");
  }
  {  // A copy of the shared head that differs: reported, the main head kept.
    TempDir dir;
    Tensors changed = full;
    for (auto& kv : changed)
      if (kv.first == "model.layers.3.shared_head.head.weight") kv.second = kv.second + 0.5;
    write_single(dir.path(), changed);
    Transformer b = make_model(cfg, 2);
    ::testing::internal::CaptureStderr();
    load_hf_weights(dir.path(), *b, cfg);
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("'model.layers.3.shared_head.head.weight' differs from the main 'lm_head.weight' by up to 0.5"),
              std::string::npos)
        << err;
    expect_same_tensors(a, b);
  }
  {  // A copy of the wrong shape is rejected before anything is copied.
    TempDir dir;
    Tensors bad = full;
    for (auto& kv : bad)
      if (kv.first == "model.layers.3.embed_tokens.weight") kv.second = torch::zeros({3, 3});
    write_single(dir.path(), bad);
    Transformer b = make_model(cfg, 2);
    expect_throw_with([&] { load_hf_weights(dir.path(), *b, cfg); }, "'model.layers.3.embed_tokens.weight'");
  }
  {  // More MTP layers than the config has: skipped with a notice.
    TempDir dir;
    Transformer two = make_model(mtp_config(2), 5);
    write_single(dir.path(), state_of(two));
    Transformer b = make_model(cfg, 2);
    ::testing::internal::CaptureStderr();
    load_hf_weights(dir.path(), *b, cfg);
    const std::string err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("of layer(s) 4 >= num_hidden_layers + num_nextn_predict_layers = 4"), std::string::npos) << err;
    EXPECT_TRUE(torch::equal(b->mtp_module(0).eh_proj->weight, two->mtp_module(0).eh_proj->weight));
  }
}

}  // namespace
}  // namespace moetrain
