// moetrain export CHECKPOINT --format hf --out DIR: a training checkpoint
// (step-XXXXXXXX/ with model.safetensors + config.yaml, or the checkpoint root
// whose `latest` names one) -> a Hugging Face DeepseekV3 directory that
// transformers' AutoModelForCausalLM.from_pretrained loads: config.json,
// generation_config.json, model.safetensors (or shards + index) and, for a
// SentencePiece experiment, a copy of tokenizer.model.
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "io/hf.h"
#include "io/safetensors.h"
#include "models/transformer.h"
#include "trainer/experiment_config.h"

namespace moetrain {

namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// The version transformers stamps into what save_pretrained writes; the export is
// checked against this one (tests/test_export.cpp).
constexpr const char* kTransformersVersion = "5.17.0";

// Special-token ids of moetrain's tokenizers (data/tokenizer.h: fixed layout).
constexpr int64_t kByteEos = 256;
constexpr int64_t kSpBos = 1, kSpEos = 2;

// Not fs::remove_all: the torch 2.11 wheel's libtorch.so exports its own
// std::filesystem::remove_all, which the dynamic linker may bind to and which
// crashes (see tests/test_hf_parity.cpp). Plain remove() and iteration are fine.
void remove_tree(const fs::path& p) {
  std::error_code ec;
  if (fs::is_directory(fs::symlink_status(p, ec))) {
    for (const auto& entry : fs::directory_iterator(p, ec)) remove_tree(entry.path());
  }
  fs::remove(p, ec);
}

// CHECKPOINT is a step directory (has model.safetensors) or a checkpoint root whose
// `latest` file names the newest complete step directory.
fs::path resolve_checkpoint(const std::string& arg) {
  const fs::path p(arg);
  if (!fs::is_directory(p)) throw UsageError(fmt::format("moetrain export: '{}' is not a directory", arg));
  if (fs::exists(p / "model.safetensors")) return p;
  const fs::path latest = p / "latest";
  if (!fs::is_regular_file(latest))
    throw UsageError(fmt::format("moetrain export: '{}' has neither model.safetensors (a step directory) nor a "
                                 "'latest' file (a checkpoint root)",
                                 arg));
  std::ifstream in(latest);
  std::string name;
  std::getline(in, name);
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  if (name.empty()) throw UsageError(fmt::format("moetrain export: {} is empty", latest.string()));
  const fs::path step = fs::path(name).is_absolute() ? fs::path(name) : p / name;
  if (!fs::exists(step / "model.safetensors"))
    throw UsageError(fmt::format("moetrain export: {} names '{}', which has no model.safetensors", latest.string(),
                                 name));
  return step;
}

std::string shape_str(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + "]";
}

// Strict load: the file's tensor set must be exactly the module's parameters and
// buffers, with equal shapes. Checked on the header before any data is read, so
// a bad checkpoint fails before the output directory exists.
void load_checkpoint_weights(const fs::path& file, torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> dests;
  for (const auto& item : model.named_parameters(true)) dests[item.key()] = item.value();
  for (const auto& item : model.named_buffers(true)) dests[item.key()] = item.value();

  const SafetensorsHeader header = read_safetensors_header(file.string());
  std::set<std::string> found;
  std::vector<std::string> problems;
  for (const StTensorInfo& info : header.tensors) {
    found.insert(info.name);
    auto it = dests.find(info.name);
    if (it == dests.end()) {
      problems.push_back(fmt::format("unexpected tensor '{}' (not in the model built from config.yaml)", info.name));
      continue;
    }
    const std::vector<int64_t> expected = it->second.sizes().vec();
    if (info.shape != expected)
      problems.push_back(fmt::format("tensor '{}' has shape {}, the model expects {}", info.name,
                                     shape_str(info.shape), shape_str(expected)));
  }
  for (const auto& kv : dests)
    if (!found.count(kv.first)) problems.push_back(fmt::format("missing tensor '{}'", kv.first));
  if (!problems.empty()) {
    std::string msg = fmt::format("{}: does not match the model of its config.yaml:", file.string());
    for (size_t k = 0; k < problems.size() && k < 10; ++k) msg += "\n  " + problems[k];
    if (problems.size() > 10) msg += fmt::format("\n  ... ({} problems)", problems.size());
    throw std::runtime_error(msg);
  }
  const SafetensorsFile f = read_safetensors(file.string());
  torch::NoGradGuard no_grad;
  for (const auto& kv : f.tensors) dests.at(kv.first).copy_(kv.second);
}

void write_json(const fs::path& path, const Json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) throw std::runtime_error(path.string() + ": write failed");
}

bool dir_nonempty(const fs::path& p) {
  std::error_code ec;
  return fs::directory_iterator(p, ec) != fs::directory_iterator();
}

// What the exported tokenizer is, from the experiment's data section.
struct TokenizerExport {
  std::string kind;       // "sentencepiece" | "byte"
  fs::path model_file;    // sentencepiece: data.dir/tokenizer.model when present
  Json bos = nullptr, eos = nullptr;
};

TokenizerExport describe_tokenizer(const ExperimentConfig& exp) {
  TokenizerExport t;
  if (exp.data.tokenizer == "sentencepiece") {
    t.kind = "sentencepiece";
    const fs::path sp = fs::path(exp.data.dir) / "tokenizer.model";
    if (fs::is_regular_file(sp)) t.model_file = sp;
    t.bos = kSpBos;
    t.eos = kSpEos;
  } else {
    // The byte tokenizer has no bos; its eos (256) only exists when the vocabulary
    // reaches it.
    t.kind = "byte";
    if (exp.model.vocab_size > kByteEos) t.eos = kByteEos;
  }
  return t;
}

}  // namespace

int cmd_export(int argc, char** argv) {
  ArgParser args(
      "export", "CHECKPOINT --format hf --out DIR [--dtype fp32|bf16] [--max-shard-size SIZE] [--force]",
      "Convert a training checkpoint into a Hugging Face DeepseekV3 directory that transformers loads\n"
      "with AutoModelForCausalLM.from_pretrained(DIR).\n"
      "CHECKPOINT is a step directory (step-XXXXXXXX/ with model.safetensors and config.yaml) or a\n"
      "checkpoint root whose 'latest' file names one. model.safetensors must hold exactly the tensors\n"
      "of the model that config.yaml describes (names and shapes), else nothing is written.\n"
      "DIR gets config.json, generation_config.json and model.safetensors, or\n"
      "model-0000k-of-0000n.safetensors + model.safetensors.index.json when the weights exceed\n"
      "--max-shard-size. The router biases (mlp.gate.e_score_correction_bias) stay fp32 with --dtype bf16.\n"
      "Tokenizer: with a SentencePiece tokenizer (data.dir/tokenizer.model) DIR also gets a copy of\n"
      "tokenizer.model (unk 0, bos 1, eos 2; identity normalization, no dummy prefix, byte fallback) but\n"
      "no tokenizer_config.json / tokenizer.json yet: transformers 5.17 cannot convert it without the\n"
      "sentencepiece package, so load it with sentencepiece directly. The byte tokenizer has no\n"
      "transformers equivalent: nothing is written for it (ids 0..255 are the bytes, eos 256), and a\n"
      "notice says so.\n"
      "The output is written into DIR.tmp-<pid> and renamed to DIR at the end; an existing non-empty\n"
      "DIR is refused unless --force (then it is replaced).");
  args.positional("CHECKPOINT", "step directory or checkpoint root");
  args.option("format", "FMT", "output format (only hf)", "hf");
  args.option("out", "DIR", "output directory");
  args.option("dtype", "DTYPE", "fp32 or bf16 (weights; router biases stay fp32)", "fp32");
  args.option("max-shard-size", "SIZE", "largest shard: bytes or with KB/MB/GB (decimal) or KiB/MiB/GiB", "5GB");
  args.flag("force", "replace an existing non-empty DIR");
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    if (args.get("format") != "hf")
      throw UsageError(fmt::format("moetrain export: --format '{}' is not supported (only hf)", args.get("format")));
    if (!args.given("out")) throw UsageError("moetrain export: --out DIR is required");
    const std::string dtype_name = args.get("dtype");
    if (dtype_name != "fp32" && dtype_name != "bf16")
      throw UsageError(fmt::format("moetrain export: --dtype '{}' (expected fp32 or bf16)", dtype_name));
    const torch::ScalarType dtype = dtype_name == "bf16" ? torch::kBFloat16 : torch::kFloat;
    int64_t max_shard = 0;
    try {
      max_shard = parse_byte_size(args.get("max-shard-size"));
    } catch (const std::invalid_argument& e) {
      throw UsageError(fmt::format("moetrain export: --max-shard-size: {}", e.what()));
    }
    fs::path out = fs::path(args.get("out"));
    while (out.has_parent_path() && !out.has_filename()) out = out.parent_path();  // "dir/" -> "dir"
    if (fs::exists(out) && !fs::is_directory(out))
      throw UsageError(fmt::format("moetrain export: --out {} exists and is not a directory", out.string()));
    const bool replace = fs::exists(out) && dir_nonempty(out);
    if (replace && !args.has("force"))
      throw UsageError(fmt::format("moetrain export: {} exists and is not empty (use --force to replace it)",
                                   out.string()));

    const fs::path step = resolve_checkpoint(args.pos(0));
    const fs::path cfg_path = step / "config.yaml";
    if (!fs::is_regular_file(cfg_path))
      throw UsageError(fmt::format("moetrain export: {} is missing", cfg_path.string()));
    const ExperimentConfig exp = load_experiment_config(cfg_path.string());
    const ModelConfig& mcfg = exp.model;
    Json config = hf_config_to_json(mcfg);  // throws for what transformers cannot express, before any work

    Transformer model(mcfg);
    load_checkpoint_weights(step / "model.safetensors", *model);
    if (mcfg.num_nextn_predict_layers > 0)
      std::fprintf(stderr, "moetrain export: note: num_nextn_predict_layers = %lld, but moetrain has no MTP "
                           "modules yet; none are exported\n",
                   static_cast<long long>(mcfg.num_nextn_predict_layers));

    const TokenizerExport tok = describe_tokenizer(exp);
    config["bos_token_id"] = tok.bos;
    config["eos_token_id"] = tok.eos;
    config["pad_token_id"] = nullptr;
    config["dtype"] = dtype_name == "bf16" ? "bfloat16" : "float32";  // what save_pretrained (5.x) records
    config["transformers_version"] = kTransformersVersion;
    Json generation = {{"_from_model_config", true},
                       {"bos_token_id", tok.bos},
                       {"eos_token_id", tok.eos},
                       {"transformers_version", kTransformersVersion}};

    // Everything goes into a sibling temp dir first, so an interrupted export
    // never leaves a half-written DIR that from_pretrained would half-load.
    const fs::path tmp = fs::path(out.string() + ".tmp-" + std::to_string(::getpid()));
    remove_tree(tmp);
    fs::create_directories(tmp);
    std::vector<std::string> files;
    try {
      write_json(tmp / "config.json", config);
      write_json(tmp / "generation_config.json", generation);
      files = write_hf_weights(tmp.string(), *model, dtype, max_shard);
      if (!tok.model_file.empty()) {
        fs::copy_file(tok.model_file, tmp / "tokenizer.model");
      }
      if (fs::exists(out)) {
        // Empty (or --force): move the old one aside so the rename cannot fail on
        // a non-empty target, then drop it.
        const fs::path old = fs::path(out.string() + ".old-" + std::to_string(::getpid()));
        fs::rename(out, old);
        fs::rename(tmp, out);
        remove_tree(old);
      } else {
        fs::rename(tmp, out);
      }
    } catch (...) {
      remove_tree(tmp);
      throw;
    }

    int64_t n_params = 0;
    for (const auto& p : model->parameters()) n_params += p.numel();
    std::cout << fmt::format("exported {} -> {} ({} parameters, {}, {} weight file{})\n", step.string(),
                             out.string(), n_params, dtype_name, files.size() == 1 ? 1 : files.size() - 1,
                             files.size() == 1 ? "" : "s");
    if (tok.kind == "byte")
      std::cout << "note: the byte tokenizer has no transformers equivalent; no tokenizer files were written "
                   "(ids 0..255 are bytes, eos = 256)\n";
    else if (tok.model_file.empty())
      std::cout << fmt::format("note: {} has no tokenizer.model (run `moetrain data prepare`); no tokenizer "
                               "files were written\n",
                               exp.data.dir);
    else
      std::cout << "tokenizer: copied tokenizer.model (SentencePiece; no tokenizer_config.json: load it with the "
                   "sentencepiece package, transformers 5.17 cannot convert it on its own here)\n";
    return 0;
  });
}

}  // namespace moetrain
