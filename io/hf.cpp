#include "io/hf.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"

namespace moetrain {

namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Router biases are buffers; the loader requires them, the writer exports them.
bool is_router_bias(const std::string& name) { return ends_with(name, ".ffn.gate.bias"); }

// Stacked routed experts [E, ...], split per expert on the HF side.
bool is_stacked_experts(const std::string& name) {
  return ends_with(name, ".ffn.experts.w13") || ends_with(name, ".ffn.experts.w2");
}

// HF tensors per expert row of a stacked tensor: w13's rows are gate_proj ‖ up_proj.
int64_t expert_parts(const std::string& name) { return ends_with(name, ".ffn.experts.w13") ? 2 : 1; }

// ---- config.json ---------------------------------------------------------------

[[noreturn]] void config_error(const std::string& where, const std::string& what) {
  throw std::runtime_error(where + ": " + what);
}

const Json* find_key(const Json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

// The value of `key`, which must exist and pass `is` (an nlohmann type test; `expected`
// names the type for the error).
template <class T>
T get_checked(const Json& j, const char* key, const std::string& where, bool (Json::*is)() const noexcept,
              const char* expected) {
  const Json* v = find_key(j, key);
  if (!v) config_error(where, std::string("missing key '") + key + "'");
  if (!(v->*is)()) config_error(where, std::string("'") + key + "' must be " + expected + ", got " + v->dump());
  return v->get<T>();
}

// Absent or null (HF's None): the fallback.
bool absent(const Json& j, const char* key) {
  const Json* v = find_key(j, key);
  return !v || v->is_null();
}

int64_t get_int(const Json& j, const char* key, const std::string& where, int64_t min_value) {
  const int64_t x = get_checked<int64_t>(j, key, where, &Json::is_number_integer, "an integer");
  if (x < min_value)
    config_error(where, std::string("'") + key + "' must be >= " + std::to_string(min_value) +
                            ", got " + std::to_string(x));
  return x;
}

int64_t get_int_or(const Json& j, const char* key, const std::string& where, int64_t min_value,
                   int64_t fallback) {
  return absent(j, key) ? fallback : get_int(j, key, where, min_value);
}

double get_number(const Json& j, const char* key, const std::string& where) {
  return get_checked<double>(j, key, where, &Json::is_number, "a number");
}

double get_number_or(const Json& j, const char* key, const std::string& where, double fallback) {
  return absent(j, key) ? fallback : get_number(j, key, where);
}

bool get_bool_or(const Json& j, const char* key, const std::string& where, bool fallback) {
  return absent(j, key) ? fallback : get_checked<bool>(j, key, where, &Json::is_boolean, "true or false");
}

std::string get_string_or(const Json& j, const char* key, const std::string& where,
                          const std::string& fallback) {
  return absent(j, key) ? fallback : get_checked<std::string>(j, key, where, &Json::is_string, "a string");
}

// RoPE: `rope_parameters` (transformers 5) or legacy `rope_theta` + `rope_scaling`,
// resolved as transformers 5.17's convert_rope_params_to_dict / standardize_rope_params:
// rope_scaling wins over rope_parameters; a theta inside the dict wins over the
// top-level one; yarn's original_max_position_embeddings defaults to
// max_position_embeddings, a top-level original_max_position_embeddings wins.
void parse_rope(const Json& j, const std::string& where, ModelConfig* cfg) {
  const Json* params = find_key(j, "rope_parameters");
  const Json* scaling = find_key(j, "rope_scaling");
  const char* dict_key = "rope_parameters";
  const Json* dict = nullptr;
  if (scaling && !scaling->is_null()) {
    dict = scaling;
    dict_key = "rope_scaling";
  } else if (params && !params->is_null()) {
    dict = params;
  }
  double theta = get_number_or(j, "rope_theta", where, 10000.0);
  cfg->rope_scaling = RopeScalingConfig{};
  cfg->rope_scaling.enabled = false;
  if (!dict) {
    cfg->rope_theta = theta;
    return;
  }
  const std::string dwhere = where + ": " + dict_key;
  if (!dict->is_object()) config_error(where, std::string("'") + dict_key + "' must be an object or null");
  static const std::set<std::string> known = {"rope_type", "type", "rope_theta", "factor",
                                              "original_max_position_embeddings", "beta_fast",
                                              "beta_slow", "mscale", "mscale_all_dim", "truncate",
                                              "attention_factor", "partial_rotary_factor"};
  for (auto it = dict->begin(); it != dict->end(); ++it)
    if (!known.count(it.key()))
      config_error(dwhere, "unsupported RoPE key '" + it.key() + "' (moetrain reproduces default and yarn RoPE)");
  std::string type = get_string_or(*dict, "rope_type", dwhere, get_string_or(*dict, "type", dwhere, "default"));
  cfg->rope_theta = get_number_or(*dict, "rope_theta", dwhere, theta);
  if (find_key(*dict, "partial_rotary_factor") && get_number(*dict, "partial_rotary_factor", dwhere) != 1.0)
    config_error(dwhere, "partial_rotary_factor != 1 is not supported");
  if (type == "default") return;
  if (type != "yarn")
    config_error(dwhere, "rope_type '" + type + "' is not supported (only default and yarn)");
  if (find_key(*dict, "attention_factor") && !(*dict)["attention_factor"].is_null())
    config_error(dwhere, "an explicit 'attention_factor' is not supported (it is derived from factor/mscale)");
  if (!get_bool_or(*dict, "truncate", dwhere, true))
    config_error(dwhere, "'truncate: false' is not supported (DeepSeek's YaRN rounds the correction range)");
  RopeScalingConfig& rs = cfg->rope_scaling;
  rs.enabled = true;
  int64_t max_pos = get_int_or(j, "max_position_embeddings", where, 1, 4096);
  if (find_key(j, "original_max_position_embeddings"))
    rs.original_max_position_embeddings = get_int(j, "original_max_position_embeddings", where, 1);
  else
    rs.original_max_position_embeddings =
        get_int_or(*dict, "original_max_position_embeddings", dwhere, 1, max_pos);
  rs.factor = get_number_or(*dict, "factor", dwhere,
                            static_cast<double>(max_pos) / rs.original_max_position_embeddings);
  if (!(rs.factor > 0)) config_error(dwhere, "'factor' must be > 0");
  rs.beta_fast = get_number_or(*dict, "beta_fast", dwhere, 32.0);
  rs.beta_slow = get_number_or(*dict, "beta_slow", dwhere, 1.0);
  rs.mscale_all_dim = get_number_or(*dict, "mscale_all_dim", dwhere, 0.0);
  // Absent means None to HF, which (like 0) selects cos/sin scaling by mscale(factor)
  // alone; moetrain's rope_attention_factor reads mscale == 0 the same way.
  rs.mscale = get_number_or(*dict, "mscale", dwhere, 0.0);
}

void reject_unless(bool ok, const std::string& where, const std::string& what) {
  if (!ok) config_error(where, what);
}

}  // namespace

ModelConfig hf_config_from_json(const Json& j, const std::string& where) {
  if (!j.is_object()) config_error(where, "config.json must hold a JSON object");
  // What moetrain cannot reproduce, first.
  std::string model_type = get_string_or(j, "model_type", where, "");
  reject_unless(model_type == "deepseek_v3", where,
                "model_type is '" + model_type + "', expected 'deepseek_v3'");
  reject_unless(get_bool_or(j, "rope_interleave", where, true), where,
                "'rope_interleave: false' (half-split RoPE) is not supported; moetrain's RoPE is interleaved");
  reject_unless(!get_bool_or(j, "tie_word_embeddings", where, false), where,
                "'tie_word_embeddings: true' is not supported (moetrain's head is separate from the embedding)");
  std::string act = get_string_or(j, "hidden_act", where, "silu");
  reject_unless(act == "silu", where, "hidden_act '" + act + "' is not supported (only silu)");
  reject_unless(!get_bool_or(j, "attention_bias", where, false), where,
                "'attention_bias: true' is not supported (moetrain's projections have no bias)");
  if (const Json* q = find_key(j, "quantization_config"); q && !q->is_null())
    config_error(where, "quantized checkpoints (quantization_config) are not supported; dequantize to bf16 first");
  std::string scoring = get_string_or(j, "scoring_func", where, "sigmoid");
  reject_unless(scoring == "sigmoid", where,
                "scoring_func '" + scoring + "' is not supported: transformers' DeepseekV3 routes with sigmoid");
  std::string topk_method = get_string_or(j, "topk_method", where, "noaux_tc");
  reject_unless(topk_method == "noaux_tc", where,
                "topk_method '" + topk_method + "' is not DeepSeek-V3's (noaux_tc)");

  ModelConfig cfg;
  cfg.vocab_size = get_int(j, "vocab_size", where, 1);
  cfg.hidden_size = get_int(j, "hidden_size", where, 1);
  cfg.num_hidden_layers = get_int(j, "num_hidden_layers", where, 1);
  cfg.num_attention_heads = get_int(j, "num_attention_heads", where, 1);
  cfg.intermediate_size = get_int(j, "intermediate_size", where, 1);
  cfg.moe_intermediate_size = get_int(j, "moe_intermediate_size", where, 1);
  if (!find_key(j, "q_lora_rank")) config_error(where, "missing key 'q_lora_rank' (null for a plain q projection)");
  cfg.q_lora_rank = get_int_or(j, "q_lora_rank", where, 1, 0);
  cfg.kv_lora_rank = get_int(j, "kv_lora_rank", where, 1);
  cfg.qk_nope_head_dim = get_int(j, "qk_nope_head_dim", where, 0);
  cfg.qk_rope_head_dim = get_int(j, "qk_rope_head_dim", where, 2);
  cfg.v_head_dim = get_int(j, "v_head_dim", where, 1);
  cfg.n_routed_experts = get_int(j, "n_routed_experts", where, 1);
  cfg.n_shared_experts = get_int(j, "n_shared_experts", where, 0);
  cfg.num_experts_per_tok = get_int(j, "num_experts_per_tok", where, 1);
  cfg.n_group = get_int(j, "n_group", where, 1);
  cfg.topk_group = get_int(j, "topk_group", where, 1);
  cfg.routed_scaling_factor = get_number(j, "routed_scaling_factor", where);
  cfg.norm_topk_prob = get_checked<bool>(j, "norm_topk_prob", where, &Json::is_boolean, "true or false");
  cfg.first_k_dense_replace = get_int(j, "first_k_dense_replace", where, 0);
  cfg.num_nextn_predict_layers = get_int_or(j, "num_nextn_predict_layers", where, 0, 0);
  cfg.scoring_func = ScoringFunc::kSigmoid;
  cfg.rms_norm_eps = get_number_or(j, "rms_norm_eps", where, 1e-6);
  cfg.max_position_embeddings = get_int_or(j, "max_position_embeddings", where, 1, 4096);
  cfg.init_std = get_number_or(j, "initializer_range", where, 0.02);
  parse_rope(j, where, &cfg);

  // Cross-field checks that HF would otherwise fail on at run time (or worse, not).
  int64_t kv_heads = get_int_or(j, "num_key_value_heads", where, 1, cfg.num_attention_heads);
  reject_unless(kv_heads == cfg.num_attention_heads, where,
                "num_key_value_heads (" + std::to_string(kv_heads) + ") must equal num_attention_heads (" +
                    std::to_string(cfg.num_attention_heads) + ") for MLA");
  reject_unless(cfg.qk_rope_head_dim % 2 == 0, where, "qk_rope_head_dim must be even");
  reject_unless(cfg.n_routed_experts % cfg.n_group == 0, where,
                "n_routed_experts (" + std::to_string(cfg.n_routed_experts) + ") must be divisible by n_group (" +
                    std::to_string(cfg.n_group) + ")");
  reject_unless(cfg.topk_group <= cfg.n_group, where, "topk_group must be <= n_group");
  reject_unless(cfg.num_experts_per_tok <= cfg.topk_group * (cfg.n_routed_experts / cfg.n_group), where,
                "num_experts_per_tok exceeds the experts in topk_group groups");
  reject_unless(cfg.first_k_dense_replace <= cfg.num_hidden_layers, where,
                "first_k_dense_replace must be <= num_hidden_layers");
  reject_unless(cfg.rms_norm_eps > 0, where, "rms_norm_eps must be > 0");
  reject_unless(cfg.rope_theta > 0, where, "rope_theta must be > 0");
  return cfg;
}

ModelConfig load_hf_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open (not a Hugging Face checkpoint directory?)");
  Json j;
  try {
    j = Json::parse(in);
  } catch (const Json::exception& e) {
    throw std::runtime_error(path + ": invalid JSON: " + e.what());
  }
  return hf_config_from_json(j, path);
}

Json hf_config_to_json(const ModelConfig& cfg) {
  if (cfg.scoring_func != ScoringFunc::kSigmoid)
    throw std::runtime_error(std::string("hf_config_to_json: scoring_func ") + scoring_func_name(cfg.scoring_func) +
                             " cannot be exported: transformers' DeepseekV3 always routes with sigmoid");
  Json rope = {{"rope_type", cfg.rope_scaling.enabled ? "yarn" : "default"}, {"rope_theta", cfg.rope_theta}};
  Json legacy_scaling = nullptr;
  if (cfg.rope_scaling.enabled) {
    const RopeScalingConfig& rs = cfg.rope_scaling;
    for (Json* d : {&rope, &legacy_scaling}) {
      (*d)["factor"] = rs.factor;
      (*d)["original_max_position_embeddings"] = rs.original_max_position_embeddings;
      (*d)["beta_fast"] = rs.beta_fast;
      (*d)["beta_slow"] = rs.beta_slow;
      (*d)["mscale"] = rs.mscale;
      (*d)["mscale_all_dim"] = rs.mscale_all_dim;
    }
    legacy_scaling["type"] = "yarn";
  }
  Json j = Json::object();
  j["architectures"] = Json::array({"DeepseekV3ForCausalLM"});
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = cfg.vocab_size;
  j["hidden_size"] = cfg.hidden_size;
  j["intermediate_size"] = cfg.intermediate_size;
  j["moe_intermediate_size"] = cfg.moe_intermediate_size;
  j["num_hidden_layers"] = cfg.num_hidden_layers;
  j["num_attention_heads"] = cfg.num_attention_heads;
  j["num_key_value_heads"] = cfg.num_attention_heads;
  j["q_lora_rank"] = cfg.q_lora_rank > 0 ? Json(cfg.q_lora_rank) : Json(nullptr);
  j["kv_lora_rank"] = cfg.kv_lora_rank;
  j["qk_nope_head_dim"] = cfg.qk_nope_head_dim;
  j["qk_rope_head_dim"] = cfg.qk_rope_head_dim;
  j["v_head_dim"] = cfg.v_head_dim;
  j["n_routed_experts"] = cfg.n_routed_experts;
  j["n_shared_experts"] = cfg.n_shared_experts;
  j["num_experts_per_tok"] = cfg.num_experts_per_tok;
  j["n_group"] = cfg.n_group;
  j["topk_group"] = cfg.topk_group;
  j["routed_scaling_factor"] = cfg.routed_scaling_factor;
  j["norm_topk_prob"] = cfg.norm_topk_prob;
  j["scoring_func"] = "sigmoid";
  j["topk_method"] = "noaux_tc";
  j["first_k_dense_replace"] = cfg.first_k_dense_replace;
  j["num_nextn_predict_layers"] = cfg.num_nextn_predict_layers;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["tie_word_embeddings"] = false;
  j["rope_interleave"] = true;
  j["rope_parameters"] = rope;
  j["rope_theta"] = cfg.rope_theta;
  j["rope_scaling"] = legacy_scaling;
  j["rms_norm_eps"] = cfg.rms_norm_eps;
  j["max_position_embeddings"] = cfg.max_position_embeddings;
  j["initializer_range"] = cfg.init_std;
  return j;
}

// ---- names -----------------------------------------------------------------------

namespace {

struct NamePair {
  const char* hf;        // after "model.layers.{i}."
  const char* moetrain;  // after "layers.{i}."
};

// Layer-local names of whole tensors (docs/model-contract.md).
const NamePair kLayerNames[] = {
    {"input_layernorm.weight", "attn_norm.weight"},
    {"post_attention_layernorm.weight", "ffn_norm.weight"},
    {"self_attn.q_proj.weight", "attn.wq.weight"},
    {"self_attn.q_a_proj.weight", "attn.wq_a.weight"},
    {"self_attn.q_a_layernorm.weight", "attn.q_norm.weight"},
    {"self_attn.q_b_proj.weight", "attn.wq_b.weight"},
    {"self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight"},
    {"self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight"},
    {"self_attn.kv_b_proj.weight", "attn.wkv_b.weight"},
    {"self_attn.o_proj.weight", "attn.wo.weight"},
    {"mlp.gate_proj.weight", "ffn.w1.weight"},
    {"mlp.up_proj.weight", "ffn.w3.weight"},
    {"mlp.down_proj.weight", "ffn.w2.weight"},
    {"mlp.gate.weight", "ffn.gate.weight"},
    {"mlp.gate.e_score_correction_bias", "ffn.gate.bias"},
    {"mlp.shared_experts.gate_proj.weight", "ffn.shared_experts.w1.weight"},
    {"mlp.shared_experts.up_proj.weight", "ffn.shared_experts.w3.weight"},
    {"mlp.shared_experts.down_proj.weight", "ffn.shared_experts.w2.weight"},
    {"mlp.experts.gate_up_proj", "ffn.experts.w13"},  // fused [E, 2I, D], gate rows first == moetrain's w13
    {"mlp.experts.down_proj", "ffn.experts.w2"},      // fused [E, D, I] == moetrain's w2
};

// Per-expert names: "mlp.experts.{j}." + hf  <->  "ffn.experts." + moetrain, row j; part k of
// w13's row: its rows [k·I, (k+1)·I) (-1: the whole row).
struct ExpertName {
  const char* hf;
  const char* moetrain;
  int64_t part;
};
const ExpertName kExpertNames[] = {
    {"gate_proj.weight", "w13", 0},
    {"up_proj.weight", "w13", 1},
    {"down_proj.weight", "w2", -1},
};

const NamePair kTopNames[] = {
    {"model.embed_tokens.weight", "embed.weight"},
    {"model.norm.weight", "norm.weight"},
    {"lm_head.weight", "head.weight"},
};

// MTP-only names: "model.layers.{L+k}." + hf  <->  "mtp.{k}." + moetrain. The module's
// decoder block uses the decoder-layer names (kLayerNames) under "mtp.{k}.block.".
const NamePair kMtpNames[] = {
    {"enorm.weight", "enorm.weight"},
    {"hnorm.weight", "hnorm.weight"},
    {"eh_proj.weight", "eh_proj.weight"},
    {"shared_head.norm.weight", "norm.weight"},
};

// Copies of the shared tensors that DeepSeek's release stores in every MTP layer
// (README_WEIGHTS: "shares parameters with" the main embedding / output head).
const NamePair kMtpSharedCopies[] = {
    {"embed_tokens.weight", "embed.weight"},
    {"shared_head.head.weight", "head.weight"},
};

// Parses a canonical decimal index ("0", "17"; not "007", "+1", "") at s[pos...] up
// to the next '.', advancing pos past the '.'.
bool parse_index(const std::string& s, size_t* pos, int64_t* out) {
  size_t dot = s.find('.', *pos);
  if (dot == std::string::npos || dot == *pos || dot - *pos > 9) return false;
  int64_t v = 0;
  for (size_t k = *pos; k < dot; ++k) {
    if (s[k] < '0' || s[k] > '9') return false;
    v = v * 10 + (s[k] - '0');
  }
  if (s[*pos] == '0' && dot - *pos > 1) return false;
  *out = v;
  *pos = dot + 1;
  return true;
}

// Parses the layer-local part of an HF decoder-layer name (after "model.layers.{i}.")
// into moetrain's layer-local name under `prefix` ("layers.{i}." or "mtp.{k}.block.").
bool parse_layer_local(const std::string& rest, const std::string& prefix, HfTarget* t) {
  for (const NamePair& p : kLayerNames) {
    if (rest == p.hf) {
      t->name = prefix + p.moetrain;
      return true;
    }
  }
  static const std::string kExperts = "mlp.experts.";
  if (!starts_with(rest, kExperts)) return false;
  size_t epos = kExperts.size();
  if (!parse_index(rest, &epos, &t->expert)) return false;
  const std::string leaf = rest.substr(epos);
  for (const ExpertName& p : kExpertNames) {
    if (leaf == p.hf) {
      t->kind = HfTarget::Kind::kExpert;
      t->name = prefix + "ffn.experts." + p.moetrain;
      t->part = p.part;
      return true;
    }
  }
  return false;
}

// moetrain layer-local name (after "layers.{i}." or "mtp.{k}.block.") -> HF layer-local
// name, or "" when it is not one.
std::string layer_local_hf(const std::string& rest, int64_t expert, int64_t part,
                           const std::function<void(const std::string&)>& fail) {
  static const std::string kExperts = "ffn.experts.";
  if (starts_with(rest, kExperts)) {
    const std::string leaf = rest.substr(kExperts.size());
    bool known = false;
    for (const ExpertName& p : kExpertNames) {
      if (leaf != p.moetrain) continue;
      known = true;
      if (expert < 0) fail("stacked experts need an expert index");
      if (part == p.part) return "mlp.experts." + std::to_string(expert) + "." + p.hf;
    }
    fail(known ? "w13 needs part 0 (gate) or 1 (up); w2 none" : "unknown expert tensor");
  }
  for (const NamePair& p : kLayerNames) {
    if (rest == p.moetrain) {
      if (expert != -1) fail("not an expert tensor");
      return p.hf;
    }
  }
  return "";
}

}  // namespace

bool hf_parse_name(const std::string& hf_name, HfTarget* out, int64_t num_hidden_layers) {
  HfTarget t;
  for (const NamePair& p : kTopNames) {
    if (hf_name == p.hf) {
      t.name = p.moetrain;
      *out = t;
      return true;
    }
  }
  static const std::string kLayers = "model.layers.";
  if (!starts_with(hf_name, kLayers)) return false;
  size_t pos = kLayers.size();
  if (!parse_index(hf_name, &pos, &t.layer)) return false;
  const std::string rest = hf_name.substr(pos);
  if (num_hidden_layers < 0 || t.layer < num_hidden_layers) {
    if (!parse_layer_local(rest, "layers." + std::to_string(t.layer) + ".", &t)) return false;
    *out = t;
    return true;
  }
  // An MTP module: HF layer num_hidden_layers + k is moetrain's mtp.{k}.
  const std::string mtp = "mtp." + std::to_string(t.layer - num_hidden_layers) + ".";
  for (const NamePair& p : kMtpNames) {
    if (rest == p.hf) {
      t.name = mtp + p.moetrain;
      *out = t;
      return true;
    }
  }
  for (const NamePair& p : kMtpSharedCopies) {
    if (rest == p.hf) {
      t.kind = HfTarget::Kind::kSharedCopy;
      t.name = p.moetrain;
      *out = t;
      return true;
    }
  }
  if (!parse_layer_local(rest, mtp + "block.", &t)) return false;
  *out = t;
  return true;
}

std::string hf_name_for(const std::string& moetrain_name, int64_t expert, int64_t num_hidden_layers, int64_t part) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("hf_name_for('" + moetrain_name + "'): " + why);
  };
  for (const NamePair& p : kTopNames) {
    if (moetrain_name == p.moetrain) {
      if (expert != -1) fail("not an expert tensor");
      return p.hf;
    }
  }
  static const std::string kMtp = "mtp.";
  if (starts_with(moetrain_name, kMtp)) {
    size_t pos = kMtp.size();
    int64_t k = -1;
    if (!parse_index(moetrain_name, &pos, &k)) fail("bad MTP module index");
    if (num_hidden_layers < 0) fail("MTP names need num_hidden_layers (HF layer num_hidden_layers + k)");
    const std::string rest = moetrain_name.substr(pos);
    const std::string prefix = "model.layers." + std::to_string(num_hidden_layers + k) + ".";
    for (const NamePair& p : kMtpNames) {
      if (rest == p.moetrain) {
        if (expert != -1) fail("not an expert tensor");
        return prefix + p.hf;
      }
    }
    static const std::string kBlock = "block.";
    if (starts_with(rest, kBlock)) {
      const std::string hf = layer_local_hf(rest.substr(kBlock.size()), expert, part, fail);
      if (!hf.empty()) return prefix + hf;
    }
    fail("not in the HF name contract (docs/model-contract.md)");
  }
  static const std::string kLayers = "layers.";
  if (!starts_with(moetrain_name, kLayers)) fail("not a moetrain model tensor");
  size_t pos = kLayers.size();
  int64_t layer = -1;
  if (!parse_index(moetrain_name, &pos, &layer)) fail("bad layer index");
  const std::string hf = layer_local_hf(moetrain_name.substr(pos), expert, part, fail);
  if (hf.empty()) fail("not in the HF name contract (docs/model-contract.md)");
  return "model.layers." + std::to_string(layer) + "." + hf;
}

// ---- loading -------------------------------------------------------------------------

namespace {

std::string shape_str(c10::IntArrayRef shape) {
  std::ostringstream s;
  s << "[";
  for (size_t k = 0; k < shape.size(); ++k) s << (k ? ", " : "") << shape[k];
  s << "]";
  return s.str();
}

bool is_float_dtype(StDtype d) {
  return d == StDtype::F16 || d == StDtype::BF16 || d == StDtype::F32 || d == StDtype::F64;
}

// One HF tensor, planned from the headers before any data is read.
struct Planned {
  std::string hf_name;
  HfTarget target;
  torch::Tensor dest;  // the module tensor
};

struct ShardPlan {
  std::string path;
  std::vector<Planned> tensors;
};

// Files of the checkpoint and, for a sharded one, the index's tensor -> file map
// (validated: plain file names, every shard present).
std::vector<std::string> checkpoint_files(const std::string& dir, std::map<std::string, std::string>* index) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) return {single.string()};  // as transformers: the single file first
  if (!fs::exists(index_path))
    throw std::runtime_error(dir + ": no model.safetensors or model.safetensors.index.json");
  std::ifstream in(index_path);
  if (!in) throw std::runtime_error(index_path.string() + ": cannot open");
  Json j;
  try {
    j = Json::parse(in);
  } catch (const Json::exception& e) {
    throw std::runtime_error(index_path.string() + ": invalid JSON: " + e.what());
  }
  const Json* map = j.is_object() ? find_key(j, "weight_map") : nullptr;
  if (!map || !map->is_object() || map->empty())
    throw std::runtime_error(index_path.string() + ": no 'weight_map' object");
  std::map<std::string, std::string> shards;  // file -> one tensor it holds (for messages)
  for (auto it = map->begin(); it != map->end(); ++it) {
    if (!it->is_string())
      throw std::runtime_error(index_path.string() + ": weight_map['" + it.key() + "'] is not a file name");
    const std::string file = it->get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos ||
        file == "." || file == "..")
      throw std::runtime_error(index_path.string() + ": shard '" + file + "' (for '" + it.key() +
                               "') is not a plain file name in the checkpoint directory");
    (*index)[it.key()] = file;
    shards.emplace(file, it.key());
  }
  std::vector<std::string> files;
  for (const auto& kv : shards) {
    const fs::path p = fs::path(dir) / kv.first;
    if (!fs::is_regular_file(p))
      throw std::runtime_error(index_path.string() + ": shard '" + kv.first + "' is missing (it should hold '" +
                               kv.second + "')");
    files.push_back(p.string());
  }
  return files;
}

// Fill bookkeeping: one flag per whole tensor, one per expert row of stacked ones.
struct Coverage {
  std::map<std::string, std::vector<std::string>> filled_by;  // moetrain name (or name#j) -> HF names

  void mark(const std::string& key, const std::string& hf_name) {
    std::vector<std::string>& v = filled_by[key];
    if (!v.empty())
      throw std::runtime_error("load_hf_weights: '" + hf_name + "' fills moetrain '" + key +
                               "', already filled by '" + v.front() + "' (duplicate or mixed expert layouts)");
    v.push_back(hf_name);
  }
  bool has(const std::string& key) const { return filled_by.count(key) > 0; }
};

// The coverage key of expert e's part of a stacked tensor (part -1: its whole row).
std::string expert_key(const std::string& name, int64_t e, int64_t part = -1) {
  return name + "#" + std::to_string(e) + (part < 0 ? "" : "." + std::to_string(part));
}

// Every coverage key of expert e of stacked `name`.
std::vector<std::string> expert_keys(const std::string& name, int64_t e) {
  if (expert_parts(name) == 1) return {expert_key(name, e)};
  std::vector<std::string> keys;
  for (int64_t k = 0; k < expert_parts(name); ++k) keys.push_back(expert_key(name, e, k));
  return keys;
}

// Checks one HF tensor's header against its destination and records what it fills.
Planned plan_tensor(const StTensorInfo& info, const HfTarget& t, const std::string& at,
                    const std::map<std::string, torch::Tensor>& dests, Coverage* cov) {
  const std::string& hf = info.name;
  Planned p{hf, t, dests.at(t.name)};
  const torch::Tensor& d = p.dest;
  if (!is_float_dtype(info.dtype))
    throw std::runtime_error("load_hf_weights: " + at + " has dtype " + st_dtype_name(info.dtype) +
                             "; expected a floating type (F32/BF16/F16/F64; dequantize FP8 first)");
  std::vector<int64_t> expected;
  switch (t.kind) {
    case HfTarget::Kind::kWhole:
      expected = d.sizes().vec();
      cov->mark(t.name, hf);
      if (is_stacked_experts(t.name))  // fused gate_up_proj / down_proj: every expert row
        for (int64_t e = 0; e < d.size(0); ++e)
          for (const std::string& key : expert_keys(t.name, e)) cov->mark(key, hf);
      break;
    case HfTarget::Kind::kExpert:
      if (d.dim() != 3)
        throw std::runtime_error("load_hf_weights: moetrain '" + t.name + "' is not a stacked [E, ...] tensor");
      if (t.expert >= d.size(0))
        throw std::runtime_error("load_hf_weights: " + at + ": expert index " + std::to_string(t.expert) +
                                 " out of range (the model has " + std::to_string(d.size(0)) + " routed experts)");
      expected = d.sizes().slice(1).vec();
      if ((t.part >= 0) != (expert_parts(t.name) > 1))
        throw std::runtime_error("load_hf_weights: " + at + " does not fit moetrain '" + t.name + "'");
      if (t.part >= 0) expected[0] /= expert_parts(t.name);  // gate or up: half of w13's rows
      cov->mark(expert_key(t.name, t.expert, t.part), hf);
      break;
    case HfTarget::Kind::kSharedCopy:  // compared with the main tensor after loading
      expected = d.sizes().vec();
      break;
  }
  if (info.shape != expected)
    throw std::runtime_error("load_hf_weights: " + at + " has shape " + shape_str(info.shape) + ", expected " +
                             shape_str(expected) + " (moetrain '" + t.name + "')");
  return p;
}

// Every parameter and every router bias buffer must have been filled (the MTP
// modules' too, unless skip_mtp: a checkpoint without any MTP tensor).
void check_all_filled(const std::string& dir, const torch::nn::Module& model,
                      const std::map<std::string, torch::Tensor>& dests, const Coverage& cov,
                      int64_t num_hidden_layers, bool skip_mtp) {
  std::set<std::string> params;
  for (const auto& item : model.named_parameters(true)) params.insert(item.key());
  std::vector<std::string> missing;
  for (const auto& kv : dests) {
    const std::string& name = kv.first;
    if (!params.count(name) && !is_router_bias(name)) continue;
    if (cov.has(name)) continue;
    if (skip_mtp && starts_with(name, "mtp.")) continue;
    if (is_stacked_experts(name)) {
      const int64_t parts = expert_parts(name);
      for (int64_t e = 0; e < kv.second.size(0); ++e)
        for (int64_t k = 0; k < parts; ++k) {
          const int64_t part = parts > 1 ? k : -1;
          if (!cov.has(expert_key(name, e, part)))
            missing.push_back("'" + hf_name_for(name, e, num_hidden_layers, part) + "' (moetrain '" + name +
                              "' expert " + std::to_string(e) + ")");
        }
      continue;
    }
    std::string hf;
    try {
      hf = "'" + hf_name_for(name, -1, num_hidden_layers) + "'";
    } catch (const std::invalid_argument&) {
      hf = "(no Hugging Face name)";
    }
    missing.push_back(hf + " (moetrain '" + name + "')");
  }
  if (missing.empty()) return;
  std::string msg = "load_hf_weights: " + dir + " lacks " + std::to_string(missing.size()) + " tensor(s): ";
  for (size_t k = 0; k < missing.size() && k < 8; ++k) msg += (k ? ", " : "") + missing[k];
  if (missing.size() > 8) msg += ", ...";
  throw std::runtime_error(msg);
}

void copy_tensor(const Planned& p, const torch::Tensor& src) {
  switch (p.target.kind) {
    case HfTarget::Kind::kWhole:
      p.dest.copy_(src);
      break;
    case HfTarget::Kind::kExpert: {
      torch::Tensor row = p.dest.select(0, p.target.expert);
      if (p.target.part >= 0) {  // gate or up: its half of w13's rows
        const int64_t rows = row.size(0) / expert_parts(p.target.name);
        row = row.narrow(0, p.target.part * rows, rows);
      }
      row.copy_(src);
      break;
    }
    case HfTarget::Kind::kSharedCopy:  // nothing to copy: moetrain shares the main tensor
      break;
  }
}

}  // namespace

int64_t load_hf_weights(const std::string& dir, torch::nn::Module& model, const ModelConfig& cfg) {
  std::map<std::string, torch::Tensor> dests;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) dests[item.key()] = item.value();
  for (const auto& item : model.named_buffers(/*recurse=*/true)) dests[item.key()] = item.value();

  std::map<std::string, std::string> index;  // sharded: tensor -> shard file name
  const std::vector<std::string> files = checkpoint_files(dir, &index);

  // Plan from the headers alone, so that a rejected checkpoint changes nothing.
  std::vector<ShardPlan> plans;
  Coverage cov;
  const int64_t L = cfg.num_hidden_layers, D = cfg.num_nextn_predict_layers;
  std::set<int64_t> skipped_layers;  // beyond the config's MTP modules
  int64_t skipped_tensors = 0, mtp_tensors = 0;
  std::set<std::string> seen;
  for (const std::string& path : files) {
    const SafetensorsHeader header = read_safetensors_header(path);
    const std::string file = fs::path(path).filename().string();
    ShardPlan plan{path, {}};
    for (const StTensorInfo& info : header.tensors) {
      const std::string& hf = info.name;
      const std::string at = "'" + hf + "' in " + path;
      if (!index.empty()) {
        auto it = index.find(hf);
        if (it == index.end())
          throw std::runtime_error("load_hf_weights: " + at + " is not listed in model.safetensors.index.json");
        if (it->second != file)
          throw std::runtime_error("load_hf_weights: " + at + " is listed in the index under shard '" +
                                   it->second + "'");
      }
      if (!seen.insert(hf).second)
        throw std::runtime_error("load_hf_weights: " + at + " appears in more than one file");
      HfTarget t;
      if (!hf_parse_name(hf, &t, L))
        throw std::runtime_error("load_hf_weights: unknown tensor " + at +
                                 " (not a transformers DeepseekV3ForCausalLM weight)");
      if (t.layer >= L + D) {  // MTP modules the config does not have (model.layers.61 in DeepSeek-V3)
        skipped_layers.insert(t.layer);
        ++skipped_tensors;
        continue;
      }
      if (t.layer >= L) ++mtp_tensors;
      if (!dests.count(t.name)) {
        // transformers builds a zero-width shared MLP when n_shared_experts == 0;
        // moetrain builds none.
        int64_t numel = 1;
        for (int64_t d : info.shape) numel *= d;
        if (numel == 0 && t.name.find(".ffn.shared_experts.") != std::string::npos) continue;
        throw std::runtime_error("load_hf_weights: " + at + " maps to moetrain '" + t.name +
                                 "', which the model does not have (config.json and the weights disagree?)");
      }
      plan.tensors.push_back(plan_tensor(info, t, at, dests, &cov));
    }
    plans.push_back(std::move(plan));
  }
  for (const auto& kv : index)
    if (!seen.count(kv.first))
      throw std::runtime_error("load_hf_weights: '" + kv.first + "' is listed in model.safetensors.index.json "
                               "under shard '" + kv.second + "', which does not hold it");
  const bool no_mtp_tensors = D > 0 && mtp_tensors == 0;
  check_all_filled(dir, model, dests, cov, L, no_mtp_tensors);

  // Copy, one shard in memory at a time; the MTP layers' copies of the shared
  // embedding / head are kept aside and compared once the main tensors are in.
  torch::NoGradGuard no_grad;
  int64_t loaded = 0;
  std::vector<std::pair<const Planned*, torch::Tensor>> shared_copies;
  for (const ShardPlan& plan : plans) {
    if (plan.tensors.empty()) continue;
    const SafetensorsFile f = read_safetensors(plan.path);
    for (const Planned& p : plan.tensors) {
      if (p.target.kind == HfTarget::Kind::kSharedCopy)
        shared_copies.emplace_back(&p, f.at(p.hf_name).clone());
      else
        copy_tensor(p, f.at(p.hf_name));
    }
    loaded += static_cast<int64_t>(plan.tensors.size());
  }
  for (const auto& [p, copy] : shared_copies) {
    const double diff = (copy.to(torch::kDouble) - p->dest.to(torch::kCPU, torch::kDouble)).abs().max().item<double>();
    if (diff > 0.0)
      std::fprintf(stderr,
                   "load_hf_weights: '%s' differs from the main '%s' by up to %.3g; moetrain shares one tensor "
                   "and keeps the main one\n",
                   p->hf_name.c_str(), hf_name_for(p->target.name).c_str(), diff);
  }
  if (no_mtp_tensors)
    std::fprintf(stderr,
                 "load_hf_weights: %s holds no multi-token-prediction tensors (layers %lld..%lld); the %lld MTP "
                 "module(s) keep their initialization (transformers' save_pretrained drops them)\n",
                 dir.c_str(), static_cast<long long>(L), static_cast<long long>(L + D - 1), static_cast<long long>(D));
  if (skipped_tensors > 0) {
    std::string layers;
    for (int64_t l : skipped_layers) layers += (layers.empty() ? "" : ",") + std::to_string(l);
    std::fprintf(stderr,
                 "load_hf_weights: skipped %lld tensors of layer(s) %s >= num_hidden_layers + "
                 "num_nextn_predict_layers = %lld (MTP modules the config does not have)\n",
                 static_cast<long long>(skipped_tensors), layers.c_str(), static_cast<long long>(L + D));
  }
  return loaded;
}

// ---- writing ---------------------------------------------------------------------------

std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(const torch::nn::Module& model) {
  // L = the number of main decoder layers: MTP module k becomes HF layer L + k.
  int64_t L = 0;
  std::set<int64_t> mtp_modules;
  for (const auto& item : model.named_parameters(true)) {
    const std::string& name = item.key();
    for (const char* top : {"layers.", "mtp."}) {
      size_t pos = std::string(top).size();
      int64_t i = -1;
      if (!starts_with(name, top) || !parse_index(name, &pos, &i)) continue;
      if (top[0] == 'l') L = std::max(L, i + 1);
      else mtp_modules.insert(i);
    }
  }
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::map<std::string, torch::Tensor> shared;
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    if (name == "embed.weight" || name == "head.weight") shared[name] = t.detach();
    if (!is_stacked_experts(name)) {
      out.emplace_back(hf_name_for(name, -1, L), t.detach());
      return;
    }
    const int64_t parts = expert_parts(name);
    for (int64_t e = 0; e < t.size(0); ++e) {
      const torch::Tensor row = t.detach().select(0, e);
      if (parts == 1) {
        out.emplace_back(hf_name_for(name, e, L), row);
        continue;
      }
      const int64_t rows = row.size(0) / parts;  // w13: gate_proj, then up_proj
      for (int64_t k = 0; k < parts; ++k) out.emplace_back(hf_name_for(name, e, L, k), row.narrow(0, k * rows, rows));
    }
  };
  for (const auto& item : model.named_parameters(true)) add(item.key(), item.value());
  for (const auto& item : model.named_buffers(true)) {
    if (is_router_bias(item.key())) add(item.key(), item.value());
  }
  // DeepSeek-V3's release stores the shared embedding and head again in each MTP layer.
  for (int64_t k : mtp_modules) {
    const std::string prefix = "model.layers." + std::to_string(L + k) + ".";
    for (const NamePair& p : kMtpSharedCopies) {
      auto it = shared.find(p.moetrain);
      // A copy of its own: safetensors writers refuse tensors that share memory.
      if (it != shared.end()) out.emplace_back(prefix + p.hf, it->second.clone());
    }
  }
  return out;
}

void save_hf_checkpoint(const std::string& dir, const torch::nn::Module& model, const ModelConfig& cfg) {
  fs::create_directories(dir);
  Json j = hf_config_to_json(cfg);
  const std::string cfg_path = (fs::path(dir) / "config.json").string();
  {
    std::ofstream out(cfg_path);
    out << j.dump(2) << "\n";
    if (!out) throw std::runtime_error(cfg_path + ": write failed");
  }
  write_safetensors((fs::path(dir) / "model.safetensors").string(), hf_state_dict(model), {{"format", "pt"}});
}

std::vector<std::string> write_hf_weights(const std::string& dir, const torch::nn::Module& model,
                                          torch::ScalarType dtype, int64_t max_shard_bytes) {
  if (max_shard_bytes < 1) throw std::invalid_argument("write_hf_weights: max_shard_bytes must be >= 1");
  if (!fs::is_directory(dir)) throw std::runtime_error("write_hf_weights: " + dir + " is not a directory");
  std::vector<std::pair<std::string, torch::Tensor>> tensors = hf_state_dict(model);
  // Cast first, so that shard sizes are those of the bytes written.
  for (auto& kv : tensors) {
    torch::Tensor& t = kv.second;
    // The router bias is added to sigmoid scores in [0, 1] to pick experts; bf16's
    // 8 mantissa bits would reorder close experts, so it stays fp32 (DeepSeek-V3's
    // release does the same).
    const bool keep_fp32 = ends_with(kv.first, ".mlp.gate.e_score_correction_bias");
    if (t.is_floating_point()) t = t.to(keep_fp32 ? torch::kFloat : dtype);
  }
  auto nbytes = [](const torch::Tensor& t) { return static_cast<int64_t>(t.numel() * t.element_size()); };

  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> shards(1);
  int64_t total = 0, current = 0;
  for (auto& kv : tensors) {
    const int64_t n = nbytes(kv.second);
    if (!shards.back().empty() && current + n > max_shard_bytes) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(std::move(kv));
    current += n;
    total += n;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors((fs::path(dir) / "model.safetensors").string(), shards[0], metadata);
    return {"model.safetensors"};
  }
  std::vector<std::string> files;
  Json weight_map = Json::object();
  const size_t n_shards = shards.size();
  for (size_t k = 0; k < n_shards; ++k) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", k + 1, n_shards);
    write_safetensors((fs::path(dir) / name).string(), shards[k], metadata);
    for (const auto& kv : shards[k]) weight_map[kv.first] = name;
    files.push_back(name);
  }
  Json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::ofstream out(index_path);
  out << index.dump(2) << "\n";
  out.close();
  if (!out) throw std::runtime_error(index_path + ": write failed");
  files.push_back("model.safetensors.index.json");
  return files;
}

int64_t parse_byte_size(const std::string& text) {
  auto fail = [&]() -> int64_t {
    throw std::invalid_argument("'" + text + "' is not a size (bytes, or a number with KB/MB/GB/KiB/MiB/GiB)");
  };
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    return fail();
  }
  std::string unit = text.substr(pos);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, double> kUnits = {
      {"", 1.0},         {"B", 1.0},           {"KB", 1e3},         {"MB", 1e6},        {"GB", 1e9},
      {"KIB", 1024.0},   {"MIB", 1048576.0},   {"GIB", 1073741824.0}};
  auto it = kUnits.find(unit);
  if (it == kUnits.end() || !(value > 0)) return fail();
  const double bytes = value * it->second;
  if (bytes < 1 || bytes > 9.0e18) return fail();
  return static_cast<int64_t>(bytes);
}

}  // namespace moetrain
