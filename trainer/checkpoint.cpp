#include "trainer/checkpoint.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <tuple>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ostream.h>
#include <nlohmann/json.hpp>

#include "data/hash.h"
#include "io/safetensors.h"
#include "trainer/config_tree.h"
#include "trainer/expert_parallel.h"
#include "trainer/distributed.h"
#include "trainer/zero.h"

namespace moetrain {

namespace fs = std::filesystem;

namespace {

// 2: the routed experts' gate and up projections stacked as experts.w13 [E, 2I, D] (1 had
// experts.w1 / experts.w3 [E, I, D]).
constexpr int kFormatVersion = 2;
// Every checkpoint has these, plus its optimizer state: optimizer.safetensors (one writer) or
// the ZeRO-1 shards optimizer-zero-<r>-of-<W>.safetensors, r = 0..W-1 (trainer/zero.h).
const char* const kFiles[] = {"model.safetensors", "rng.safetensors", "state.json", "config.yaml"};
const char* const kOptimizerFile = "optimizer.safetensors";

// The optimizer files a checkpoint needs, given the file names it has (on disk or in its
// MANIFEST): optimizer.safetensors, else every shard of the world size the shards name.
std::vector<std::string> optimizer_files(const std::vector<std::string>& have) {
  int64_t world = -1;
  for (const auto& n : have) {
    if (n == kOptimizerFile) return {kOptimizerFile};
    long r = 0, w = 0;
    if (std::sscanf(n.c_str(), "optimizer-zero-%ld-of-%ld.safetensors", &r, &w) == 2 && w > 0) world = w;
  }
  if (world < 0) return {kOptimizerFile};
  std::vector<std::string> out;
  for (int64_t r = 0; r < world; ++r) out.push_back(zero_shard_file_name(r, world));
  return out;
}

CheckpointFaultHook& fault_hook() {
  static CheckpointFaultHook hook;
  return hook;
}
void stage(const char* name, const std::string& path) {
  if (fault_hook()) fault_hook()(name, path);
}

[[noreturn]] void throw_errno(const std::string& what, const std::string& path) {
  throw std::runtime_error(fmt::format("{} {}: {}", what, path, std::strerror(errno)));
}

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) throw_errno("cannot open for fsync", path);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw_errno("fsync failed for", path);
}

void write_synced(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw_errno("cannot create", path);
  size_t done = 0;
  while (done < content.size()) {
    ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      throw_errno("cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw_errno("cannot fsync", path);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(fmt::format("cannot read {}", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string file_hash(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(fmt::format("cannot read {}", path));
  Fnv1a64 h;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(buf.data(), static_cast<size_t>(in.gcount()));
  }
  return h.hex();
}

// step-NNNNNNNN → N, anything else → -1 (dot-names, .tmp-*, latest, stray files).
int64_t parse_step_name(const std::string& name) {
  if (name.size() != 13 || name.compare(0, 5, "step-") != 0) return -1;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return -1;
  return std::stoll(name.substr(5));
}

// All step-* directories of root, newest first.
std::vector<std::pair<int64_t, fs::path>> step_dirs(const std::string& root) {
  std::vector<std::pair<int64_t, fs::path>> out;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return out;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    int64_t s = parse_step_name(e.path().filename().string());
    if (s >= 0 && e.is_directory(ec)) out.emplace_back(s, e.path());
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return out;
}

bool all_finite(const torch::Tensor& t) {
  if (!t.is_floating_point()) return true;
  return torch::isfinite(t).all().item<bool>();
}

torch::Tensor cpu_contiguous(const torch::Tensor& t) { return t.detach().to(torch::kCPU).contiguous(); }

// --- expert shard files: <prefix>-AAAAA-BBBBB.safetensors holds experts [A, B) ---------------
const char* const kExpertPrefix = "experts";
const char* const kOptimizerExpertPrefix = "optimizer-experts";

std::string shard_file_name(const char* prefix, int64_t first, int64_t end) {
  return fmt::format("{}-{:05d}-{:05d}.safetensors", prefix, first, end);
}

// "<prefix>-AAAAA-BBBBB.safetensors" -> [A, B); false for anything else.
bool parse_shard_file_name(const std::string& name, const std::string& prefix, int64_t& first, int64_t& end) {
  const std::string suffix = ".safetensors";
  if (name.size() != prefix.size() + 12 + suffix.size() || name.compare(0, prefix.size() + 1, prefix + "-") != 0 ||
      name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0 || name[prefix.size() + 6] != '-')
    return false;
  for (size_t i : {prefix.size() + 1, prefix.size() + 7})
    for (size_t j = i; j < i + 5; ++j)
      if (name[j] < '0' || name[j] > '9') return false;
  first = std::stoll(name.substr(prefix.size() + 1, 5));
  end = std::stoll(name.substr(prefix.size() + 7, 5));
  return first < end;
}

// The expert shard files in dir (both kinds), sorted.
std::vector<std::string> shard_files(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    int64_t a = 0, b = 0;
    if (parse_shard_file_name(n, kExpertPrefix, a, b) || parse_shard_file_name(n, kOptimizerExpertPrefix, a, b))
      out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// AdamW state of one parameter under its name (nothing when it never had a gradient).
void add_adamw_state(torch::optim::AdamW& optimizer, const std::string& name, const torch::Tensor& param,
                     std::vector<std::pair<std::string, torch::Tensor>>& out) {
  auto& opt_state = optimizer.state();
  auto it = opt_state.find(param.unsafeGetTensorImpl());
  if (it == opt_state.end()) return;  // never had a gradient
  auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
  out.emplace_back("exp_avg." + name, cpu_contiguous(s.exp_avg()));
  out.emplace_back("exp_avg_sq." + name, cpu_contiguous(s.exp_avg_sq()));
  out.emplace_back("step." + name, torch::tensor(s.step(), torch::kInt64));
  if (s.max_exp_avg_sq().defined()) out.emplace_back("max_exp_avg_sq." + name, cpu_contiguous(s.max_exp_avg_sq()));
}

// The routed-expert rows [first, first + count) of a checkpoint's tensors, assembled from the
// unsharded file (`whole`, covering [0, E)) and the shard files of `prefix` that overlap;
// n_experts is the model's E (a checkpoint of another E is refused).
class ExpertSources {
 public:
  ExpertSources(const std::string& dir, const char* prefix, const SafetensorsFile* whole, int64_t first, int64_t count,
                int64_t n_experts)
      : dir_(dir), whole_(whole), n_experts_(n_experts) {
    for (const auto& n : shard_files(dir)) {
      int64_t a = 0, b = 0;
      if (!parse_shard_file_name(n, prefix, a, b) || b <= first || a >= first + count) continue;
      shards_.push_back({a, b, read_safetensors(dir + "/" + n), n});
    }
  }
  // Undefined when no file has `name`; CheckpointError when the files leave a gap.
  torch::Tensor rows(const std::string& name, int64_t first, int64_t count) const {
    std::vector<std::tuple<int64_t, int64_t, const torch::Tensor*>> pieces;
    if (whole_ && whole_->contains(name)) {  // unsharded: slice it, or hand it over whole for the caller's shape check
      const torch::Tensor& t = whole_->at(name);
      if (t.dim() == 0 || t.size(0) != n_experts_ || (first == 0 && count == n_experts_)) return t;
      return t.narrow(0, first, count);
    }
    for (const auto& s : shards_) {
      if (!s.file.contains(name)) continue;
      const torch::Tensor& t = s.file.at(name);
      if (t.dim() == 0 || t.size(0) != s.end - s.first)
        throw CheckpointError(fmt::format("{}/{}: {} has {} rows, the file name says {}", dir_, s.name, name,
                                          t.dim() ? t.size(0) : 0, s.end - s.first));
      pieces.emplace_back(s.first, s.end, &t);
    }
    if (pieces.empty()) return {};
    for (const auto& [a, b, t] : pieces)
      if (b > n_experts_)
        throw CheckpointError(fmt::format("{}: {} holds experts [{}, {}), the model has {} experts", dir_, name, a, b,
                                          n_experts_));
    std::sort(pieces.begin(), pieces.end());
    std::vector<torch::Tensor> parts;
    int64_t at = first;
    const int64_t end = first + count;
    for (const auto& [a, b, t] : pieces) {
      if (at == end || a > at) break;
      if (b <= at) continue;
      const int64_t hi = std::min(b, end);
      parts.push_back(t->narrow(0, at - a, hi - at));
      at = hi;
    }
    if (at != end)
      throw CheckpointError(fmt::format("{}: experts [{}, {}) of {} are in no file (a missing shard?)", dir_, at, end, name));
    return parts.size() == 1 ? parts[0] : torch::cat(parts);
  }
  // A scalar (AdamW step) of any file covering these experts, or nullptr.
  const torch::Tensor* any(const std::string& name) const {
    if (whole_ && whole_->contains(name)) return &whole_->at(name);
    for (const auto& s : shards_)
      if (s.file.contains(name)) return &s.file.at(name);
    return nullptr;
  }

 private:
  struct Shard {
    int64_t first, end;
    SafetensorsFile file;
    std::string name;
  };
  std::string dir_;
  const SafetensorsFile* whole_;
  int64_t n_experts_;
  std::vector<Shard> shards_;
};

// How many routed experts per layer `model` holds (0 without MoE layers).
int64_t experts_held(Transformer& model) {
  for (const auto& p : model->named_parameters())
    if (ep_is_expert_param(p.key())) return p.value().size(0);
  return 0;
}

// A config tree flattened to dotted key → scalar text (lists joined by commas).
void flatten(const ConfigNode& n, const std::string& prefix, std::map<std::string, std::string>& out) {
  switch (n.kind) {
    case ConfigNode::Kind::kMap:
      for (const auto& [k, v] : n.map) flatten(v, prefix.empty() ? k : prefix + "." + k, out);
      break;
    case ConfigNode::Kind::kSeq: {
      std::string s = "[";
      for (size_t i = 0; i < n.seq.size(); ++i) s += (i ? "," : "") + n.seq[i].scalar;
      out[prefix] = s + "]";
      break;
    }
    case ConfigNode::Kind::kScalar: out[prefix] = n.scalar; break;
    case ConfigNode::Kind::kNull: out[prefix] = "null"; break;
  }
}

// Keys that decide whether a checkpoint's tensors mean the same thing in this run.
bool shape_relevant(const std::string& key) {
  return key.rfind("model.", 0) == 0 || key == "balance.strategy";
}

std::vector<std::string> config_diff(const std::string& saved_yaml_path, const ExperimentConfig& cfg) {
  std::map<std::string, std::string> saved, now;
  flatten(parse_yaml_file(saved_yaml_path), "", saved);
  flatten(parse_yaml_string(config_to_yaml(cfg), "current config"), "", now);
  std::vector<std::string> diffs;
  std::map<std::string, bool> keys;
  for (const auto& [k, v] : saved) keys[k] = true;
  for (const auto& [k, v] : now) keys[k] = true;
  for (const auto& [k, unused] : keys) {
    if (!shape_relevant(k)) continue;
    auto a = saved.find(k), b = now.find(k);
    std::string av = a == saved.end() ? "(absent)" : a->second, bv = b == now.end() ? "(absent)" : b->second;
    if (av != bv) diffs.push_back(fmt::format("  {}: checkpoint {} ≠ config {}", k, av, bv));
  }
  return diffs;
}

}  // namespace

// --- loss spikes ---------------------------------------------------------------------

bool LossSpikeDetector::observe(double loss) {
  if (!std::isfinite(loss)) return false;
  bool spike = false;
  if (!recent_.empty() && factor_ > 0.0) spike = loss > factor_ * *std::max_element(recent_.begin(), recent_.end());
  recent_.push_back(loss);
  while (recent_.size() > window_) recent_.pop_front();
  return spike;
}

void LossSpikeDetector::restore(const std::vector<double>& recent) {
  recent_.assign(recent.begin(), recent.end());
  while (recent_.size() > window_) recent_.pop_front();
}

// --- save ----------------------------------------------------------------------------

std::string checkpoint_dir_name(int64_t step) { return fmt::format("step-{:08d}", step); }

void set_checkpoint_fault_hook(CheckpointFaultHook hook) { fault_hook() = std::move(hook); }

std::string checkpoint_temp_dir(const std::string& root, int64_t step, int64_t job) {
  return (fs::path(root) / fmt::format(".tmp-{}-{}", checkpoint_dir_name(step), job)).string();
}

void begin_checkpoint(const std::string& root, const std::string& tmp) {
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) throw std::runtime_error(fmt::format("cannot create checkpoint.dir {}: {}", root, ec.message()));
  // a crashed writer's leftovers (one committer per checkpoint.dir, so none is in progress)
  for (const auto& e : fs::directory_iterator(root, ec))
    if (e.path().filename().string().rfind(".tmp-step-", 0) == 0) fs::remove_all(e.path(), ec);
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp);
}

void save_expert_shard(const std::string& tmp, Transformer& model, torch::optim::AdamW& optimizer,
                       const ExpertShard& shard) {
  std::vector<std::pair<std::string, torch::Tensor>> weights, state;
  for (const auto& p : model->named_parameters()) {
    if (!ep_is_expert_param(p.key())) continue;
    weights.emplace_back(p.key(), cpu_contiguous(p.value()));
    if (!all_finite(weights.back().second))
      throw std::runtime_error(fmt::format("refusing to checkpoint: {} (experts [{}, {})) has non-finite values", p.key(),
                                           shard.first, shard.first + shard.count));
    add_adamw_state(optimizer, p.key(), p.value(), state);
  }
  const std::map<std::string, std::string> meta = {
      {"format", "moetrain"}, {"experts", fmt::format("{}-{}", shard.first, shard.first + shard.count)}};
  write_safetensors(tmp + "/" + shard_file_name(kExpertPrefix, shard.first, shard.first + shard.count), weights, meta);
  write_safetensors(tmp + "/" + shard_file_name(kOptimizerExpertPrefix, shard.first, shard.first + shard.count), state,
                    meta);
}

namespace {

// save_checkpoint's body. write_optimizer(tmp) writes this process's optimizer file(s). With
// `pg` (ZeRO-1) every rank calls it: rank 0 prepares the temporary directory (a name all ranks
// know) and writes the model, a barrier, every rank writes its optimizer shard, a barrier,
// then rank 0 alone writes the rest, the MANIFEST over all files, and commits. A checkpoint is
// thus complete only when every shard is written. (Several nodes need a shared checkpoint.dir.)
// With shard.count > 0 (expert parallelism, one writer: rank 0) the routed-expert tensors are
// left out of model.safetensors and the temporary directory of `job` already exists, holding
// the expert shard files (ExpertParallel::save_checkpoint).
std::string save_checkpoint_impl(const ExperimentConfig& cfg, Transformer& model, const TrainingState& state,
                                 const std::function<void(const std::string& tmp)>& write_optimizer, ProcessGroup* pg,
                                 const ExpertShard& shard = {}, int64_t job = 0) {
  const bool writer = !pg || pg->is_main();
  const bool sharded = shard.count > 0;  // expert tensors are in their shard files
  const std::string root = cfg.checkpoint.dir;
  const std::string name = checkpoint_dir_name(state.step);
  const std::string tmp = sharded ? checkpoint_temp_dir(root, state.step, job)
                                  : (fs::path(root) / (pg ? fmt::format(".tmp-{}-zero", name)
                                                          : fmt::format(".tmp-{}-{}", name, ::getpid())))
                                        .string();
  if (!writer) {
    pg->barrier();  // rank 0 made tmp
    write_optimizer(tmp);
    pg->barrier();  // rank 0 commits
    return "";
  }
  std::vector<std::pair<std::string, torch::Tensor>> model_tensors;
  for (const auto& p : model->named_parameters())
    if (!sharded || !ep_is_expert_param(p.key())) model_tensors.emplace_back(p.key(), cpu_contiguous(p.value()));
  for (const auto& b : model->named_buffers()) model_tensors.emplace_back(b.key(), cpu_contiguous(b.value()));
  // a checkpoint must be something worth resuming: never persist a diverged model
  for (const auto& [n, t] : model_tensors)
    if (!all_finite(t))
      throw std::runtime_error(fmt::format("refusing to checkpoint step {}: {} has non-finite values", state.step, n));

  std::error_code ec;
  if (!sharded) begin_checkpoint(root, tmp);
  else if (!fs::is_directory(tmp, ec)) throw std::runtime_error(fmt::format("checkpoint: {} does not exist", tmp));

  write_safetensors(tmp + "/model.safetensors", model_tensors, {{"format", "moetrain"}});
  stage("model.safetensors", tmp + "/model.safetensors");

  if (pg) pg->barrier();
  write_optimizer(tmp);
  if (pg) pg->barrier();  // every shard is written
  stage("optimizer.safetensors", tmp + (pg ? "" : "/optimizer.safetensors"));

  std::vector<std::pair<std::string, torch::Tensor>> rng;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng.emplace_back("cpu", gen.get_state().contiguous());
  }
  if (cfg.train.device == "cuda" && torch::cuda::is_available()) {
    const auto& gen = at::globalContext().defaultGenerator(c10::DeviceType::CUDA);
    auto g = gen;  // Generator is a shared handle
    std::lock_guard<std::mutex> lock(g.mutex());
    rng.emplace_back("cuda", g.get_state().contiguous());
  }
  write_safetensors(tmp + "/rng.safetensors", rng);

  nlohmann::json js = {{"format_version", kFormatVersion},
                       {"moetrain_version", MOETRAIN_VERSION},
                       {"config_hash", config_hash(cfg)},
                       {"step", state.step},
                       {"lr_step", state.step},
                       {"tokens", state.data.tokens},
                       {"data", state.data},
                       {"skipped_steps", state.skipped_steps},
                       {"consecutive_skips", state.consecutive_skips},
                       {"loss_spike", {{"factor", cfg.checkpoint.spike_factor}, {"recent_losses", state.recent_losses}}},
                       {"balancer", "counts are zero at step boundaries; biases are router buffers in model.safetensors"},
                       {"device", cfg.train.device}};
  write_synced(tmp + "/state.json", js.dump(2) + "\n");
  write_synced(tmp + "/config.yaml", config_to_yaml(cfg));

  stage("before_manifest", tmp);
  write_manifest(tmp);
  fsync_path(tmp, true);

  stage("before_rename", tmp);
  const std::string final_dir = (fs::path(root) / name).string();
  std::string old_aside;
  if (fs::exists(final_dir)) {  // re-saving a step: move the old one aside (a dot-name: never a checkpoint)
    old_aside = (fs::path(root) / fmt::format(".old-{}-{}", name, ::getpid())).string();
    fs::remove_all(old_aside, ec);
    if (::rename(final_dir.c_str(), old_aside.c_str()) != 0) throw_errno("cannot move aside", final_dir);
  }
  if (::rename(tmp.c_str(), final_dir.c_str()) != 0) throw_errno("cannot commit", final_dir);
  fsync_path(root, true);
  if (!old_aside.empty()) fs::remove_all(old_aside, ec);

  stage("before_latest", final_dir);
  const std::string latest_tmp = (fs::path(root) / fmt::format(".latest-{}", ::getpid())).string();
  write_synced(latest_tmp, name + "\n");
  const std::string latest = (fs::path(root) / "latest").string();
  if (::rename(latest_tmp.c_str(), latest.c_str()) != 0) throw_errno("cannot update", latest);
  fsync_path(root, true);

  // retention, only now that the new one is committed and named by `latest`
  stage("before_prune", final_dir);
  const auto dirs = step_dirs(root);
  const size_t keep = static_cast<size_t>(std::max<int64_t>(1, cfg.checkpoint.keep_last));
  for (size_t i = keep; i < dirs.size(); ++i) {
    if (dirs[i].second.filename() == name) continue;  // never the one just written
    fs::remove_all(dirs[i].second, ec);
    if (ec) std::cerr << fmt::format("warning: could not delete old checkpoint {}: {}\n", dirs[i].second.string(), ec.message());
  }
  return final_dir;
}

}  // namespace

std::string save_checkpoint(const ExperimentConfig& cfg, Transformer& model, torch::optim::AdamW& optimizer,
                            const TrainingState& state, const ExpertShard& shard, int64_t job) {
  const bool sharded = shard.count > 0;  // the experts' state is in optimizer-experts-* files
  auto write_optimizer = [&](const std::string& tmp) {
    std::vector<std::pair<std::string, torch::Tensor>> opt_tensors;
    for (const auto& p : model->named_parameters())
      if (!sharded || !ep_is_expert_param(p.key())) add_adamw_state(optimizer, p.key(), p.value(), opt_tensors);
    write_safetensors(tmp + "/optimizer.safetensors", opt_tensors, {{"optimizer", "adamw"}});
  };
  return save_checkpoint_impl(cfg, model, state, write_optimizer, nullptr, shard, job);
}

std::string save_checkpoint(const ExperimentConfig& cfg, Transformer& model, ZeroAdamW& optimizer,
                            const TrainingState& state, ProcessGroup& pg) {
  auto write_optimizer = [&](const std::string& tmp) {
    write_safetensors(tmp + "/" + zero_shard_file_name(pg.rank(), pg.world_size()), optimizer.shard_tensors(),
                      {{"optimizer", "adamw-zero1"}, {"rank", std::to_string(pg.rank())},
                       {"world_size", std::to_string(pg.world_size())}});
  };
  return save_checkpoint_impl(cfg, model, state, write_optimizer, &pg);
}

// --- verify / find ---------------------------------------------------------------------

void write_manifest(const std::string& ckpt_dir) {
  std::string manifest;
  std::vector<std::string> files(std::begin(kFiles), std::end(kFiles)), present;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(ckpt_dir, ec)) present.push_back(e.path().filename().string());
  for (const auto& f : optimizer_files(present)) files.push_back(f);
  for (const auto& f : shard_files(ckpt_dir)) files.push_back(f);  // expert parallelism
  for (const auto& f : files) {
    const std::string p = ckpt_dir + "/" + f;
    fsync_path(p, false);  // write_safetensors fsyncs too; cheap to be sure
    manifest += fmt::format("{} {} {}\n", file_hash(p), fs::file_size(p), f);
  }
  write_synced(ckpt_dir + "/MANIFEST", manifest);
}

void verify_manifest(const std::string& ckpt_dir) {
  const std::string mpath = ckpt_dir + "/MANIFEST";
  std::error_code ec;
  if (!fs::is_regular_file(mpath, ec)) throw CheckpointError(fmt::format("{}: no MANIFEST (incomplete checkpoint)", ckpt_dir));
  std::istringstream in(read_text(mpath));
  std::map<std::string, std::pair<std::string, uint64_t>> listed;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::istringstream ls(line);
    std::string hash, file;
    uint64_t size = 0;
    if (!(ls >> hash >> size >> file)) throw CheckpointError(fmt::format("{}: malformed MANIFEST line '{}'", ckpt_dir, line));
    listed[file] = {hash, size};
  }
  // the files every checkpoint needs (its optimizer ones: optimizer.safetensors or all ZeRO-1
  // shards) must be listed; every listed file (expert shard files included) is verified
  std::vector<std::string> files(std::begin(kFiles), std::end(kFiles)), names;
  for (const auto& [f, unused] : listed) names.push_back(f);
  for (const auto& f : optimizer_files(names)) files.push_back(f);
  for (const auto& f : files)
    if (!listed.count(f)) throw CheckpointError(fmt::format("{}: MANIFEST does not list {}", ckpt_dir, f));
  for (auto it = listed.begin(); it != listed.end(); ++it) {
    const std::string& f = it->first;
    if (f.find('/') != std::string::npos) throw CheckpointError(fmt::format("{}: MANIFEST names a path '{}'", ckpt_dir, f));
    const std::string p = ckpt_dir + "/" + f;
    if (!fs::is_regular_file(p, ec)) throw CheckpointError(fmt::format("{}: {} is missing", ckpt_dir, f));
    const uint64_t size = fs::file_size(p, ec);
    if (size != it->second.second)
      throw CheckpointError(fmt::format("{}: {} has {} bytes, MANIFEST says {} (truncated or damaged)", ckpt_dir, f, size,
                                        it->second.second));
    const std::string h = file_hash(p);
    if (h != it->second.first)
      throw CheckpointError(
          fmt::format("{}: {} checksum mismatch (fnv1a64 {}, MANIFEST says {}): the file is damaged", ckpt_dir, f, h,
                      it->second.first));
  }
}

std::string find_latest_checkpoint(const std::string& root) {
  const auto dirs = step_dirs(root);
  if (dirs.empty()) return "";
  const std::string latest = (fs::path(root) / "latest").string();
  std::error_code ec;
  if (fs::exists(latest, ec)) {
    std::string name = read_text(latest);
    while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
    std::string why;
    if (parse_step_name(name) < 0) {
      why = fmt::format("'{}' is not a step-<8 digits> name", name.substr(0, 64));
    } else {
      const std::string dir = (fs::path(root) / name).string();
      try {
        verify_manifest(dir);
        return dir;
      } catch (const CheckpointError& e) {
        why = e.what();
      }
    }
    std::cerr << fmt::format("warning: {} is not usable ({}); scanning for the newest complete checkpoint\n", latest, why);
  }
  std::string errors;
  for (const auto& [step, dir] : dirs) {
    try {
      verify_manifest(dir.string());
      return dir.string();
    } catch (const CheckpointError& e) {
      std::cerr << "warning: skipping " << e.what() << "\n";
      errors += std::string("\n  ") + e.what();
    }
  }
  throw CheckpointError(fmt::format("no complete checkpoint in {}:{}", root, errors));
}

namespace {

// Appends to `diffs` every name / shape / dtype difference between model.safetensors and the
// model; copies the weights only when there is none, else throws CheckpointError with all of them.
// Routed-expert tensors hold experts [expert_first, + their rows) (expert parallelism), assembled
// from model.safetensors or the expert shard files.
void copy_model_weights(const std::string& ckpt_dir, Transformer& model, std::vector<std::string> diffs,
                        const char* what, int64_t expert_first = 0) {
  if (fs::exists(ckpt_dir + "/state.json")) {
    int64_t saved = 0;
    try {
      saved = nlohmann::json::parse(read_text(ckpt_dir + "/state.json")).value("format_version", int64_t{0});
    } catch (const nlohmann::json::exception&) {
      // load_rng_and_state reports a malformed state.json
    }
    if (saved != kFormatVersion)
      diffs.push_back(fmt::format("  state.json: format_version {}, this build reads {}{}", saved, kFormatVersion,
                                  saved == 1 ? " (format 1 stored the routed experts as experts.w1 / experts.w3; "
                                               "format 2 stacks them as experts.w13 [E, 2I, D])"
                                             : ""));
  }
  SafetensorsFile mf = read_safetensors(ckpt_dir + "/model.safetensors");
  const ExpertSources experts(ckpt_dir, kExpertPrefix, &mf, expert_first, experts_held(model),
                              model->cfg.n_routed_experts);
  std::map<std::string, const torch::Tensor*> saved;
  for (const auto& [n, t] : mf.tensors) saved[n] = &t;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> assign;
  auto check = [&](const std::string& n, const torch::Tensor& target) {
    auto it = saved.find(n);
    torch::Tensor t;
    if (ep_is_expert_param(n) && target.dim() > 0) {
      t = experts.rows(n, expert_first, target.size(0));
      if (it != saved.end()) saved.erase(it);
    } else if (it != saved.end()) {
      t = *it->second;
      saved.erase(it);
    }
    if (!t.defined()) {
      diffs.push_back(fmt::format("  {}: missing from the checkpoint (model has {})", n, fmt::format("{}", fmt::streamed(target.sizes()))));
      return;
    }
    if (t.sizes() != target.sizes() || t.scalar_type() != target.scalar_type())
      diffs.push_back(fmt::format("  {}: checkpoint {} {} ≠ model {} {}", n, fmt::streamed(t.sizes()),
                                  c10::toString(t.scalar_type()), fmt::streamed(target.sizes()),
                                  c10::toString(target.scalar_type())));
    else
      assign.emplace_back(target, t);
  };
  for (const auto& p : model->named_parameters()) check(p.key(), p.value());
  for (const auto& b : model->named_buffers()) check(b.key(), b.value());
  for (const auto& [n, t] : saved) diffs.push_back(fmt::format("  {}: in the checkpoint, not in the model", n));
  if (!diffs.empty()) {
    std::string msg = fmt::format("checkpoint {} {}:", ckpt_dir, what);
    for (const auto& d : diffs) msg += "\n" + d;
    throw CheckpointError(msg);
  }
  {
    torch::NoGradGuard no_grad;
    for (auto& [target, src] : assign) target.copy_(src);
  }
}

}  // namespace

std::string resolve_checkpoint_arg(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) throw CheckpointError(fmt::format("{}: no such checkpoint directory", path));
  std::string dir = path;
  if (!fs::exists(fs::path(path) / "MANIFEST", ec)) {
    dir = find_latest_checkpoint(path);
    if (dir.empty())
      throw CheckpointError(fmt::format("{}: neither a checkpoint (no MANIFEST) nor a directory of checkpoints (no step-*)",
                                        path));
  }
  verify_manifest(dir);
  return dir;
}

void load_model_weights(const std::string& ckpt_dir, Transformer& model) {
  copy_model_weights(ckpt_dir, model, {}, "does not match the model of its config.yaml");
}

std::string resolve_resume(const std::string& checkpoint_root, const std::string& resume) {
  if (resume.empty()) return "";
  if (resume == "auto") {
    std::string dir = find_latest_checkpoint(checkpoint_root);
    if (dir.empty()) std::cerr << fmt::format("resume auto: no checkpoint in {}, starting fresh\n", checkpoint_root);
    return dir;
  }
  std::error_code ec;
  if (!fs::is_directory(resume, ec)) throw CheckpointError(fmt::format("--resume {}: no such checkpoint directory", resume));
  if (fs::exists(fs::path(resume) / "MANIFEST", ec)) return resume;
  std::string dir = find_latest_checkpoint(resume);
  if (dir.empty()) throw CheckpointError(fmt::format("--resume {}: neither a checkpoint nor a directory of checkpoints", resume));
  return dir;
}

// --- load ------------------------------------------------------------------------------

namespace {

void load_verified_weights(const std::string& ckpt_dir, const ExperimentConfig& cfg, Transformer& model,
                           int64_t expert_first = 0) {
  verify_manifest(ckpt_dir);
  std::vector<std::string> diffs = config_diff(ckpt_dir + "/config.yaml", cfg);
  copy_model_weights(ckpt_dir, model, std::move(diffs), "does not match this config", expert_first);
}

// read_optimizer_pieces plus the expert shard files' AdamW state (optimizer-experts-A-B:
// rows [A, B) of an expert tensor are its flattened elements [A·r, B·r), r = elements per row).
OptimizerPieces read_all_optimizer_pieces(const std::string& ckpt_dir) {
  OptimizerPieces out = read_optimizer_pieces(ckpt_dir);
  bool added = false;
  for (const auto& n : shard_files(ckpt_dir)) {
    int64_t a = 0, b = 0;
    if (!parse_shard_file_name(n, kOptimizerExpertPrefix, a, b)) continue;
    const SafetensorsFile f = read_safetensors(ckpt_dir + "/" + n);
    std::map<std::string, OptimizerPieces::Piece> found;
    for (const auto& [key, t] : f.tensors) {
      if (key.rfind("step.", 0) == 0) {
        out.steps[key.substr(5)] = t.item<int64_t>();
        continue;
      }
      const int which = key.rfind("exp_avg.", 0) == 0 ? 0 : key.rfind("exp_avg_sq.", 0) == 0 ? 1 : -1;
      if (which < 0) continue;  // max_exp_avg_sq (amsgrad) is not sharded
      if (t.dim() == 0 || t.size(0) != b - a)
        throw CheckpointError(fmt::format("{}/{}: {} has {} rows, the file name says {}", ckpt_dir, n, key,
                                          t.dim() ? t.size(0) : 0, b - a));
      const int64_t per_row = t.numel() / (b - a);
      auto& p = found[key.substr(which == 0 ? 8 : 11)];
      p.begin = a * per_row;
      p.end = b * per_row;
      (which == 0 ? p.exp_avg : p.exp_avg_sq) = t.reshape(-1);
    }
    for (auto& [name, p] : found) {
      if (!p.exp_avg.defined() || !p.exp_avg_sq.defined())
        throw CheckpointError(fmt::format("{}/{}: {} lacks exp_avg or exp_avg_sq", ckpt_dir, n, name));
      out.pieces[name].push_back(std::move(p));
      added = true;
    }
  }
  if (added)
    for (auto& [name, list] : out.pieces)
      std::sort(list.begin(), list.end(), [](const auto& x, const auto& y) { return x.begin < y.begin; });
  return out;
}

TrainingState load_rng_and_state(const std::string& ckpt_dir, const ExperimentConfig& cfg);

}  // namespace

TrainingState load_checkpoint(const std::string& ckpt_dir, const ExperimentConfig& cfg, Transformer& model,
                              ZeroAdamW& optimizer) {
  load_verified_weights(ckpt_dir, cfg, model);
  // any writer's world size, stage 0's file, or an expert-parallel checkpoint's shards
  optimizer.load(read_all_optimizer_pieces(ckpt_dir), ckpt_dir);
  return load_rng_and_state(ckpt_dir, cfg);
}

TrainingState load_checkpoint(const std::string& ckpt_dir, const ExperimentConfig& cfg, Transformer& model,
                              torch::optim::AdamW& optimizer, const ExpertShard& shard) {
  load_verified_weights(ckpt_dir, cfg, model, shard.first);
  auto& opt_state = optimizer.state();
  opt_state.clear();
  std::error_code ec;
  if (!fs::exists(ckpt_dir + "/optimizer.safetensors", ec)) {  // a ZeRO-1 checkpoint: re-assemble the moments
    const OptimizerPieces pieces = read_optimizer_pieces(ckpt_dir);
    for (const auto& p : model->named_parameters()) {
      auto it = pieces.steps.find(p.key());
      if (it == pieces.steps.end()) continue;
      const torch::Tensor& param = p.value();
      // an expert-parallel model holds rows [shard.first, +rows) of an expert tensor
      int64_t begin = 0;
      if (ep_is_expert_param(p.key()) && param.dim() > 0 && param.size(0) > 0)
        begin = shard.first * (param.numel() / param.size(0));
      auto moment = [&](int which) {
        return pieces.assemble(p.key(), which, begin, begin + param.numel(), ckpt_dir)
            .view(param.sizes())
            .to(param.device(), param.scalar_type())
            .clone();
      };
      auto s = std::make_unique<torch::optim::AdamWParamState>();
      s->step(it->second);
      s->exp_avg(moment(0));
      s->exp_avg_sq(moment(1));
      opt_state[param.unsafeGetTensorImpl()] = std::move(s);
    }
    return load_rng_and_state(ckpt_dir, cfg);
  }

  // optimizer: replace the whole state, so parameters without saved state have none (as saved)
  SafetensorsFile of = read_safetensors(ckpt_dir + "/optimizer.safetensors");
  const ExpertSources experts(ckpt_dir, kOptimizerExpertPrefix, &of, shard.first, experts_held(model),
                              model->cfg.n_routed_experts);
  for (const auto& p : model->named_parameters()) {
    const std::string n = p.key();
    const torch::Tensor& param = p.value();
    const bool expert = ep_is_expert_param(n) && param.dim() > 0;
    const torch::Tensor* step = expert ? experts.any("step." + n) : (of.contains("step." + n) ? &of.at("step." + n) : nullptr);
    if (!step) continue;
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    auto moment = [&](const std::string& key) {
      const torch::Tensor t = expert ? experts.rows(key, shard.first, param.size(0)) : of.at(key);
      if (!t.defined()) throw CheckpointError(fmt::format("{}: {} is missing", ckpt_dir, key));
      if (t.sizes() != param.sizes())
        throw CheckpointError(fmt::format("{}/optimizer.safetensors: {} has shape {}, parameter has {}", ckpt_dir, key,
                                          fmt::streamed(t.sizes()), fmt::streamed(param.sizes())));
      return t.to(param.device(), param.scalar_type()).clone();
    };
    s->step(step->item<int64_t>());
    s->exp_avg(moment("exp_avg." + n));
    s->exp_avg_sq(moment("exp_avg_sq." + n));
    if (expert ? experts.any("max_exp_avg_sq." + n) != nullptr : of.contains("max_exp_avg_sq." + n))
      s->max_exp_avg_sq(moment("max_exp_avg_sq." + n));
    opt_state[param.unsafeGetTensorImpl()] = std::move(s);
  }
  return load_rng_and_state(ckpt_dir, cfg);
}

namespace {

TrainingState load_rng_and_state(const std::string& ckpt_dir, const ExperimentConfig& cfg) {
  SafetensorsFile rf = read_safetensors(ckpt_dir + "/rng.safetensors");
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rf.at("cpu"));
  }
  if (cfg.train.device == "cuda" && torch::cuda::is_available() && rf.contains("cuda")) {
    auto gen = at::globalContext().defaultGenerator(c10::DeviceType::CUDA);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rf.at("cuda"));
  }

  nlohmann::json js;
  try {
    js = nlohmann::json::parse(read_text(ckpt_dir + "/state.json"));
    TrainingState st;
    st.step = js.at("step").get<int64_t>();
    st.data = js.at("data").get<DataLoaderState>();
    st.skipped_steps = js.at("skipped_steps").get<int64_t>();
    st.consecutive_skips = js.at("consecutive_skips").get<int64_t>();
    st.recent_losses = js.at("loss_spike").at("recent_losses").get<std::vector<double>>();
    if (js.at("config_hash").get<std::string>() != config_hash(cfg))
      std::cerr << fmt::format("note: resuming {} with a config that differs from the saved one outside the model "
                               "(config.yaml there has the original)\n", ckpt_dir);
    std::cerr << fmt::format("resumed from {} (step {}, saved by moetrain {})\n", ckpt_dir, st.step,
                             js.value("moetrain_version", "?"));
    return st;
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}/state.json: {}", ckpt_dir, e.what()));
  }
}

}  // namespace

// --- signals -----------------------------------------------------------------------------

namespace {
volatile std::sig_atomic_t g_stop = 0;
volatile std::sig_atomic_t g_save = 0;
extern "C" void on_stop_signal(int) { g_stop = 1; }
extern "C" void on_save_signal(int) { g_save = 1; }
}  // namespace

StopSignals::StopSignals() {
  g_stop = 0;
  g_save = 0;
  struct sigaction sa {};
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = on_stop_signal;
  sigaction(SIGINT, &sa, &old_int_);
  sigaction(SIGTERM, &sa, &old_term_);
  sa.sa_handler = on_save_signal;
  sigaction(SIGUSR1, &sa, &old_usr1_);
}

StopSignals::~StopSignals() {
  sigaction(SIGINT, &old_int_, nullptr);
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
}

bool StopSignals::stop_requested() const { return g_stop != 0; }

bool StopSignals::take_save_request() {
  if (!g_save) return false;
  g_save = 0;
  return true;
}

}  // namespace moetrain
