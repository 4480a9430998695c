// defines: hf_config_from_json, load_hf_config, hf_config_to_json, HfTarget,
// hf_parse_name, hf_name_for, load_hf_weights, hf_state_dict, save_hf_checkpoint,
// write_hf_weights, parse_byte_size —
// the one adapter between moetrain's names (docs/model-contract.md, DeepSeek's
// inference/model.py) and Hugging Face DeepseekV3 checkpoints (transformers 5.x
// config.json + model.safetensors or a sharded model.safetensors.index.json).
//
// On disk transformers 5.17 writes routed experts per expert
// (`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`, save_original_format=True,
// the default); with save_original_format=False it writes its in-memory fused form
// (`mlp.experts.gate_up_proj` [E, 2I, D], gate rows first, and
// `mlp.experts.down_proj` [E, D, I]). The loader accepts both; moetrain stacks
// experts as `layers.{i}.ffn.experts.w13` [E, 2I, D] (gate rows first: the same
// layout as gate_up_proj) and `w2` [E, D, I].
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>
#include <torch/torch.h>

#include "models/model_config.h"

namespace moetrain {

// config.json -> ModelConfig. Follows transformers 5.17's DeepseekV3Config:
// architecture keys are required (q_lora_rank may be null -> 0); rms_norm_eps,
// max_position_embeddings, initializer_range (-> init_std) and RoPE fall back to
// HF's defaults (1e-6, 4096, 0.02, theta 10000 without scaling). RoPE comes from
// `rope_parameters` {rope_type default|yarn, rope_theta, factor, ...} or the
// legacy `rope_theta` + `rope_scaling` (which wins when both are set, as in HF).
// Throws std::runtime_error naming `where` and the key for anything moetrain
// cannot reproduce: model_type != deepseek_v3, rope_interleave false,
// tie_word_embeddings true, hidden_act != silu, attention_bias true,
// scoring_func != sigmoid, num_key_value_heads != num_attention_heads,
// quantization_config, RoPE types other than default/yarn.
ModelConfig hf_config_from_json(const nlohmann::json& j, const std::string& where);
// Reads `dir`/config.json.
ModelConfig load_hf_config(const std::string& dir);
// ModelConfig -> config.json that transformers 5.x loads as DeepseekV3ForCausalLM
// (rope_interleave true, q_lora_rank null when 0, rope_parameters plus the legacy
// rope_theta/rope_scaling for older readers). Throws for softmax scoring, which
// transformers' DeepseekV3 cannot express.
nlohmann::json hf_config_to_json(const ModelConfig& cfg);

// Where one Hugging Face tensor goes in moetrain.
struct HfTarget {
  enum class Kind {
    kWhole,        // the whole moetrain tensor `name`
    kExpert,       // row `expert` of the stacked [E, ...] tensor `name` (part of it for w13)
    kSharedCopy,   // an MTP layer's copy of the shared `name` (embed.weight / head.weight)
  };
  Kind kind = Kind::kWhole;
  std::string name;
  int64_t layer = -1;   // the HF layer index; -1 for embed / norm / head
  int64_t expert = -1;  // kExpert only
  int64_t part = -1;    // kExpert of w13: 0 = gate_proj (rows [0, I)), 1 = up_proj ([I, 2I))
};

// Maps an HF DeepseekV3 tensor name onto moetrain's. Returns false when the name
// is not one of transformers' DeepseekV3ForCausalLM weights (layer and expert
// indices must be canonical decimals; their ranges are the caller's to check).
// With num_hidden_layers = L >= 0, layer L + k is MTP module k (DeepSeek's layout):
// its decoder tensors map to `mtp.{k}.block.*`, `enorm`/`hnorm`/`eh_proj`/
// `shared_head.norm` to `mtp.{k}.enorm/hnorm/eh_proj/norm`, and its copies
// `embed_tokens.weight` / `shared_head.head.weight` to kSharedCopy of
// `embed.weight` / `head.weight`. With L < 0 every layer is a decoder layer.
bool hf_parse_name(const std::string& hf_name, HfTarget* out, int64_t num_hidden_layers = -1);
// moetrain name -> HF name. The stacked experts (`layers.{i}.ffn.experts.w13|w2`,
// `mtp.{k}.block.ffn.experts.*`) need `expert` >= 0 and give the per-expert name,
// w13 with `part` 0 (gate_proj) or 1 (up_proj); every other name needs expert == -1.
// `mtp.{k}.*` names need num_hidden_layers. Throws std::invalid_argument for names
// outside the contract.
std::string hf_name_for(const std::string& moetrain_name, int64_t expert = -1, int64_t num_hidden_layers = -1,
                        int64_t part = -1);

// Loads `dir`/model.safetensors, or the shards of `dir`/model.safetensors.index.json,
// into `model` (a Transformer built from `cfg`): every HF tensor onto the module's
// named_parameters() / named_buffers() by the contract, per-expert tensors stacked,
// copied under NoGradGuard into the destination's dtype and device (the fp32 router
// bias stays fp32). Every name, shape, dtype and the index are checked against the
// shard headers before any data is read or copied, so a rejected checkpoint leaves
// the model untouched. Throws std::runtime_error naming the tensor (and file) for:
// unknown HF names, module tensors left unfilled (every parameter and router bias),
// tensors given twice, shape mismatches (expected vs found), non-float dtypes,
// expert indices out of range, a missing shard or an index that disagrees with
// the shards. MTP modules (layers L..L+D-1, L = cfg.num_hidden_layers, D =
// cfg.num_nextn_predict_layers) load into `mtp.{k}.*`; their copies of the shared
// embedding / head are shape-checked and compared (a differing copy is reported on
// stderr; moetrain keeps the main tensor). A checkpoint with no MTP tensor at all
// (transformers' save_pretrained drops them) leaves the MTP modules as they were,
// with a notice; a partial one is an error. Layers >= L + D are skipped with one
// notice on stderr. Returns the number of HF tensors loaded.
int64_t load_hf_weights(const std::string& dir, torch::nn::Module& model, const ModelConfig& cfg);

// The model's tensors under HF names, experts split per expert (views of the
// stacked tensors, CPU or not), in the module's dtypes: what save_hf_checkpoint writes.
// MTP module k is written as layer L + k (L = the number of `layers.{i}`), with
// copies of the embedding and head as in DeepSeek-V3's release. transformers 5.17's
// DeepseekV3ForCausalLM skips layer 61 silently and reports other MTP layers as
// unexpected keys (it builds no MTP module either way).
std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(const torch::nn::Module& model);
// Writes `dir`/config.json (hf_config_to_json) and `dir`/model.safetensors
// (metadata format=pt), creating `dir`. One file, no sharding.
void save_hf_checkpoint(const std::string& dir, const torch::nn::Module& model, const ModelConfig& cfg);

// transformers' default max_shard_size ("5GB", decimal).
constexpr int64_t kHfDefaultMaxShardBytes = 5'000'000'000;

// Writes hf_state_dict(model) into the existing directory `dir` the way
// save_pretrained does: floating tensors cast to `dtype`, except the router
// biases (`mlp.gate.e_score_correction_bias`), which stay fp32 as in DeepSeek-V3's
// release; one `model.safetensors` when the total fits `max_shard_bytes`, else
// `model-0000k-of-0000n.safetensors` (a new shard starts when the next tensor
// would overflow the current one; a tensor larger than the limit gets its own)
// plus `model.safetensors.index.json` {metadata.total_size, weight_map}.
// Returns the files written (names relative to `dir`). Writes no config.json.
std::vector<std::string> write_hf_weights(const std::string& dir, const torch::nn::Module& model,
                                          torch::ScalarType dtype = torch::kFloat,
                                          int64_t max_shard_bytes = kHfDefaultMaxShardBytes);

// "5GB" / "200KB" / "1.5MiB" / "12345" -> bytes, as transformers'
// convert_file_size_to_int (KB/MB/GB decimal, KiB/MiB/GiB binary; a bare number is
// bytes). Throws std::invalid_argument for anything else or a value < 1.
int64_t parse_byte_size(const std::string& text);

}  // namespace moetrain
