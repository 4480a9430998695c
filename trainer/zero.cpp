#include "trainer/zero.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>

#include <ATen/ops/_fused_adamw.h>
#include <fmt/format.h>

#include "io/safetensors.h"
#include "trainer/checkpoint.h"
#include "trainer/optim.h"

namespace moetrain {

namespace fs = std::filesystem;

// --- layout ------------------------------------------------------------------------------

ZeroShardLayout zero_shard_layout(const std::vector<int64_t>& numels, int64_t world) {
  TORCH_CHECK(world >= 1, "zero_shard_layout: world size ", world);
  ZeroShardLayout l;
  l.numels = numels;
  l.world = world;
  for (int64_t n : numels) {
    l.offsets.push_back(l.numel);
    l.numel += n;
  }
  l.shard_numel = (l.numel + world - 1) / world;
  return l;
}

std::vector<ZeroFragment> ZeroShardLayout::fragments(int64_t rank) const {
  std::vector<ZeroFragment> out;
  const int64_t lo = rank * shard_numel, hi = lo + shard_numel;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t a = std::max(lo, offsets[i]), b = std::min(hi, offsets[i] + numels[i]);
    if (a >= b) continue;
    out.push_back({static_cast<int64_t>(i), a - offsets[i], b - offsets[i], a - lo});
  }
  return out;
}

std::string zero_shard_file_name(int64_t rank, int64_t world) {
  return fmt::format("optimizer-zero-{:05d}-of-{:05d}.safetensors", rank, world);
}

// --- checkpoint pieces ---------------------------------------------------------------------

namespace {

// "exp_avg.layers.0.attn.wq_a.weight[10:20]" → {"layers.0.attn.wq_a.weight", 10, 20}; no
// brackets → the whole parameter (end = -1).
struct PieceKey {
  std::string name;
  int64_t begin = 0, end = -1;
};
PieceKey parse_piece_key(const std::string& key) {
  PieceKey k{key};
  if (key.empty() || key.back() != ']') return k;
  const auto open = key.rfind('['), colon = key.rfind(':');
  if (open == std::string::npos || colon == std::string::npos || colon < open) return k;
  try {
    k.begin = std::stoll(key.substr(open + 1, colon - open - 1));
    k.end = std::stoll(key.substr(colon + 1, key.size() - colon - 2));
  } catch (const std::exception&) {
    return PieceKey{key};
  }
  k.name = key.substr(0, open);
  return k;
}

void add_pieces(const SafetensorsFile& f, const std::string& path, OptimizerPieces& out) {
  std::map<std::pair<std::string, int64_t>, OptimizerPieces::Piece> found;  // (name, begin) → piece
  for (const auto& [key, t] : f.tensors) {
    if (key.rfind("step.", 0) == 0) {
      out.steps[key.substr(5)] = t.item<int64_t>();
      continue;
    }
    int which = key.rfind("exp_avg.", 0) == 0 ? 0 : key.rfind("exp_avg_sq.", 0) == 0 ? 1 : -1;
    if (which < 0) continue;  // max_exp_avg_sq (amsgrad) is not sharded
    PieceKey k = parse_piece_key(key.substr(which == 0 ? 8 : 11));
    if (k.end < 0) k.end = t.numel();
    if (t.numel() != k.end - k.begin)
      throw CheckpointError(fmt::format("{}: {} has {} elements, its range says {}", path, key, t.numel(), k.end - k.begin));
    auto& p = found[{k.name, k.begin}];
    p.begin = k.begin;
    p.end = k.end;
    (which == 0 ? p.exp_avg : p.exp_avg_sq) = t.reshape(-1);
  }
  for (auto& [key, p] : found) {
    if (!p.exp_avg.defined() || !p.exp_avg_sq.defined())
      throw CheckpointError(fmt::format("{}: {}[{}:{}] lacks exp_avg or exp_avg_sq", path, key.first, p.begin, p.end));
    out.pieces[key.first].push_back(std::move(p));
  }
}

}  // namespace

OptimizerPieces read_optimizer_pieces(const std::string& ckpt_dir) {
  OptimizerPieces out;
  const std::string full = ckpt_dir + "/optimizer.safetensors";
  std::error_code ec;
  if (fs::exists(full, ec)) {
    add_pieces(read_safetensors(full), full, out);
    return out;
  }
  // the shards: their world size from the first name, all of 0..W-1 required
  int64_t world = -1;
  for (const auto& e : fs::directory_iterator(ckpt_dir, ec)) {
    const std::string n = e.path().filename().string();
    int64_t r = 0, w = 0;
    if (std::sscanf(n.c_str(), "optimizer-zero-%ld-of-%ld.safetensors", &r, &w) == 2) world = w;
  }
  if (world <= 0) throw CheckpointError(fmt::format("{}: no optimizer.safetensors and no optimizer-zero-* shards", ckpt_dir));
  for (int64_t r = 0; r < world; ++r) {
    const std::string p = ckpt_dir + "/" + zero_shard_file_name(r, world);
    if (!fs::exists(p, ec)) throw CheckpointError(fmt::format("{}: optimizer shard {} of {} is missing ({})", ckpt_dir, r, world, p));
    add_pieces(read_safetensors(p), p, out);
  }
  for (auto& [name, list] : out.pieces)
    std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  return out;
}

torch::Tensor OptimizerPieces::assemble(const std::string& name, int which, int64_t begin, int64_t end,
                                        const std::string& where) const {
  auto it = pieces.find(name);
  if (it == pieces.end()) throw CheckpointError(fmt::format("{}: no optimizer moments for {}", where, name));
  std::vector<torch::Tensor> parts;
  int64_t at = begin;
  for (const auto& p : it->second) {  // sorted by begin
    if (p.end <= at || p.begin > at) continue;
    const torch::Tensor& src = which == 0 ? p.exp_avg : p.exp_avg_sq;
    const int64_t stop = std::min(end, p.end);
    parts.push_back(src.slice(0, at - p.begin, stop - p.begin));
    at = stop;
    if (at == end) break;
  }
  if (at != end)
    throw CheckpointError(fmt::format("{}: the optimizer moments of {} do not cover element {} (a shard is missing or damaged)",
                                      where, name, at));
  return parts.size() == 1 ? parts[0] : torch::cat(parts);
}

// --- the optimizer -----------------------------------------------------------------------

ZeroAdamW::ZeroAdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg,
                     ProcessGroup& pg, bool bf16_weights)
    : pg_(pg), lr_(cfg.lr), cfg_(cfg) {
  // (dtype, a weight matrix to be cast to bf16) → parameters; map order: the same on every rank
  std::map<std::pair<c10::ScalarType, bool>, std::vector<int64_t>> by_dtype;
  for (const auto& [name, p] : named) {
    if (!p.requires_grad()) continue;
    const bool matrix = bf16_weights && stored_in_bf16(p);
    by_dtype[{p.scalar_type(), matrix}].push_back(static_cast<int64_t>(params_.size()));
    names_.push_back(name);
    params_.push_back(p);
    decay_.push_back(weight_decayed(p));
  }
  active_.assign(params_.size(), false);
  steps_.assign(params_.size(), 0);
  for (auto& [key, ids] : by_dtype) {
    Space s;
    s.params = ids;
    s.matrices = key.second;
    std::vector<int64_t> numels;
    for (int64_t i : ids) numels.push_back(params_[static_cast<size_t>(i)].numel());
    s.layout = zero_shard_layout(numels, pg.world_size());
    s.mine = s.layout.fragments(pg.rank());
    auto opts = params_[static_cast<size_t>(ids[0])].options();
    s.grad = torch::zeros({s.layout.shard_numel}, opts);
    s.exp_avg = torch::zeros({s.layout.shard_numel}, opts);
    s.exp_avg_sq = torch::zeros({s.layout.shard_numel}, opts);
    spaces_.push_back(std::move(s));
  }
}

int64_t ZeroAdamW::state_bytes() const {
  int64_t b = 0;
  for (const auto& s : spaces_)
    b += s.grad.nbytes() + s.exp_avg.nbytes() + s.exp_avg_sq.nbytes() + (s.master.defined() ? s.master.nbytes() : 0);
  return b;
}

void ZeroAdamW::copy_fragments(const Space& s, torch::Tensor& shard) const {
  for (const auto& f : s.mine) {
    const torch::Tensor& p = params_[static_cast<size_t>(s.params[static_cast<size_t>(f.param)])];
    shard.slice(0, f.shard_offset, f.shard_offset + (f.end - f.begin)).copy_(p.detach().view(-1).slice(0, f.begin, f.end));
  }
}

void ZeroAdamW::use_bf16_params() {
  torch::NoGradGuard no_grad;
  for (auto& s : spaces_) {
    if (!s.matrices || s.master.defined()) continue;
    TORCH_CHECK(s.grad.scalar_type() == torch::kFloat, "ZeroAdamW::use_bf16_params: the masters come from fp32 parameters");
    s.master = torch::zeros({s.layout.shard_numel}, s.grad.options());
    copy_fragments(s, s.master);
    if (cfg_.moment_dtype == "bf16") {  // optim.moment_dtype: the matrices' moments stored in bf16
      s.exp_avg = s.exp_avg.to(torch::kBFloat16);
      s.exp_avg_sq = s.exp_avg_sq.to(torch::kBFloat16);
    }
    std::vector<torch::Tensor> ps;
    for (int64_t i : s.params) ps.push_back(params_[static_cast<size_t>(i)]);
    cast_params_to_bf16(ps);
  }
}

std::unique_ptr<ParamSwap> ZeroAdamW::expose_masters() {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> params, full_values;
  for (auto& s : spaces_) {
    if (!s.master.defined()) continue;
    torch::Tensor full = torch::empty({s.layout.shard_numel * s.layout.world}, s.master.options());
    pg_.all_gather(full, s.master);
    for (size_t k = 0; k < s.params.size(); ++k) {
      const torch::Tensor& p = params_[static_cast<size_t>(s.params[k])];
      params.push_back(p);
      full_values.push_back(full.slice(0, s.layout.offsets[k], s.layout.offsets[k] + s.layout.numels[k]).view(p.sizes()));
    }
  }
  if (params.empty()) return nullptr;
  return std::make_unique<ParamSwap>(params, full_values);
}

void ZeroAdamW::reduce_gradients() {
  torch::NoGradGuard no_grad;
  // which parameters have a gradient on any rank (as ProcessGroup::average_gradients decides)
  auto has = torch::zeros({static_cast<int64_t>(params_.size())}, torch::kUInt8);
  auto* h = has.data_ptr<uint8_t>();
  for (size_t i = 0; i < params_.size(); ++i) h[i] = params_[i].grad().defined() ? 1 : 0;
  pg_.all_reduce(has, ReduceOp::kMax);
  for (size_t i = 0; i < params_.size(); ++i) active_[i] = h[i] != 0;
  for (auto& s : spaces_) {
    // the full flat gradient (zeros for missing gradients and the padding), summed into
    // shards, in the parameters' dtype (bf16 weights: half the bytes), averaged in fp32
    torch::Tensor full = torch::zeros({s.layout.shard_numel * s.layout.world}, s.grad.options().dtype(s.comm_dtype()));
    for (size_t k = 0; k < s.params.size(); ++k) {
      torch::Tensor& p = params_[static_cast<size_t>(s.params[k])];
      if (!p.grad().defined()) continue;
      full.slice(0, s.layout.offsets[k], s.layout.offsets[k] + s.layout.numels[k]).copy_(p.grad().reshape(-1));
      p.mutable_grad() = torch::Tensor();  // the shard is all this rank keeps
    }
    if (s.comm_dtype() == s.grad.scalar_type()) {
      pg_.reduce_scatter(s.grad, full);
    } else {
      torch::Tensor summed = torch::empty({s.layout.shard_numel}, full.options());
      pg_.reduce_scatter(summed, full);
      s.grad.copy_(summed);
    }
    s.grad.div_(static_cast<double>(pg_.world_size()));
  }
}

double ZeroAdamW::clip_grad_norm(double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> sq;
  for (const auto& s : spaces_) sq.push_back(s.grad.to(torch::kFloat64).square().sum());
  torch::Tensor total = torch::stack(sq).sum().to(torch::kCPU);
  pg_.all_reduce(total, ReduceOp::kSum);
  const double norm = std::sqrt(total.item<double>());
  if (max_norm > 0.0 && std::isfinite(max_norm)) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (auto& s : spaces_) s.grad.mul_(coef);
  }
  return norm;
}

void ZeroAdamW::step() {
  torch::NoGradGuard no_grad;
  const double b1 = cfg_.betas[0], b2 = cfg_.betas[1];
  for (size_t i = 0; i < params_.size(); ++i)
    if (active_[i]) ++steps_[i];  // every rank counts every parameter (replicated scalars)
  for (auto& s : spaces_) {
    // bf16-stored moments: AdamW's arithmetic on fp32 copies, rounded back after (the
    // replicated MasterWeights' reference does the same)
    const bool round_moments = s.exp_avg.scalar_type() != torch::kFloat;
    torch::Tensor exp_avg = round_moments ? s.exp_avg.to(torch::kFloat) : s.exp_avg;
    torch::Tensor exp_avg_sq = round_moments ? s.exp_avg_sq.to(torch::kFloat) : s.exp_avg_sq;
    // this rank's fragments with a gradient, in two groups like build_optimizer's
    for (int decay = 1; decay >= 0; --decay) {
      const double wd = decay ? cfg_.weight_decay : 0.0;
      std::vector<torch::Tensor> ps, gs, ms, vs;
      std::vector<int64_t> st;
      for (const auto& f : s.mine) {
        const size_t i = static_cast<size_t>(s.params[static_cast<size_t>(f.param)]);
        if (!active_[i] || decay_[i] != (decay == 1)) continue;
        const int64_t n = f.end - f.begin;
        ps.push_back(s.master.defined() ? s.master.slice(0, f.shard_offset, f.shard_offset + n)
                                        : params_[i].detach().view(-1).slice(0, f.begin, f.end));
        gs.push_back(s.grad.slice(0, f.shard_offset, f.shard_offset + n));
        ms.push_back(exp_avg.slice(0, f.shard_offset, f.shard_offset + n));
        vs.push_back(exp_avg_sq.slice(0, f.shard_offset, f.shard_offset + n));
        st.push_back(steps_[i]);
      }
      if (ps.empty()) continue;
      if (ps[0].is_cuda() && ps[0].scalar_type() == torch::kFloat) {
        // FusedAdamW's kernel (trainer/optim.cpp) on the fragments: 1-D views into the
        // parameters and the shard buffers, updated in place
        std::vector<float> stf(st.begin(), st.end());
        const std::vector<torch::Tensor> step_tensors = torch::tensor(stf).to(ps[0].device()).unbind(0);
        at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, step_tensors, lr_, b1, b2, wd, cfg_.eps,
                          /*amsgrad=*/false, /*maximize=*/false);
        continue;
      }
      // the reference: torch::optim::AdamW::step's arithmetic, fragment by fragment
      for (size_t k = 0; k < ps.size(); ++k) {
        if (wd != 0.0) ps[k].mul_(1 - lr_ * wd);
        const double bc1 = 1 - std::pow(b1, static_cast<double>(st[k]));
        const double bc2 = 1 - std::pow(b2, static_cast<double>(st[k]));
        ms[k].mul_(b1).add_(gs[k], 1 - b1);
        vs[k].mul_(b2).addcmul_(gs[k], gs[k], 1 - b2);
        torch::Tensor denom = (vs[k].sqrt() / std::sqrt(bc2)).add_(cfg_.eps);
        ps[k].addcdiv_(ms[k], denom, -lr_ / bc1);
      }
    }
    if (round_moments) {
      s.exp_avg.copy_(exp_avg);
      s.exp_avg_sq.copy_(exp_avg_sq);
    }
    // all-gather: every rank's updated fragments → every parameter (bf16 weights: the
    // masters' bf16 rounding)
    const auto comm = s.grad.options().dtype(s.comm_dtype());
    torch::Tensor shard;
    if (s.master.defined()) {
      shard = s.master.to(s.comm_dtype());
    } else {
      shard = torch::zeros({s.layout.shard_numel}, comm);
      copy_fragments(s, shard);
    }
    torch::Tensor full = torch::empty({s.layout.shard_numel * s.layout.world}, comm);
    pg_.all_gather(full, shard);
    for (size_t k = 0; k < s.params.size(); ++k) {
      torch::Tensor p = params_[static_cast<size_t>(s.params[k])].detach();
      p.view(-1).copy_(full.slice(0, s.layout.offsets[k], s.layout.offsets[k] + s.layout.numels[k]));
    }
  }
}

std::vector<std::pair<std::string, torch::Tensor>> ZeroAdamW::shard_tensors() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i)
    if (steps_[i] > 0) out.emplace_back("step." + names_[i], torch::tensor(steps_[i], torch::kInt64));
  for (const auto& s : spaces_)
    for (const auto& f : s.mine) {
      const size_t i = static_cast<size_t>(s.params[static_cast<size_t>(f.param)]);
      if (steps_[i] == 0) continue;  // never had a gradient: no state, as AdamW
      const int64_t n = f.end - f.begin;
      const std::string range = fmt::format("[{}:{}]", f.begin, f.end);
      out.emplace_back("exp_avg." + names_[i] + range,
                       s.exp_avg.slice(0, f.shard_offset, f.shard_offset + n).to(torch::kCPU).clone());
      out.emplace_back("exp_avg_sq." + names_[i] + range,
                       s.exp_avg_sq.slice(0, f.shard_offset, f.shard_offset + n).to(torch::kCPU).clone());
    }
  return out;
}

void ZeroAdamW::load(const OptimizerPieces& pieces, const std::string& where) {
  torch::NoGradGuard no_grad;
  for (const auto& s : spaces_)
    TORCH_CHECK(!s.master.defined(), "ZeroAdamW::load: load before use_bf16_params (the masters come from the loaded weights)");
  for (size_t i = 0; i < params_.size(); ++i) {
    auto it = pieces.steps.find(names_[i]);
    steps_[i] = it == pieces.steps.end() ? 0 : it->second;
  }
  for (auto& s : spaces_) {
    s.exp_avg.zero_();
    s.exp_avg_sq.zero_();
    for (const auto& f : s.mine) {
      const size_t i = static_cast<size_t>(s.params[static_cast<size_t>(f.param)]);
      if (steps_[i] == 0) continue;
      const int64_t n = f.end - f.begin;
      for (int which = 0; which < 2; ++which) {
        torch::Tensor src = pieces.assemble(names_[i], which, f.begin, f.end, where);
        (which == 0 ? s.exp_avg : s.exp_avg_sq).slice(0, f.shard_offset, f.shard_offset + n).copy_(src);
      }
    }
  }
}

ModelOptimizer build_model_optimizer(torch::nn::Module& model, const ExperimentConfig& cfg, ProcessGroup& pg) {
  ModelOptimizer o;
  o.bf16_weights = cfg.train.param_dtype == "bf16";
  o.moment_dtype = cfg.optim.moment_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat;
  o.split_masters = cfg.optim.master_storage == "split";
  if (cfg.distributed.zero_stage == 1) {
    std::vector<std::pair<std::string, torch::Tensor>> named;
    for (const auto& p : model.named_parameters()) named.emplace_back(p.key(), p.value());
    o.zero = std::make_unique<ZeroAdamW>(named, cfg.optim, pg, o.bf16_weights);
  } else {
    o.replicated = build_optimizer(model, cfg.optim);
  }
  return o;
}

void ModelOptimizer::use_bf16_weights(torch::nn::Module& model) {
  if (!bf16_weights) return;
  if (zero)
    zero->use_bf16_params();
  else if (!masters)
    masters = std::make_unique<MasterWeights>(bf16_weight_params(model), moment_dtype, split_masters);
}

void ModelOptimizer::step_replicated() {
  if (masters)
    masters->step(*replicated);
  else
    replicated->step();
}

std::unique_ptr<ParamSwap> ModelOptimizer::expose_fp32_weights() {
  if (zero) return zero->expose_masters();
  return masters ? masters->expose() : nullptr;
}

}  // namespace moetrain
