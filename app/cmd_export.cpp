// moetrain export CHECKPOINT --format hf --out DIR: a training checkpoint
// (step-XXXXXXXX/ with model.safetensors + config.yaml, or the checkpoint root
// whose `latest` names one) -> a Hugging Face DeepseekV3 directory that
// transformers' AutoModelForCausalLM.from_pretrained loads: config.json,
// generation_config.json, model.safetensors (or shards + index) and, for a
// SentencePiece experiment, tokenizer.model + tokenizer.json + tokenizer_config.json
// (io/hf_tokenizer.h: AutoTokenizer loads them and encodes exactly as moetrain does).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "data/data_error.h"
#include "data/tokenizer.h"
#include "io/hf.h"
#include "io/hf_tokenizer.h"
#include "io/safetensors.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"
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
      "CHECKPOINT is a step directory (step-XXXXXXXX/) or a checkpoint root (its newest complete\n"
      "checkpoint, as --resume auto picks it). Its MANIFEST checksums are verified and model.safetensors\n"
      "must hold exactly the tensors of the model that config.yaml describes (names, shapes, dtypes),\n"
      "else nothing is written (exit 2).\n"
      "DIR gets config.json, generation_config.json and model.safetensors, or\n"
      "model-0000k-of-0000n.safetensors + model.safetensors.index.json when the weights exceed\n"
      "--max-shard-size. The router biases (mlp.gate.e_score_correction_bias) stay fp32 with --dtype bf16.\n"
      "Tokenizer: with a SentencePiece tokenizer (data.dir/tokenizer.model) DIR also gets a copy of\n"
      "tokenizer.model (unk 0, bos 1, eos 2; identity normalization, no dummy prefix, byte fallback) and\n"
      "its tokenizer.json + tokenizer_config.json, which AutoTokenizer.from_pretrained(DIR) loads with\n"
      "the tokenizers library alone and which encode exactly as moetrain does (no bos/eos added;\n"
      "literal '<s>' in text stays text). The byte tokenizer has no\n"
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

    // A bad checkpoint fails here, before the output directory exists.
    fs::path step;
    ExperimentConfig exp;
    Transformer model{nullptr};
    Json config;
    try {
      step = resolve_checkpoint_arg(args.pos(0));  // MANIFEST verified
      exp = load_experiment_config((step / "config.yaml").string());
      config = hf_config_to_json(exp.model);  // throws for what transformers cannot express, before any work
      model = Transformer(exp.model);
      load_model_weights(step.string(), model);
    } catch (const CheckpointError& e) {
      throw UsageError(fmt::format("moetrain export: {}", e.what()));
    }
    const ModelConfig& mcfg = exp.model;

    const TokenizerExport tok = describe_tokenizer(exp);
    std::unique_ptr<SentencePieceTokenizer> sp;  // parsed before anything is written
    if (!tok.model_file.empty()) {
      try {
        sp = std::make_unique<SentencePieceTokenizer>(tok.model_file.string());
      } catch (const DataError& e) {
        throw UsageError(fmt::format("moetrain export: {}", e.what()));
      }
      if (sp->vocab_size() != mcfg.vocab_size)
        throw UsageError(fmt::format("moetrain export: {} has {} pieces, the model's vocab_size is {}",
                                     tok.model_file.string(), sp->vocab_size(), mcfg.vocab_size));
    }
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
        write_json(tmp / "tokenizer.json", hf_tokenizer_json(*sp));
        write_json(tmp / "tokenizer_config.json", hf_tokenizer_config_json(*sp, mcfg.max_position_embeddings));
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
      std::cout << "tokenizer: tokenizer.model, tokenizer.json and tokenizer_config.json (AutoTokenizer loads them)\n";
    return 0;
  });
}

}  // namespace moetrain
