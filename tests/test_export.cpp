// `moetrain export` round trip through Hugging Face transformers: a checkpoint
// written by hand (the trainer's layout) is exported with cmd_export, loaded by
// tests/python/hf_logits.py with AutoModelForCausalLM.from_pretrained (fp32, eager
// attention; any missing, unexpected or mismatched tensor fails), and its logits
// on fixed ids must equal moetrain's (max abs error <= 1e-4). Covers q_lora_rank
// 0 and > 0, group-limited routing with nonzero router biases, a sharded export
// from the checkpoint root, and bf16 (router biases stay fp32 in the file and in
// the loaded model). Needs MOETRAIN_PYTHON with torch and transformers 5.17; fails
// (does not skip) without them.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "export_fixture.h"
#include "io/hf.h"
#include "test_paths.h"

using namespace moetrain;
using namespace moetrain::export_test;
using Json = nlohmann::json;

namespace {

constexpr double kLogitTol = 1e-4;

// Fixed ids over the whole vocabulary, long enough to exercise RoPE and causality.
torch::Tensor fixed_ids(int64_t vocab) {
  std::vector<int64_t> v;
  for (int64_t k = 0; k < 16; ++k) v.push_back((k * 37 + 11) % vocab);
  return torch::tensor(v, torch::kInt64).view({1, -1});
}

// Runs hf_logits.py on an exported DIR; returns its output file.
SafetensorsFile hf_run(const fs::path& dir, const torch::Tensor& ids, const fs::path& out_file,
                       const std::string& extra = "") {
  std::string id_list;
  for (int64_t k = 0; k < ids.size(1); ++k) id_list += (k ? " " : "") + std::to_string(ids[0][k].item<int64_t>());
  const std::string cmd = std::string("'") + MOETRAIN_PYTHON + "' '" + MOETRAIN_SOURCE_DIR +
                          "/tests/python/hf_logits.py' --load '" + dir.string() + "' --ids '" + id_list +
                          "' --out '" + out_file.string() + "' " + extra + " 2>&1";
  std::string output;
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) throw std::runtime_error("popen failed");
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) output.append(buf.data(), n);
  const int status = pclose(pipe);
  if (status != 0) throw std::runtime_error("hf_logits.py failed (" + std::to_string(status) + "):\n" + output);
  return read_safetensors(out_file.string());
}

double max_abs(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// Exported DIR vs moetrain: logits, router biases (bit-exact, fp32), token ids.
void expect_same_as_hf(const Transformer& model, const ModelConfig& cfg, const fs::path& dir,
                       const std::string& what) {
  const torch::Tensor ids = fixed_ids(cfg.vocab_size);
  const SafetensorsFile hf = hf_run(dir, ids, dir.parent_path() / (dir.filename().string() + "-logits.safetensors"));
  EXPECT_EQ(hf.metadata.at("transformers_version"), "5.17.0");
  const torch::Tensor ours = moetrain_logits(model, ids);
  ASSERT_EQ(hf.at("logits").sizes(), ours.sizes());
  const double err = max_abs(hf.at("logits"), ours);
  std::printf("[%s] max |logits_hf - logits_moetrain| = %.3g (logit scale %.3g)\n", what.c_str(), err,
              ours.abs().max().item<double>());
  EXPECT_LE(err, kLogitTol) << what;
  for (int64_t l = cfg.first_k_dense_replace; l < cfg.num_hidden_layers; ++l) {
    const torch::Tensor& b = hf.at("bias." + std::to_string(l));
    EXPECT_EQ(b.scalar_type(), torch::kFloat) << what << " layer " << l;
    EXPECT_TRUE(torch::equal(b, model->named_buffers()["layers." + std::to_string(l) + ".ffn.gate.bias"]))
        << what << " layer " << l;
  }
  // bos/eos as the byte tokenizer's, consistent between config and generation config.
  EXPECT_EQ(hf.metadata.at("bos_token_id"), "None");
  EXPECT_EQ(hf.metadata.at("eos_token_id"), "256");
  EXPECT_EQ(hf.metadata.at("gen_bos_token_id"), "None");
  EXPECT_EQ(hf.metadata.at("gen_eos_token_id"), "256");
}

class ExportRoundTrip : public ::testing::TestWithParam<int64_t> {};

TEST_P(ExportRoundTrip, Fp32LogitsMatchTransformers) {
  TempDir tmp;
  const ModelConfig cfg = tiny_config(GetParam());
  const Transformer model = random_model(cfg, 11 + GetParam());
  const fs::path step = write_checkpoint(tmp.path() / "ckpt", model, cfg, (tmp.path() / "data").string());
  const fs::path out = tmp.path() / "hf";
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  ASSERT_TRUE(fs::exists(out / "model.safetensors"));
  expect_same_as_hf(model, cfg, out, "fp32 q_lora_rank=" + std::to_string(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(QLoraRank, ExportRoundTrip, ::testing::Values(0, 32));

// The exported SentencePiece tokenizer loads with AutoTokenizer (tokenizers alone) and encodes
// like moetrain: no bos/eos added, spaces, tabs, newlines, non-ASCII (byte fallback) and a
// literal "<s>" (stays text) included; decode gives the text back.
TEST(ExportHf, SentencePieceTokenizerLoadsInTransformers) {
  TempDir tmp;
  ModelConfig cfg = tiny_config(0);
  cfg.vocab_size = 400;
  const Transformer model = random_model(cfg, 6);
  const std::string blob = tiny_sentencepiece(400);
  const fs::path data = tmp.path() / "data";
  fs::create_directories(data);
  std::ofstream(data / "tokenizer.model", std::ios::binary) << blob;
  const fs::path step = write_checkpoint(tmp.path() / "ckpt", model, cfg, data.string(), {}, "sentencepiece");
  const fs::path out = tmp.path() / "hf";
  ExportResult r = run_export({step.string(), "--out", out.string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  const std::string text = "  the kernel\tmaps a page\n\nint main(void) {\n    return 0;\n}\n"
                           "na\xC3\xAFve caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x99\x82 literal <s> x  ";
  const SafetensorsFile f = hf_run(out, fixed_ids(cfg.vocab_size), tmp.path() / "o.safetensors", "--text '" + text + "'");
  const std::vector<int64_t> want = SentencePieceTokenizer::from_serialized(blob)->encode(text);
  const torch::Tensor got = f.at("text_ids");
  ASSERT_EQ(got.numel(), static_cast<int64_t>(want.size()));
  EXPECT_TRUE(torch::equal(got, torch::tensor(want, torch::kInt64)));
  EXPECT_EQ(f.metadata.at("decoded"), text);
}

TEST(ExportHf, ShardedFromCheckpointRootLoads) {
  TempDir tmp;
  const ModelConfig cfg = tiny_config(32);
  const Transformer model = random_model(cfg, 5);
  write_checkpoint(tmp.path() / "ckpt", model, cfg, (tmp.path() / "data").string());
  const fs::path out = tmp.path() / "hf";
  ExportResult r =
      run_export({(tmp.path() / "ckpt").string(), "--format", "hf", "--out", out.string(), "--max-shard-size", "50KB"});
  ASSERT_EQ(r.rc, 0) << r.err;
  ASSERT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  ASSERT_FALSE(fs::exists(out / "model.safetensors"));
  expect_same_as_hf(model, cfg, out, "sharded fp32");
}

TEST(ExportHf, Bf16KeepsRouterBiasFp32) {
  TempDir tmp;
  const ModelConfig cfg = tiny_config(32);
  Transformer model = random_model(cfg, 9);
  const fs::path step = write_checkpoint(tmp.path() / "ckpt", model, cfg, (tmp.path() / "data").string());
  const fs::path out = tmp.path() / "hf";
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string(), "--dtype", "bf16"});
  ASSERT_EQ(r.rc, 0) << r.err;
  const SafetensorsHeader h = read_safetensors_header((out / "model.safetensors").string());
  int n_bias = 0;
  for (const StTensorInfo& t : h.tensors) {
    const bool bias = t.name.find("mlp.gate.e_score_correction_bias") != std::string::npos;
    n_bias += bias;
    EXPECT_EQ(t.dtype, bias ? StDtype::F32 : StDtype::BF16) << t.name;
  }
  EXPECT_EQ(n_bias, cfg.num_moe_layers());
  // transformers (fp32) must then compute what moetrain computes with the same
  // bf16-rounded weights and the exact fp32 biases.
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.copy_(p.to(torch::kBFloat16).to(torch::kFloat));
  }
  expect_same_as_hf(model, cfg, out, "bf16 weights");
}

}  // namespace
