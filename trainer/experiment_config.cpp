#include "trainer/experiment_config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <tuple>

#include <fmt/format.h>

namespace moetrain {

bool BalanceConfig::has(const std::string& s) const {
  return std::find(strategy.begin(), strategy.end(), s) != strategy.end();
}

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Allowed range of a number: [lo, hi], or (lo, hi] when lo_open.
struct Range {
  double lo = -kInf;
  double hi = kInf;
  bool lo_open = false;
  std::string describe() const {
    if (lo == -kInf && hi == kInf) return "a finite number";
    if (hi == kInf) return fmt::format("a number {} {}", lo_open ? ">" : ">=", lo);
    return fmt::format("a number in {}{}, {}]", lo_open ? "(" : "[", lo, hi);
  }
  bool contains(double v) const { return (lo_open ? v > lo : v >= lo) && v <= hi; }
};
const Range kPositive{0.0, kInf, true};
const Range kNonNegative{0.0, kInf, false};
const Range kUnit{0.0, 1.0, false};

// ---------------------------------------------------------------------------
// The schema: every section and key, listed once. V is Binder (YAML → structs)
// or Dumper (structs → YAML).

template <class V>
void visit_model(V& v, ModelConfig& m) {
  v.integer("vocab_size", m.vocab_size, 2);
  v.integer("hidden_size", m.hidden_size, 1);
  v.integer("num_hidden_layers", m.num_hidden_layers, 1);
  v.integer("num_attention_heads", m.num_attention_heads, 1);
  v.integer("intermediate_size", m.intermediate_size, 1);
  v.integer("moe_intermediate_size", m.moe_intermediate_size, 1);
  v.integer("q_lora_rank", m.q_lora_rank, 0);
  v.integer("kv_lora_rank", m.kv_lora_rank, 1);
  v.integer("qk_nope_head_dim", m.qk_nope_head_dim, 1);
  v.integer("qk_rope_head_dim", m.qk_rope_head_dim, 1);
  v.integer("v_head_dim", m.v_head_dim, 1);
  v.integer("n_routed_experts", m.n_routed_experts, 1);
  v.integer("n_shared_experts", m.n_shared_experts, 0);
  v.integer("num_experts_per_tok", m.num_experts_per_tok, 1);
  v.integer("n_group", m.n_group, 1);
  v.integer("topk_group", m.topk_group, 1);
  v.real("routed_scaling_factor", m.routed_scaling_factor, kPositive);
  v.boolean("norm_topk_prob", m.norm_topk_prob);
  v.scoring("scoring_func", m.scoring_func);
  v.integer("first_k_dense_replace", m.first_k_dense_replace, 0);
  v.integer("num_nextn_predict_layers", m.num_nextn_predict_layers, 0);
  v.real("rope_theta", m.rope_theta, kPositive);
  std::string rope_type = "yarn";  // the only scaling type moetrain implements
  v.nullable_section("rope_scaling", m.rope_scaling.enabled, [&](V& s) {
    RopeScalingConfig& r = m.rope_scaling;
    s.choice("type", rope_type, {"yarn"});
    s.real("factor", r.factor, Range{1.0, kInf});
    s.integer("original_max_position_embeddings", r.original_max_position_embeddings, 1);
    s.real("beta_fast", r.beta_fast, kPositive);
    s.real("beta_slow", r.beta_slow, kPositive);
    s.real("mscale", r.mscale, kNonNegative);
    s.real("mscale_all_dim", r.mscale_all_dim, kNonNegative);
  });
  v.real("rms_norm_eps", m.rms_norm_eps, kPositive);
  v.real("init_std", m.init_std, kPositive);
  v.integer("max_position_embeddings", m.max_position_embeddings, 1);
}

template <class V>
void visit_config(V& v, ExperimentConfig& c) {
  v.section("model", [&](V& s) { visit_model(s, c.model); });
  v.section("balance", [&](V& s) {
    BalanceConfig& b = c.balance;
    s.str_list("strategy", b.strategy, {"loss_free", "aux_loss", "seq_aux_loss", "z_loss"});
    s.real("bias_update_rate", b.bias_update_rate, kNonNegative);
    s.choice("bias_update", b.bias_update, {"sign", "proportional"});
    s.boolean("bias_center", b.bias_center);
    s.opt_integer("bias_freeze_step", b.bias_freeze_step, 0);
    s.opt_integer("bias_freeze_tokens", b.bias_freeze_tokens, 0);
    s.real("aux_loss_coef", b.aux_loss_coef, kNonNegative);
    s.real("seq_aux_loss_coef", b.seq_aux_loss_coef, kNonNegative);
    s.real("z_loss_coef", b.z_loss_coef, kNonNegative);
  });
  v.section("optim", [&](V& s) {
    OptimConfig& o = c.optim;
    s.real("lr", o.lr, kPositive);
    s.real("min_lr", o.min_lr, kNonNegative);
    s.real_list("betas", o.betas, Range{0.0, 1.0});
    s.real("weight_decay", o.weight_decay, kNonNegative);
    s.real("eps", o.eps, kPositive);
    s.real("grad_clip", o.grad_clip, kNonNegative);
    s.choice("schedule", o.schedule, {"cosine", "constant", "multistep"});
    s.integer("warmup_steps", o.warmup_steps, 0);
    s.int_list("milestones", o.milestones, 1);
    s.real("multistep_factor", o.multistep_factor, Range{0.0, 1.0, true});
    s.choice("moment_dtype", o.moment_dtype, {"fp32", "bf16"});
    s.choice("master_storage", o.master_storage, {"fp32", "split"});
  });
  v.section("train", [&](V& s) {
    TrainConfig& t = c.train;
    s.integer("steps", t.steps, 1);
    s.integer("global_batch", t.global_batch, 1);
    s.integer("micro_batch", t.micro_batch, 1);
    s.integer("seq_len", t.seq_len, 1);
    s.integer("seed", t.seed, 0);
    s.choice("device", t.device, {"cpu", "cuda"});
    s.choice("dtype", t.dtype, {"fp32", "bf16"});
    s.choice("param_dtype", t.param_dtype, {"fp32", "bf16"});
    s.choice("logits_dtype", t.logits_dtype, {"fp32", "bf16"});
    s.choice("activation_checkpointing", t.activation_checkpointing, {"none", "full"});
    s.boolean("cuda_graph", t.cuda_graph);
    s.integer("eval_every", t.eval_every, 0);
    s.integer("eval_batches", t.eval_batches, 1);
    s.real("mtp_loss_weight", t.mtp_loss_weight, kNonNegative);
    s.opt_integer("mtp_loss_weight_switch_step", t.mtp_loss_weight_switch_step, 1);
    s.real("mtp_loss_weight_after", t.mtp_loss_weight_after, kNonNegative);
    s.integer("threads", t.threads, 0);
  });
  v.section("data", [&](V& s) {
    DataConfig& d = c.data;
    s.str("dir", d.dir);
    s.str_list("sources", d.sources, {});
    s.str_list("exclude", d.exclude, {});
    s.choice("tokenizer", d.tokenizer, {"byte", "sentencepiece"});
    s.real("val_fraction", d.val_fraction, Range{0.0, 0.5, true});
    s.str("doc_separator", d.doc_separator);
    s.integer("input_sentence_size", d.input_sentence_size, 1000);
  });
  v.section("checkpoint", [&](V& s) {
    CheckpointConfig& k = c.checkpoint;
    s.str("dir", k.dir);
    s.integer("every", k.every, 0);
    s.integer("keep_last", k.keep_last, 2);
    s.choice("nonfinite_policy", k.nonfinite_policy, {"skip", "abort"});
    s.integer("max_consecutive_skips", k.max_consecutive_skips, 1);
    s.real("spike_factor", k.spike_factor, Range{1.0, kInf, true});
  });
  v.section("logging", [&](V& s) {
    s.str("dir", c.logging.dir);
    s.integer("every", c.logging.every, 1);
  });
  v.section("distributed", [&](V& s) {
    DistributedConfig& d = c.distributed;
    s.choice("backend", d.backend, {"auto", "nccl", "gloo"});
    s.integer("ep_size", d.ep_size, 1);
    s.integer("timeout_s", d.timeout_s, 1);
    s.integer("zero_stage", d.zero_stage, 0, 1);
    s.boolean("overlap_grad_reduce", d.overlap_grad_reduce);
    s.integer("bucket_mb", d.bucket_mb, 1);
  });
}

std::string did_you_mean(const std::string& key, const std::vector<std::string>& known) {
  std::string best;
  int best_d = std::numeric_limits<int>::max();
  for (const auto& k : known) {
    int d = edit_distance(key, k);
    if (d < best_d) best_d = d, best = k;
  }
  int limit = std::max<int>(2, static_cast<int>(key.size()) / 3);
  if (best.empty() || best_d > limit) return "";
  return fmt::format(" (did you mean '{}'?)", best);
}

std::string quote(const ConfigNode& n) {
  if (n.kind == ConfigNode::Kind::kScalar) return fmt::format("'{}'", n.scalar);
  return n.kind_name();
}

// ---------------------------------------------------------------------------
// Binder: ConfigNode → structs, collecting every error.

class Binder {
 public:
  Binder(const ConfigNode* node, std::string prefix, std::vector<ConfigError>* errors,
         std::map<std::string, SourceLoc>* locs, SourceLoc fallback)
      : node_(node), prefix_(std::move(prefix)), errors_(errors), locs_(locs), fallback_(std::move(fallback)) {}

  // After visiting: every key nobody asked for is an unknown key.
  void finish() {
    if (!node_) return;
    for (size_t i = 0; i < node_->map.size(); ++i) {
      const std::string& k = node_->map[i].first;
      if (std::find(known_.begin(), known_.end(), k) != known_.end()) continue;
      std::string what = prefix_.empty() ? "unknown section" : "unknown key";
      error(node_->key_locs[i], path(k), what + did_you_mean(k, known_));
    }
  }

  void section(const std::string& key, const std::function<void(Binder&)>& fn) {
    const ConfigNode* n = lookup(key);
    if (n && n->kind != ConfigNode::Kind::kMap && !n->is_null()) {
      error(n->loc, path(key), fmt::format("expected a map of keys, found {}", n->kind_name()));
      n = nullptr;
    }
    if (n && n->is_null()) n = nullptr;
    Binder child(n, path(key), errors_, locs_, n ? n->loc : fallback_);
    fn(child);
    child.finish();
  }

  void nullable_section(const std::string& key, bool& enabled, const std::function<void(Binder&)>& fn) {
    const ConfigNode* n = lookup(key);
    if (!n) return;
    if (n->is_null()) {
      enabled = false;
      return;
    }
    enabled = true;
    section(key, fn);
  }

  void integer(const std::string& key, int64_t& out, int64_t min, int64_t max = kIntMax) {
    const ConfigNode* n = scalar_or_error(key, "an integer");
    if (!n) return;
    auto v = parse_int(n->scalar);
    if (!v || n->quoted) return error(n->loc, path(key), fmt::format("expected an integer, found {}", quote(*n)));
    if (*v < min || *v > max) {
      std::string range = max == kIntMax ? fmt::format(">= {}", min) : fmt::format("in [{}, {}]", min, max);
      return error(n->loc, path(key), fmt::format("expected an integer {}, found {}", range, *v));
    }
    out = *v;
  }

  void opt_integer(const std::string& key, std::optional<int64_t>& out, int64_t min) {
    const ConfigNode* n = lookup(key);
    if (n && n->is_null()) {
      out.reset();
      return;
    }
    int64_t v = out.value_or(0);
    size_t before = errors_->size();
    integer(key, v, min);
    if (n && errors_->size() == before) out = v;
  }

  void real(const std::string& key, double& out, const Range& range) {
    const ConfigNode* n = scalar_or_error(key, range.describe());
    if (!n) return;
    auto v = n->quoted ? std::nullopt : parse_real(n->scalar);
    if (!v) return error(n->loc, path(key), fmt::format("expected {}, found {}", range.describe(), quote(*n)));
    if (!std::isfinite(*v))
      return error(n->loc, path(key), fmt::format("expected a finite number, found {}", quote(*n)));
    if (!range.contains(*v))
      return error(n->loc, path(key), fmt::format("expected {}, found {}", range.describe(), n->scalar));
    out = *v;
  }

  void boolean(const std::string& key, bool& out) {
    const ConfigNode* n = scalar_or_error(key, "true or false");
    if (!n) return;
    const std::string& s = n->scalar;
    if (!n->quoted && (s == "true" || s == "True" || s == "TRUE")) out = true;
    else if (!n->quoted && (s == "false" || s == "False" || s == "FALSE")) out = false;
    else error(n->loc, path(key), fmt::format("expected true or false, found {}", quote(*n)));
  }

  void str(const std::string& key, std::string& out) {
    const ConfigNode* n = lookup(key);
    if (!n) return;
    if (n->is_null()) {
      out.clear();
      return;
    }
    if (n->kind != ConfigNode::Kind::kScalar)
      return error(n->loc, path(key), fmt::format("expected a string, found {}", n->kind_name()));
    out = n->scalar;
  }

  void choice(const std::string& key, std::string& out, const std::vector<std::string>& choices) {
    const ConfigNode* n = scalar_or_error(key, "one of " + join(choices));
    if (!n) return;
    if (std::find(choices.begin(), choices.end(), n->scalar) == choices.end())
      return error(n->loc, path(key), fmt::format("expected one of {}, found {}{}", join(choices), quote(*n),
                                                  did_you_mean(n->scalar, choices)));
    out = n->scalar;
  }

  void scoring(const std::string& key, ScoringFunc& out) {
    std::string s = scoring_func_name(out);
    choice(key, s, {"sigmoid", "softmax"});
    out = s == "sigmoid" ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax;
  }

  void str_list(const std::string& key, std::vector<std::string>& out, const std::vector<std::string>& choices) {
    std::vector<const ConfigNode*> items;
    std::vector<std::string> values;
    const ConfigNode* n = list_items(key, items, values);
    if (!n) return;
    std::vector<std::string> result;
    for (size_t i = 0; i < values.size(); ++i) {
      const SourceLoc& at = items[i] ? items[i]->loc : n->loc;
      if (items[i] && items[i]->kind != ConfigNode::Kind::kScalar) {
        error(at, fmt::format("{}[{}]", path(key), i), fmt::format("expected a string, found {}", items[i]->kind_name()));
        continue;
      }
      if (!choices.empty() && std::find(choices.begin(), choices.end(), values[i]) == choices.end()) {
        error(at, fmt::format("{}[{}]", path(key), i),
              fmt::format("expected one of {}, found '{}'{}", join(choices), values[i], did_you_mean(values[i], choices)));
        continue;
      }
      result.push_back(values[i]);
    }
    out = result;
  }

  void real_list(const std::string& key, std::vector<double>& out, const Range& range) {
    std::vector<const ConfigNode*> items;
    std::vector<std::string> values;
    const ConfigNode* n = list_items(key, items, values);
    if (!n) return;
    std::vector<double> result;
    for (size_t i = 0; i < values.size(); ++i) {
      auto v = parse_real(values[i]);
      const SourceLoc& at = items[i] ? items[i]->loc : n->loc;
      if (!v || !std::isfinite(*v) || !range.contains(*v)) {
        error(at, fmt::format("{}[{}]", path(key), i), fmt::format("expected {}, found '{}'", range.describe(), values[i]));
        continue;
      }
      result.push_back(*v);
    }
    out = result;
  }

  void int_list(const std::string& key, std::vector<int64_t>& out, int64_t min) {
    std::vector<const ConfigNode*> items;
    std::vector<std::string> values;
    const ConfigNode* n = list_items(key, items, values);
    if (!n) return;
    std::vector<int64_t> result;
    for (size_t i = 0; i < values.size(); ++i) {
      auto v = parse_int(values[i]);
      const SourceLoc& at = items[i] ? items[i]->loc : n->loc;
      if (!v || *v < min) {
        error(at, fmt::format("{}[{}]", path(key), i), fmt::format("expected an integer >= {}, found '{}'", min, values[i]));
        continue;
      }
      result.push_back(*v);
    }
    out = result;
  }

 private:
  std::string path(const std::string& key) const { return prefix_.empty() ? key : prefix_ + "." + key; }

  const ConfigNode* lookup(const std::string& key) {
    known_.push_back(key);
    locs_->erase(path(key));  // absent keys keep their default and have no location
    if (!node_) return nullptr;
    const ConfigNode* n = node_->find(key);
    if (n) (*locs_)[path(key)] = n->loc;
    return n;
  }

  const ConfigNode* scalar_or_error(const std::string& key, const std::string& expected) {
    const ConfigNode* n = lookup(key);
    if (!n) return nullptr;
    if (n->kind != ConfigNode::Kind::kScalar) {
      error(n->loc, path(key), fmt::format("expected {}, found {}", expected, n->kind_name()));
      return nullptr;
    }
    return n;
  }

  // A YAML list, or (from --set) a scalar "a,b" split on commas; "" and "[]" are empty.
  const ConfigNode* list_items(const std::string& key, std::vector<const ConfigNode*>& items,
                               std::vector<std::string>& values) {
    const ConfigNode* n = lookup(key);
    if (!n) return nullptr;
    if (n->kind == ConfigNode::Kind::kSeq) {
      for (const auto& item : n->seq) {
        items.push_back(&item);
        values.push_back(item.kind == ConfigNode::Kind::kScalar ? item.scalar : "");
      }
      return n;
    }
    if (n->kind == ConfigNode::Kind::kScalar && n->from_override) {
      std::string s = n->scalar;
      if (s == "[]" || s.empty()) return n;
      if (s.front() == '[' && s.back() == ']') s = s.substr(1, s.size() - 2);
      size_t start = 0;
      while (true) {
        size_t comma = s.find(',', start);
        std::string part = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        part.erase(0, part.find_first_not_of(' '));
        part.erase(part.find_last_not_of(' ') + 1);
        items.push_back(nullptr);
        values.push_back(part);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      return n;
    }
    error(n->loc, path(key), fmt::format("expected a list, found {}", n->is_null() ? "null" : quote(*n)));
    return nullptr;
  }

  static std::optional<int64_t> parse_int(const std::string& s) {
    // YAML 1.2 core decimal integers: no leading zeros (yaml-cpp would read 010 as 8), no hex.
    size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
    if (i >= s.size()) return std::nullopt;
    for (size_t j = i; j < s.size(); ++j)
      if (s[j] < '0' || s[j] > '9') return std::nullopt;
    if (s[i] == '0' && s.size() > i + 1) return std::nullopt;
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (errno == ERANGE || *end != '\0') return std::nullopt;
    return static_cast<int64_t>(v);
  }

  static std::optional<double> parse_real(const std::string& s) {
    if (s == ".nan" || s == ".NaN" || s == ".NAN") return std::nan("");
    if (s == ".inf" || s == ".Inf" || s == ".INF" || s == "+.inf" || s == "+.Inf") return kInf;
    if (s == "-.inf" || s == "-.Inf" || s == "-.INF") return -kInf;
    if (s.empty() || s.find_first_of("xXpP_ ") != std::string::npos) return std::nullopt;
    errno = 0;
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (*end != '\0' || errno == ERANGE) return std::nullopt;
    return v;
  }

  static std::string join(const std::vector<std::string>& items) {
    std::string out;
    for (const auto& s : items) out += (out.empty() ? "" : "|") + s;
    return out;
  }

  void error(const SourceLoc& loc, const std::string& p, const std::string& msg) { errors_->push_back({loc, p, msg}); }

  const ConfigNode* node_;
  std::string prefix_;
  std::vector<ConfigError>* errors_;
  std::map<std::string, SourceLoc>* locs_;
  SourceLoc fallback_;
  std::vector<std::string> known_;
};

// ---------------------------------------------------------------------------
// Dumper: structs → YAML text (re-readable by the Binder).

class Dumper {
 public:
  explicit Dumper(int indent = 0) : indent_(indent) {}
  std::string out;

  void section(const std::string& key, const std::function<void(Dumper&)>& fn) {
    line(key + ":");
    Dumper child(indent_ + 2);
    fn(child);
    out += child.out;
  }
  void nullable_section(const std::string& key, bool& enabled, const std::function<void(Dumper&)>& fn) {
    if (!enabled) return line(key + ": null");
    section(key, fn);
  }
  void integer(const std::string& key, int64_t& v, int64_t = 0, int64_t = 0) { line(fmt::format("{}: {}", key, v)); }
  void opt_integer(const std::string& key, std::optional<int64_t>& v, int64_t) {
    line(v ? fmt::format("{}: {}", key, *v) : key + ": null");
  }
  void real(const std::string& key, double& v, const Range&) { line(fmt::format("{}: {}", key, real_text(v))); }
  void boolean(const std::string& key, bool& v) { line(fmt::format("{}: {}", key, v ? "true" : "false")); }
  void str(const std::string& key, std::string& v) { line(fmt::format("{}: {}", key, quoted(v))); }
  void choice(const std::string& key, std::string& v, const std::vector<std::string>&) { line(key + ": " + v); }
  void scoring(const std::string& key, ScoringFunc& f) { line(fmt::format("{}: {}", key, scoring_func_name(f))); }
  void str_list(const std::string& key, std::vector<std::string>& v, const std::vector<std::string>&) {
    std::string items;
    for (const auto& s : v) items += (items.empty() ? "" : ", ") + quoted(s);
    line(fmt::format("{}: [{}]", key, items));
  }
  void real_list(const std::string& key, std::vector<double>& v, const Range&) {
    std::string items;
    for (double d : v) items += (items.empty() ? "" : ", ") + real_text(d);
    line(fmt::format("{}: [{}]", key, items));
  }
  void int_list(const std::string& key, std::vector<int64_t>& v, int64_t) {
    std::string items;
    for (int64_t d : v) items += (items.empty() ? "" : ", ") + std::to_string(d);
    line(fmt::format("{}: [{}]", key, items));
  }

 private:
  static std::string real_text(double v) {
    std::string s = fmt::format("{}", v);
    // Keep floats recognisable as floats (1 → 1.0) for readers of the YAML.
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    return s;
  }
  static std::string quoted(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      if (c == '\n') {
        out += "\\n";
        continue;
      }
      out += c;
    }
    return out + "\"";
  }
  void line(const std::string& s) { out += std::string(indent_, ' ') + s + "\n"; }
  int indent_;
};

}  // namespace

std::vector<std::pair<std::string, std::string>> validate_config(const ExperimentConfig& c) {
  std::vector<std::pair<std::string, std::string>> e;
  const ModelConfig& m = c.model;
  auto rule = [&](bool ok, const std::string& key, const std::string& msg) {
    if (!ok) e.emplace_back(key, msg);
  };
  rule(m.num_experts_per_tok <= m.n_routed_experts, "model.num_experts_per_tok",
       fmt::format("num_experts_per_tok ({}) must be <= n_routed_experts ({})", m.num_experts_per_tok, m.n_routed_experts));
  rule(m.n_routed_experts % m.n_group == 0, "model.n_group",
       fmt::format("n_routed_experts ({}) must be divisible by n_group ({})", m.n_routed_experts, m.n_group));
  rule(m.topk_group <= m.n_group, "model.topk_group",
       fmt::format("topk_group ({}) must be <= n_group ({})", m.topk_group, m.n_group));
  if (m.n_group > 1 && m.n_routed_experts % m.n_group == 0 && m.topk_group <= m.n_group) {
    int64_t per_group = m.n_routed_experts / m.n_group;
    rule(per_group >= 2, "model.n_group",
         fmt::format("group-limited routing scores a group by its top-2 experts; n_routed_experts / n_group = {} < 2", per_group));
    rule(m.num_experts_per_tok <= m.topk_group * per_group, "model.num_experts_per_tok",
         fmt::format("num_experts_per_tok ({}) exceeds the experts in the kept groups (topk_group {} × {} per group)",
                     m.num_experts_per_tok, m.topk_group, per_group));
  }
  rule(m.qk_rope_head_dim % 2 == 0, "model.qk_rope_head_dim",
       fmt::format("RoPE rotates pairs of dimensions; qk_rope_head_dim ({}) must be even", m.qk_rope_head_dim));
  rule(m.first_k_dense_replace <= m.num_hidden_layers, "model.first_k_dense_replace",
       fmt::format("first_k_dense_replace ({}) must be <= num_hidden_layers ({})", m.first_k_dense_replace, m.num_hidden_layers));
  if (m.rope_scaling.enabled)
    rule(m.rope_scaling.original_max_position_embeddings <= m.max_position_embeddings, "model.rope_scaling.original_max_position_embeddings",
         "original_max_position_embeddings must be <= max_position_embeddings");

  const TrainConfig& t = c.train;
  const OptimConfig& o = c.optim;
  rule(o.warmup_steps <= t.steps, "optim.warmup_steps",
       fmt::format("warmup_steps ({}) must be <= train.steps ({})", o.warmup_steps, t.steps));
  rule(o.min_lr <= o.lr, "optim.min_lr", fmt::format("min_lr ({}) must be <= lr ({})", o.min_lr, o.lr));
  rule(o.betas.size() == 2, "optim.betas", fmt::format("expected two values [beta1, beta2], found {}", o.betas.size()));
  if (o.betas.size() == 2) rule(o.betas[0] < 1.0 && o.betas[1] < 1.0, "optim.betas", "betas must be < 1");
  if (o.schedule == "multistep") {
    rule(!o.milestones.empty(), "optim.milestones", "schedule multistep needs at least one milestone");
    for (size_t i = 0; i < o.milestones.size(); ++i) {
      rule(o.milestones[i] <= t.steps, "optim.milestones", fmt::format("milestone {} is past train.steps ({})", o.milestones[i], t.steps));
      if (i > 0) rule(o.milestones[i] > o.milestones[i - 1], "optim.milestones", "milestones must increase");
    }
  }
  rule(t.global_batch % t.micro_batch == 0, "train.global_batch",
       fmt::format("global_batch ({}) must be divisible by micro_batch ({})", t.global_batch, t.micro_batch));
  rule(t.micro_batch <= t.global_batch, "train.micro_batch",
       fmt::format("micro_batch ({}) must be <= global_batch ({})", t.micro_batch, t.global_batch));
  rule(t.seq_len <= m.max_position_embeddings, "train.seq_len",
       fmt::format("seq_len ({}) must be <= model.max_position_embeddings ({})", t.seq_len, m.max_position_embeddings));
  rule(!(t.dtype == "bf16" && t.device == "cpu"), "train.dtype",
       "bf16 autocast is for device cuda; CPU training runs in fp32");
  rule(!(t.param_dtype == "bf16" && t.dtype != "bf16"), "train.param_dtype",
       "bf16 weights need bf16 compute: set train.dtype: bf16 (device cuda)");
  rule(!(t.logits_dtype == "bf16" && t.dtype != "bf16"), "train.logits_dtype",
       "bf16 logits come from the bf16 head GEMM: set train.dtype: bf16 (device cuda)");
  rule(!(o.master_storage == "split" && (t.param_dtype != "bf16" || c.distributed.zero_stage > 0)),
       "optim.master_storage",
       "split masters are for bf16-stored weights with the replicated optimizer: set train.param_dtype: bf16, "
       "distributed.zero_stage: 0");
  rule(!(o.moment_dtype == "bf16" && t.param_dtype != "bf16"), "optim.moment_dtype",
       "bf16 moments are kept for bf16-stored weights: set train.param_dtype: bf16");
  rule(!(t.cuda_graph && t.device != "cuda"), "train.cuda_graph", "CUDA graphs need train.device: cuda");
  rule(!(t.cuda_graph && (c.distributed.ep_size > 1 || c.distributed.zero_stage > 0)), "train.cuda_graph",
       "CUDA graphs are for one process with the replicated optimizer: set distributed.ep_size 1, zero_stage 0");
  rule(t.seq_len > m.num_nextn_predict_layers, "train.seq_len",
       fmt::format("multi-token prediction needs seq_len ({}) > model.num_nextn_predict_layers ({})", t.seq_len,
                   m.num_nextn_predict_layers));

  const BalanceConfig& b = c.balance;
  std::set<std::string> seen(b.strategy.begin(), b.strategy.end());
  rule(seen.size() == b.strategy.size(), "balance.strategy", "a strategy is listed twice");
  rule(!(b.bias_freeze_step && b.bias_freeze_tokens), "balance.bias_freeze_step",
       "set bias_freeze_step or bias_freeze_tokens, not both");

  rule(m.n_routed_experts % c.distributed.ep_size == 0, "distributed.ep_size",
       fmt::format("n_routed_experts ({}) must be divisible by ep_size ({})", m.n_routed_experts, c.distributed.ep_size));
  rule(!(c.distributed.zero_stage == 1 && c.distributed.ep_size > 1), "distributed.zero_stage",
       fmt::format("zero_stage 1 (ZeRO-1) cannot be combined with expert parallelism (ep_size {}) yet: "
                   "set zero_stage 0 or ep_size 1",
                   c.distributed.ep_size));
  return e;
}

ExperimentConfig bind_experiment_config(const ConfigNode& root) {
  ExperimentConfig cfg;
  std::vector<ConfigError> errors;
  std::map<std::string, SourceLoc> locs;
  Binder top(&root, "", &errors, &locs, root.loc);
  visit_config(top, cfg);
  top.finish();
  if (errors.empty()) {
    for (auto& [key, msg] : validate_config(cfg)) {
      auto it = locs.find(key);
      if (it != locs.end()) {
        errors.push_back({it->second, key, msg});
      } else {
        errors.push_back({SourceLoc{root.loc.file, 0, 0}, key, msg + " (the key is not set: its default applies)"});
      }
    }
  }
  if (!errors.empty()) {
    std::stable_sort(errors.begin(), errors.end(), [](const ConfigError& a, const ConfigError& b) {
      return std::tie(a.loc.file, a.loc.line, a.loc.col) < std::tie(b.loc.file, b.loc.line, b.loc.col);
    });
    throw ConfigErrors(std::move(errors));
  }
  return cfg;
}

ExperimentConfig load_experiment_config(const std::string& path, const std::vector<std::string>& overrides) {
  ConfigNode root = load_config_tree(path);
  std::vector<ConfigError> errors;
  for (size_t i = 0; i < overrides.size(); ++i) {
    try {
      apply_set_override(root, overrides[i], static_cast<int>(i));
    } catch (const ConfigErrors& e) {
      errors.insert(errors.end(), e.errors().begin(), e.errors().end());
    }
  }
  if (!errors.empty()) throw ConfigErrors(std::move(errors));
  return bind_experiment_config(root);
}

double mtp_loss_weight_at(const TrainConfig& t, int64_t step) {
  if (t.mtp_loss_weight_switch_step && step >= *t.mtp_loss_weight_switch_step) return t.mtp_loss_weight_after;
  return t.mtp_loss_weight;
}

std::string config_to_yaml(const ExperimentConfig& cfg) {
  ExperimentConfig copy = cfg;
  Dumper d;
  visit_config(d, copy);
  return d.out;
}

std::string config_hash(const ExperimentConfig& cfg) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char ch : config_to_yaml(cfg)) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return fmt::format("{:016x}", h);
}

}  // namespace moetrain
