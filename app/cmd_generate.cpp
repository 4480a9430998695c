// moetrain generate (FILE --checkpoint PATH | --hf DIR) --prompt TEXT: continues a
// prompt with the latent-KV-cache decoder (models/decoding.h): greedy by default,
// or sampled (--temperature, --top-k, --top-p, --seed); --speculative mtp drafts
// with the model's first MTP module (greedy, same output as plain greedy). The
// text goes to stdout; tokens/s, the KV-cache size per token and the speculative
// acceptance rate to stderr.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"
#include "app/model_source.h"
#include "data/data_error.h"
#include "data/tokenizer.h"
#include "models/decoding.h"
#include "models/transformer.h"
#include "trainer/checkpoint.h"
#include "trainer/experiment_config.h"

namespace moetrain {

namespace {

namespace fs = std::filesystem;

int64_t parse_int_arg(const ArgParser& args, const std::string& name, int64_t min) {
  const std::string v = args.get(name);
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < min)
    throw UsageError(fmt::format("moetrain generate: --{} must be an integer >= {}, got '{}'", name, min, v));
  return x;
}

double parse_real_arg(const ArgParser& args, const std::string& name, double min, double max) {
  const std::string v = args.get(name);
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end != '\0' || !(x >= min && x <= max))
    throw UsageError(fmt::format("moetrain generate: --{} must be a number in [{}, {}], got '{}'", name, min, max, v));
  return x;
}

struct Loaded {
  ModelConfig cfg;
  Transformer model{nullptr};
  std::unique_ptr<Tokenizer> tokenizer;
  std::string source;
};

// The model through app/model_source (a verified checkpoint with its config.yaml, or an HF
// directory); the tokenizer: the experiment's, for --hf alone DIR/tokenizer.model, else bytes
// when the vocabulary holds them.
Loaded load_model(const std::string& file, const std::vector<std::string>& sets, const std::string& ckpt,
                  const std::string& hf_dir) {
  ModelSource src = load_model_source(file, sets, ckpt, hf_dir, torch::kCPU);
  Loaded l;
  l.cfg = src.model->cfg;
  l.model = src.model;
  l.source = src.name;
  if (src.experiment && src.experiment->data.tokenizer == "byte") {
    l.tokenizer = std::make_unique<ByteTokenizer>();
  } else if (src.experiment || fs::is_regular_file(fs::path(hf_dir) / "tokenizer.model")) {
    l.tokenizer = source_tokenizer(src);
  } else if (l.cfg.vocab_size >= ByteTokenizer::kVocab) {
    std::cerr << fmt::format("generate: {} has no tokenizer.model; using moetrain's byte tokenizer\n", hf_dir);
    l.tokenizer = std::make_unique<ByteTokenizer>();
  } else {
    throw UsageError(fmt::format("moetrain generate: {} has no tokenizer.model and its vocabulary ({}) is too "
                                 "small for the byte tokenizer",
                                 hf_dir, l.cfg.vocab_size));
  }
  return l;
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  ArgParser args("generate", "(FILE --checkpoint PATH | --hf DIR) --prompt TEXT [options]",
                 "Continue a prompt: one prefill, then one token per step over the latent KV cache (absorbed\n"
                 "MLA). Greedy unless --temperature > 0. Prints the prompt and its continuation on stdout; tokens/s,\n"
                 "the KV cache per token against multi-head attention, and (--speculative mtp) the draft acceptance\n"
                 "rate on stderr. Tokenizer: the experiment's (data.dir, or bytes); for --hf, DIR/tokenizer.model\n"
                 "when present, else bytes.");
  args.positional("FILE", "experiment config (YAML), with --checkpoint", /*required=*/false);
  args.option("checkpoint", "PATH", "a step-* directory or a checkpoint.dir (its newest complete step)");
  args.option("hf", "DIR", "a Hugging Face DeepseekV3 directory instead of FILE --checkpoint");
  args.option("prompt", "TEXT", "the text to continue");
  args.option("max-new-tokens", "N", "tokens to generate at most (stops earlier at eos)", "64");
  args.option("temperature", "T", "0 = greedy; > 0 samples from softmax(logits / T)", "0");
  args.option("top-k", "K", "sample among the K most likely tokens (0 = all)", "0");
  args.option("top-p", "P", "sample from the nucleus of mass P (1 = all)", "1");
  args.option("seed", "N", "sampling seed", "0");
  args.option("speculative", "mtp", "self-speculative decoding, MTP module 1 drafting one token per step (greedy)");
  args.flag("no-cache", "the reference path: a full forward (naive MLA) over the whole sequence per token");
  args.option("device", "DEV", "cpu or cuda", "cpu");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    const bool hf = args.given("hf");
    if (hf == (args.num_positional() > 0))
      throw UsageError("moetrain generate: give either FILE --checkpoint PATH or --hf DIR (see --help)");
    if (!hf && !args.given("checkpoint")) throw UsageError("moetrain generate: FILE needs --checkpoint PATH");
    if (hf && (args.given("checkpoint") || !args.sets().empty()))
      throw UsageError("moetrain generate: --checkpoint and --set go with FILE, not with --hf");
    if (!args.given("prompt")) throw UsageError("moetrain generate: --prompt TEXT is required");
    GenerateOptions opt;
    opt.max_new_tokens = parse_int_arg(args, "max-new-tokens", 0);
    opt.sampling.temperature = parse_real_arg(args, "temperature", 0.0, 1e6);
    opt.sampling.top_k = parse_int_arg(args, "top-k", 0);
    opt.sampling.top_p = parse_real_arg(args, "top-p", 1e-9, 1.0);
    opt.seed = static_cast<uint64_t>(parse_int_arg(args, "seed", 0));
    const bool speculative = args.given("speculative");
    if (speculative && args.get("speculative") != "mtp")
      throw UsageError(fmt::format("moetrain generate: --speculative takes 'mtp', got '{}'", args.get("speculative")));
    if (speculative && opt.sampling.temperature > 0.0)
      throw UsageError("moetrain generate: --speculative mtp is greedy only (drop --temperature)");
    if (speculative && args.has("no-cache"))
      throw UsageError("moetrain generate: --speculative mtp and --no-cache exclude each other");
    const std::string device_name = args.get("device");
    if (device_name != "cpu" && device_name != "cuda")
      throw UsageError(fmt::format("moetrain generate: --device is cpu or cuda, got '{}'", device_name));
    if (device_name == "cuda" && !torch::cuda::is_available())
      throw UsageError("moetrain generate: --device cuda, but no CUDA device is available");

    Loaded l;
    try {
      l = load_model(args.num_positional() > 0 ? args.pos(0) : "", args.sets(), args.get("checkpoint"), args.get("hf"));
    } catch (const DataError& e) {
      throw UsageError(e.what());  // no or damaged tokenizer
    } catch (const CheckpointError& e) {
      throw UsageError(e.what());
    }
    const ModelConfig& cfg = l.cfg;
    Transformer& model = l.model;
    if (speculative && cfg.num_nextn_predict_layers < 1)
      throw UsageError(fmt::format("moetrain generate: --speculative mtp needs a model with MTP modules, but {} has "
                                   "num_nextn_predict_layers = 0",
                                   l.source));
    if (l.tokenizer->vocab_size() > cfg.vocab_size)
      throw UsageError(fmt::format("moetrain generate: the tokenizer's vocabulary ({}) exceeds the model's ({})",
                                   l.tokenizer->vocab_size(), cfg.vocab_size));
    model->to(torch::Device(device_name == "cuda" ? torch::kCUDA : torch::kCPU));
    model->eval();

    const std::string text = args.get("prompt");
    std::vector<int64_t> prompt = l.tokenizer->encode(text);
    // Training documents start right after an eos: an empty prompt starts from one.
    if (prompt.empty()) prompt.push_back(l.tokenizer->eos_id());
    opt.eos_id = l.tokenizer->eos_id();

    GenerateStats stats;
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<int64_t> ids = speculative           ? generate_speculative_mtp(model, prompt, opt, &stats)
                                     : args.has("no-cache") ? generate_uncached(model, prompt, opt, &stats)
                                                            : generate_cached(model, prompt, opt, &stats);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << text << l.tokenizer->decode(ids) << "\n" << std::flush;

    std::cerr << fmt::format("generate: {} new tokens from a {}-token prompt in {:.3f} s: {:.1f} tokens/s ({} "
                             "main-model steps, {})\n",
                             ids.size(), prompt.size(), seconds, static_cast<double>(ids.size()) / std::max(seconds, 1e-9),
                             stats.main_steps,
                             speculative ? "speculative, MTP draft" : args.has("no-cache") ? "no cache" : "latent KV cache");
    if (speculative)
      std::cerr << fmt::format("speculative: {} of {} drafts accepted ({:.1f}%)\n", stats.accepted, stats.drafted,
                               100.0 * stats.acceptance_rate());
    // DeepSeek-V2 Table 1: MLA caches (d_c + d_h^R) numbers per token and layer, MHA 2·n_h·d_h.
    const int64_t L = cfg.num_hidden_layers, elem = static_cast<int64_t>(model->head->weight.element_size());
    const int64_t mla = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
    const int64_t mha = 2 * cfg.num_attention_heads * cfg.qk_nope_head_dim;
    std::cerr << fmt::format("KV cache: {} numbers/token/layer (kv_lora_rank {} + qk_rope_head_dim {}) = {} bytes/token "
                             "over {} layers{}; multi-head attention would need 2·n_h·d_h = 2·{}·{} = {} numbers/token/layer "
                             "= {} bytes/token ({:.1f}x)\n",
                             mla, cfg.kv_lora_rank, cfg.qk_rope_head_dim, mla * L * elem, L,
                             stats.kv_cache_bytes_per_token > 0
                                 ? fmt::format(" (measured: {})", stats.kv_cache_bytes_per_token)
                                 : std::string(),
                             cfg.num_attention_heads, cfg.qk_nope_head_dim, mha, mha * L * elem,
                             static_cast<double>(mha) / static_cast<double>(mla));
    return 0;
  });
}

}  // namespace moetrain
