// `moetrain export` without Python: the strict checkpoint load (missing, extra and
// misshapen tensors fail naming the tensor, and nothing is written), the output
// files (config.json, generation_config.json, weights under HF names), sharding
// with its index, bf16 with fp32 router biases, the checkpoint-root form, the
// tokenizer notice, refusal of a non-empty DIR without --force, and sizes.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "export_fixture.h"
#include "io/hf.h"

using namespace moetrain;
using namespace moetrain::export_test;
using Json = nlohmann::json;

namespace {

Json read_json(const fs::path& p) {
  std::ifstream in(p);
  return Json::parse(in);
}

// No DIR and no DIR.tmp-* left behind.
void expect_nothing_written(const fs::path& parent, const std::string& name) {
  EXPECT_FALSE(fs::exists(parent / name));
  for (const auto& e : fs::directory_iterator(parent))
    EXPECT_NE(e.path().filename().string().rfind(name + ".", 0), 0u) << "left behind: " << e.path();
}

struct Fixture : ::testing::Test {
  TempDir tmp;
  ModelConfig cfg = tiny_config(0);
  Transformer model = random_model(cfg, 3);
  fs::path ckpt_root = tmp.path() / "ckpt";
  fs::path out = tmp.path() / "hf";
  std::string data_dir = (tmp.path() / "data").string();  // no tokenizer.model: byte
};

TEST_F(Fixture, WritesHfLayout) {
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir);
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  const Json c = read_json(out / "config.json");
  EXPECT_EQ(c["model_type"], "deepseek_v3");
  EXPECT_EQ(c["rope_interleave"], true);
  EXPECT_EQ(c["n_group"], 4);
  EXPECT_TRUE(c["q_lora_rank"].is_null());
  EXPECT_EQ(c["eos_token_id"], 256);
  EXPECT_TRUE(c["bos_token_id"].is_null());
  const Json g = read_json(out / "generation_config.json");
  EXPECT_EQ(g["_from_model_config"], true);
  EXPECT_EQ(g["bos_token_id"], c["bos_token_id"]);
  EXPECT_EQ(g["eos_token_id"], c["eos_token_id"]);
  EXPECT_EQ(g["transformers_version"], "5.17.0");
  EXPECT_FALSE(fs::exists(out / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(out / "tokenizer.model"));
  EXPECT_EQ(load_hf_config(out.string()).n_group, cfg.n_group);

  // Every tensor under its HF name with the model's values; experts split.
  SafetensorsFile f = read_safetensors((out / "model.safetensors").string());
  EXPECT_EQ(f.metadata.at("format"), "pt");
  EXPECT_TRUE(torch::equal(f.at("model.layers.1.mlp.experts.5.gate_proj.weight"),
                           model->named_parameters()["layers.1.ffn.experts.w13"][5].narrow(0, 0, cfg.moe_intermediate_size)));
  EXPECT_TRUE(torch::equal(f.at("model.layers.1.mlp.experts.5.up_proj.weight"),
                           model->named_parameters()["layers.1.ffn.experts.w13"][5].narrow(0, cfg.moe_intermediate_size,
                                                                                            cfg.moe_intermediate_size)));
  EXPECT_TRUE(torch::equal(f.at("model.layers.2.mlp.gate.e_score_correction_bias"),
                           model->named_buffers()["layers.2.ffn.gate.bias"]));
  EXPECT_TRUE(f.contains("lm_head.weight"));
  // ... and the loader reads it back exactly.
  Transformer back(cfg);
  load_hf_weights(out.string(), *back, cfg);
  for (const auto& item : model->named_parameters())
    EXPECT_TRUE(torch::equal(item.value(), back->named_parameters()[item.key()])) << item.key();
}

TEST_F(Fixture, CheckpointRootShardedBf16) {
  write_checkpoint(ckpt_root, model, cfg, data_dir);
  ExportResult r = run_export({ckpt_root.string(), "--format=hf", "--out", out.string(), "--dtype", "bf16",
                               "--max-shard-size", "40KB"});
  ASSERT_EQ(r.rc, 0) << r.err;
  ASSERT_FALSE(fs::exists(out / "model.safetensors"));
  const Json index = read_json(out / "model.safetensors.index.json");
  std::set<std::string> files;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) files.insert(it->get<std::string>());
  ASSERT_GT(files.size(), 2u);
  int64_t total = 0;
  size_t n_tensors = 0;
  for (const std::string& name : files) {
    const SafetensorsHeader h = read_safetensors_header((out / name).string());
    for (const StTensorInfo& t : h.tensors) {
      ++n_tensors;
      EXPECT_EQ(index["weight_map"][t.name], name);
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      const bool bias = t.name.find("e_score_correction_bias") != std::string::npos;
      EXPECT_EQ(t.dtype, bias ? StDtype::F32 : StDtype::BF16) << t.name;
      total += n * (bias ? 4 : 2);
    }
  }
  EXPECT_EQ(n_tensors, index["weight_map"].size());
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), total);
  EXPECT_EQ(read_json(out / "config.json")["dtype"], "bfloat16");
  // The loader reads the shards; biases bit-exact, weights bf16-rounded.
  Transformer back(cfg);
  load_hf_weights(out.string(), *back, cfg);
  for (const auto& item : model->named_buffers())
    EXPECT_TRUE(torch::equal(item.value(), back->named_buffers()[item.key()])) << item.key();
  torch::Tensor w = model->named_parameters()["layers.0.attn.wkv_a.weight"];
  EXPECT_TRUE(torch::equal(w.to(torch::kBFloat16).to(torch::kFloat), back->named_parameters()["layers.0.attn.wkv_a.weight"]));
}

// SentencePiece: tokenizer.model is copied byte for byte, tokenizer.json holds every piece and the
// merges (io/hf_tokenizer.h), tokenizer_config.json adds no bos/eos, and bos/eos follow moetrain's
// layout (1, 2) in both model JSON files. A tokenizer whose size differs from the model's vocab is
// refused before anything is written.
TEST_F(Fixture, WritesSentencePieceTokenizerFiles) {
  cfg.vocab_size = 400;
  model = random_model(cfg, 3);
  const std::string blob = tiny_sentencepiece(400);
  fs::create_directories(data_dir);
  std::ofstream(fs::path(data_dir) / "tokenizer.model", std::ios::binary) << blob;
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir, {}, "sentencepiece");
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  std::ifstream in(out / "tokenizer.model", std::ios::binary);
  const std::string copied((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(copied, blob);
  const Json c = read_json(out / "config.json");
  const Json g = read_json(out / "generation_config.json");
  EXPECT_EQ(c["bos_token_id"], 1);
  EXPECT_EQ(c["eos_token_id"], 2);
  EXPECT_EQ(g["bos_token_id"], 1);
  EXPECT_EQ(g["eos_token_id"], 2);
  const Json t = read_json(out / "tokenizer.json");
  EXPECT_EQ(t["model"]["type"], "BPE");
  EXPECT_EQ(t["model"]["vocab"].size(), 400u);
  EXPECT_EQ(t["model"]["vocab"]["<0x0A>"], 3 + 0x0A);  // byte pieces follow the 3 specials
  EXPECT_GT(t["model"]["merges"].size(), 100u);
  ASSERT_EQ(t["added_tokens"].size(), 3u);
  EXPECT_EQ(t["added_tokens"][1]["content"], "<s>");
  const Json tc = read_json(out / "tokenizer_config.json");
  EXPECT_EQ(tc["add_bos_token"], false);
  EXPECT_EQ(tc["split_special_tokens"], true);
  EXPECT_EQ(tc["model_max_length"], cfg.max_position_embeddings);

  // A 400-piece tokenizer beside a 300-token model: refused, nothing written.
  const fs::path out2 = tmp.path() / "hf2";
  ModelConfig small = cfg;
  small.vocab_size = 300;
  const Transformer small_model = random_model(small, 4);
  const fs::path step2 = write_checkpoint(tmp.path() / "ckpt2", small_model, small, data_dir, {}, "sentencepiece");
  r = run_export({step2.string(), "--out", out2.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("has 400 pieces, the model's vocab_size is 300"), std::string::npos) << r.err;
  expect_nothing_written(tmp.path(), "hf2");
}

TEST_F(Fixture, MissingTensorFailsAndWritesNothing) {
  auto tensors = checkpoint_tensors(model);
  tensors.erase(std::remove_if(tensors.begin(), tensors.end(),
                               [](const auto& kv) { return kv.first == "layers.2.ffn.gate.bias"; }),
                tensors.end());
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir, tensors);
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("layers.2.ffn.gate.bias: missing from the checkpoint"), std::string::npos) << r.err;
  expect_nothing_written(tmp.path(), "hf");
}

TEST_F(Fixture, WrongShapeFailsAndWritesNothing) {
  auto tensors = checkpoint_tensors(model);
  for (auto& kv : tensors)
    if (kv.first == "layers.1.ffn.experts.w2") kv.second = kv.second.narrow(0, 0, 7).contiguous();
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir, tensors);
  ExportResult r = run_export({step.string(), "--format", "hf", "--out", out.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("layers.1.ffn.experts.w2: checkpoint [7, 64, 32] Float ≠ model [8, 64, 32] Float"),
            std::string::npos)
      << r.err;
  expect_nothing_written(tmp.path(), "hf");
}

TEST_F(Fixture, ExtraTensorFails) {
  auto tensors = checkpoint_tensors(model);
  tensors.emplace_back("layers.3.attn_norm.weight", torch::ones({64}));
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir, tensors);
  ExportResult r = run_export({step.string(), "--out", out.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("layers.3.attn_norm.weight: in the checkpoint, not in the model"), std::string::npos) << r.err;
  expect_nothing_written(tmp.path(), "hf");
}

// A damaged file is caught by the MANIFEST before anything is exported; from the checkpoint root
// a damaged newest step falls back to the newest complete one (as --resume auto does).
TEST_F(Fixture, DamagedCheckpointRejectedRootFallsBack) {
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir);
  const fs::path newer = ckpt_root / "step-00000009";
  fs::create_directories(newer);
  for (const auto& f : fs::directory_iterator(step)) fs::copy_file(f.path(), newer / f.path().filename());
  {
    std::fstream f(newer / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-5, std::ios::end);
    f.put('\x7f');  // one flipped byte in the data section
  }
  std::ofstream(ckpt_root / "latest") << "step-00000009\n";
  ExportResult r = run_export({newer.string(), "--out", out.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("model.safetensors checksum mismatch"), std::string::npos) << r.err;
  expect_nothing_written(tmp.path(), "hf");
  r = run_export({ckpt_root.string(), "--out", out.string()});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.err.find("step-00000009"), std::string::npos) << r.err;  // the warning names the skipped one
  EXPECT_TRUE(fs::exists(out / "config.json"));
}

TEST_F(Fixture, RefusesNonEmptyOutUnlessForce) {
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir);
  fs::create_directories(out);
  std::ofstream(out / "keep.txt") << "x";
  ExportResult r = run_export({step.string(), "--out", out.string()});
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(out / "keep.txt"));
  r = run_export({step.string(), "--out", out.string(), "--force"});
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_FALSE(fs::exists(out / "keep.txt"));
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
  expect_nothing_written(tmp.path(), "hf.tmp");
  // An empty existing directory is fine without --force.
  const fs::path empty = tmp.path() / "empty";
  fs::create_directories(empty);
  EXPECT_EQ(run_export({step.string(), "--out", empty.string()}).rc, 0);
  EXPECT_TRUE(fs::exists(empty / "config.json"));
}

TEST_F(Fixture, BadArguments) {
  const fs::path step = write_checkpoint(ckpt_root, model, cfg, data_dir);
  EXPECT_EQ(run_export({step.string(), "--format", "gguf", "--out", out.string()}).rc, 2);
  EXPECT_EQ(run_export({step.string(), "--dtype", "fp16", "--out", out.string()}).rc, 2);
  EXPECT_EQ(run_export({step.string(), "--max-shard-size", "5XB", "--out", out.string()}).rc, 2);
  EXPECT_EQ(run_export({step.string()}).rc, 2);
  EXPECT_EQ(run_export({(tmp.path() / "nope").string(), "--out", out.string()}).rc, 2);
  EXPECT_EQ(run_export({tmp.path().string(), "--out", out.string()}).rc, 2);  // neither step dir nor root
  expect_nothing_written(tmp.path(), "hf");
}

TEST(ExportSizes, ParseByteSize) {
  EXPECT_EQ(parse_byte_size("5GB"), 5000000000);
  EXPECT_EQ(parse_byte_size("200KB"), 200000);
  EXPECT_EQ(parse_byte_size("2MiB"), 2 * 1048576);
  EXPECT_EQ(parse_byte_size("1gib"), 1073741824);
  EXPECT_EQ(parse_byte_size("12345"), 12345);
  EXPECT_EQ(parse_byte_size("1.5MB"), 1500000);
  for (const char* bad : {"", "GB", "-1", "0", "5 XB", "abc"}) EXPECT_THROW(parse_byte_size(bad), std::invalid_argument) << bad;
}

}  // namespace
