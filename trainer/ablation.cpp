#include "trainer/ablation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <cstdlib>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/cuda.h>

#include "trainer/config_tree.h"
#include "trainer/experiment_config.h"

namespace moetrain {

namespace fs = std::filesystem;

std::string AblationSpec::run_dir(const AblationVariant& v, int64_t seed) const {
  return fmt::format("{}/{}/seed-{}", root(), v.name, seed);
}

std::vector<std::string> AblationSpec::run_overrides(const AblationVariant& v, int64_t seed) const {
  std::vector<std::string> out = sets;
  out.insert(out.end(), v.sets.begin(), v.sets.end());
  const std::string dir = run_dir(v, seed);
  out.push_back(fmt::format("train.seed={}", seed));
  out.push_back("logging.dir=" + dir);
  out.push_back("checkpoint.dir=" + dir + "/checkpoints");
  return out;
}

// ---------------------------------------------------------------------------
// Parsing (strict, with file:line:col like experiment configs)

namespace {

struct Reader {
  std::vector<ConfigError> errors;
  void error(const SourceLoc& at, const std::string& path, const std::string& msg) { errors.push_back({at, path, msg}); }

  void check_keys(const ConfigNode& map, const std::string& prefix, const std::vector<std::string>& known) {
    for (size_t i = 0; i < map.map.size(); ++i)
      if (std::find(known.begin(), known.end(), map.map[i].first) == known.end())
        error(map.key_locs[i], prefix + map.map[i].first, "unknown key");
  }
  std::string scalar(const ConfigNode* n, const std::string& path) {
    if (!n || n->kind != ConfigNode::Kind::kScalar) {
      error(n ? n->loc : SourceLoc{}, path, "expected a string");
      return "";
    }
    return n->scalar;
  }
  std::vector<std::string> strings(const ConfigNode* n, const std::string& path) {
    std::vector<std::string> out;
    if (!n) return out;
    if (n->kind != ConfigNode::Kind::kSeq) {
      error(n->loc, path, "expected a list of KEY=VALUE strings");
      return out;
    }
    for (size_t i = 0; i < n->seq.size(); ++i) out.push_back(scalar(&n->seq[i], fmt::format("{}[{}]", path, i)));
    return out;
  }
  std::vector<int64_t> ints(const ConfigNode* n, const std::string& path) {
    std::vector<int64_t> out;
    for (const auto& s : strings(n, path)) {
      char* end = nullptr;
      long long v = std::strtoll(s.c_str(), &end, 10);
      if (s.empty() || *end != '\0' || v < 0) error(n->loc, path, fmt::format("expected a non-negative integer, found '{}'", s));
      out.push_back(v);
    }
    return out;
  }
};

}  // namespace

AblationSpec load_ablation(const std::string& path) {
  ConfigNode root = parse_yaml_file(path);
  Reader r;
  r.check_keys(root, "", {"name", "experiment", "runs_dir", "parallel", "seeds", "set", "variants"});
  AblationSpec spec;
  spec.name = r.scalar(root.find("name"), "name");
  std::string experiment = r.scalar(root.find("experiment"), "experiment");
  spec.experiment = (fs::path(path).parent_path() / experiment).lexically_normal().string();
  if (const ConfigNode* n = root.find("runs_dir")) spec.runs_dir = r.scalar(n, "runs_dir");
  if (const ConfigNode* n = root.find("parallel")) {
    std::string s = r.scalar(n, "parallel");
    spec.parallel = std::atoll(s.c_str());
    if (spec.parallel < 1 || spec.parallel > 64) r.error(n->loc, "parallel", fmt::format("expected 1..64, found '{}'", s));
  }
  if (const ConfigNode* n = root.find("seeds")) spec.seeds = r.ints(n, "seeds");
  spec.sets = r.strings(root.find("set"), "set");
  const ConfigNode* variants = root.find("variants");
  if (!variants || variants->kind != ConfigNode::Kind::kSeq || variants->seq.empty()) {
    r.error(variants ? variants->loc : root.loc, "variants", "expected a non-empty list of variants");
  } else {
    for (size_t i = 0; i < variants->seq.size(); ++i) {
      const ConfigNode& v = variants->seq[i];
      const std::string p = fmt::format("variants[{}].", i);
      if (v.kind != ConfigNode::Kind::kMap) {
        r.error(v.loc, p, "expected a map with name, set, seeds");
        continue;
      }
      r.check_keys(v, p, {"name", "set", "seeds"});
      AblationVariant var;
      var.name = r.scalar(v.find("name"), p + "name");
      var.sets = r.strings(v.find("set"), p + "set");
      var.seeds = v.find("seeds") ? r.ints(v.find("seeds"), p + "seeds") : spec.seeds;
      if (var.name.find_first_of("/ ") != std::string::npos) r.error(v.loc, p + "name", "names may not hold '/' or spaces");
      for (const auto& other : spec.variants)
        if (other.name == var.name) r.error(v.loc, p + "name", fmt::format("duplicate variant name '{}'", var.name));
      spec.variants.push_back(var);
    }
  }
  if (!r.errors.empty()) throw ConfigErrors(r.errors);
  // Every run's experiment config must be valid before anything starts.
  for (const auto& v : spec.variants)
    for (int64_t seed : v.seeds) load_experiment_config(spec.experiment, spec.run_overrides(v, seed));
  return spec;
}

// ---------------------------------------------------------------------------
// Running

namespace {

struct Job {
  const AblationVariant* variant;
  int64_t seed;
  std::string dir;
  pid_t pid = -1;
  std::chrono::steady_clock::time_point start;
  int64_t slot = -1;  // 0..parallel-1: which GPU a CUDA run gets
};

// The GPUs children may use: the parent's CUDA_VISIBLE_DEVICES list, else 0..n-1 of the
// devices LibTorch sees (none on a CPU machine).
std::vector<std::string> visible_gpus() {
  std::vector<std::string> out;
  if (const char* env = std::getenv("CUDA_VISIBLE_DEVICES")) {
    std::stringstream ss(env);
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  }
  const int64_t n = torch::cuda::device_count();
  for (int64_t i = 0; i < n; ++i) out.push_back(std::to_string(i));
  return out;
}

// gpu: "" leaves the environment alone; otherwise the child sees that one GPU.
pid_t spawn(const std::string& exe, const std::vector<std::string>& args, const std::string& log_path,
            const std::string& gpu) {
  pid_t pid = fork();
  if (pid != 0) return pid;
  if (!gpu.empty()) setenv("CUDA_VISIBLE_DEVICES", gpu.c_str(), 1);
  int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    dup2(fd, 1);
    dup2(fd, 2);
    close(fd);
  }
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(exe.c_str()));
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execv(exe.c_str(), argv.data());
  _exit(127);
}

}  // namespace

int run_ablation(const AblationSpec& spec, const std::string& moetrain, const std::string&) {
  std::vector<Job> pending, running;
  int done = 0, failed = 0, total = 0;
  for (const auto& v : spec.variants)
    for (int64_t seed : v.seeds) {
      ++total;
      Job j{&v, seed, spec.run_dir(v, seed), -1, {}};
      if (fs::exists(j.dir + "/done.json")) {
        ++done;
        continue;  // finished in an earlier invocation
      }
      pending.push_back(j);
    }
  // CUDA runs spread over the visible GPUs: run slot k gets GPU k mod n (several runs of a small,
  // launch-bound model share a GPU well).
  const AblationVariant& first = spec.variants.front();
  const ExperimentConfig first_cfg = load_experiment_config(spec.experiment, spec.run_overrides(first, first.seeds.front()));
  const bool cuda = first_cfg.train.device == "cuda";
  const std::vector<std::string> gpus = cuda ? visible_gpus() : std::vector<std::string>{};
  std::vector<bool> slot_busy(static_cast<size_t>(spec.parallel), false);
  std::cerr << fmt::format("ablate {}: {} runs, {} already finished, {} at a time{}\n", spec.name, total, done,
                           spec.parallel, gpus.size() > 1 ? fmt::format(" over {} GPUs", gpus.size()) : "");
  while (!pending.empty() || !running.empty()) {
    while (!pending.empty() && static_cast<int64_t>(running.size()) < spec.parallel) {
      Job j = pending.front();
      pending.erase(pending.begin());
      fs::remove_all(j.dir);  // an interrupted run restarts from its beginning
      fs::create_directories(j.dir);
      std::vector<std::string> args = {"train", spec.experiment};
      for (const auto& s : spec.run_overrides(*j.variant, j.seed)) args.insert(args.end(), {"--set", s});
      j.start = std::chrono::steady_clock::now();
      j.slot = std::find(slot_busy.begin(), slot_busy.end(), false) - slot_busy.begin();
      slot_busy[static_cast<size_t>(j.slot)] = true;
      const std::string gpu = gpus.size() > 1 ? gpus[static_cast<size_t>(j.slot) % gpus.size()] : "";
      j.pid = spawn(moetrain, args, j.dir + "/train.log", gpu);
      std::cerr << fmt::format("  start {} seed {} (pid {}{})\n", j.variant->name, j.seed, j.pid,
                               gpu.empty() ? "" : ", GPU " + gpu);
      running.push_back(j);
    }
    int status = 0;
    pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) break;
    auto it = std::find_if(running.begin(), running.end(), [&](const Job& j) { return j.pid == pid; });
    if (it == running.end()) continue;
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - it->start).count();
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      std::ofstream(it->dir + "/done.json") << nlohmann::json{{"wall_s", wall}, {"seed", it->seed}}.dump() << "\n";
      ++done;
      std::cerr << fmt::format("  done  {} seed {} in {:.0f} s ({}/{})\n", it->variant->name, it->seed, wall, done, total);
    } else {
      ++failed;
      std::cerr << fmt::format("  FAILED {} seed {} (see {}/train.log)\n", it->variant->name, it->seed, it->dir);
    }
    slot_busy[static_cast<size_t>(it->slot)] = false;
    running.erase(it);
  }
  return failed;
}

// ---------------------------------------------------------------------------
// Report

namespace {

struct RunSummary {
  double val_loss = NAN, maxvio_global = NAN, maxvio_worst = NAN, maxvio_batch_last10 = NAN, tokens_per_s = NAN,
         wall_s = NAN;
};

RunSummary summarize(const std::string& dir) {
  RunSummary s;
  std::ifstream in(dir + "/metrics.jsonl");
  std::vector<double> maxvio_batch, tps;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded()) continue;
    if (j.value("kind", "") == "eval") {
      s.val_loss = j["val_loss"];
      s.maxvio_global = j["maxvio_global"];
      auto layers = j["maxvio_global_layers"].get<std::vector<double>>();
      s.maxvio_worst = layers.empty() ? 0.0 : *std::max_element(layers.begin(), layers.end());
    } else {
      maxvio_batch.push_back(j["maxvio_batch"]);
      tps.push_back(j["tokens_per_s"]);
    }
  }
  if (!maxvio_batch.empty()) {
    size_t from = maxvio_batch.size() - std::max<size_t>(1, maxvio_batch.size() / 10);
    double sum = 0;
    for (size_t i = from; i < maxvio_batch.size(); ++i) sum += maxvio_batch[i];
    s.maxvio_batch_last10 = sum / static_cast<double>(maxvio_batch.size() - from);
    double t = 0;
    for (double x : tps) t += x;
    s.tokens_per_s = t / static_cast<double>(tps.size());
  }
  std::ifstream done(dir + "/done.json");
  if (done) s.wall_s = nlohmann::json::parse(done).value("wall_s", NAN);
  return s;
}

// mean and half the range over seeds
std::pair<double, double> mean_spread(const std::vector<double>& v) {
  if (v.empty()) return {NAN, NAN};
  double sum = 0, lo = v[0], hi = v[0];
  for (double x : v) sum += x, lo = std::min(lo, x), hi = std::max(hi, x);
  return {sum / static_cast<double>(v.size()), (hi - lo) / 2};
}

}  // namespace

void write_ablation_report(const AblationSpec& spec, const std::string& python, const std::string& source_dir) {
  nlohmann::json report = {{"name", spec.name}, {"experiment", spec.experiment}, {"variants", nlohmann::json::array()}};
  std::string md = fmt::format("# Ablation `{}`\n\nExperiment `{}`; every variant trains the same data, model and token "
                               "budget. Values: mean ± half-range over seeds.\n\n",
                               spec.name, spec.experiment);
  md += "| variant | seeds | val loss | val ppl | MaxVio_global | MaxVio_batch (last 10 %) | worst-layer MaxVio | tokens/s | wall s |\n";
  md += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
  for (const auto& v : spec.variants) {
    std::vector<double> loss, mvg, mvb, worst, tps, wall;
    std::vector<std::string> dirs;
    for (int64_t seed : v.seeds) {
      std::string dir = spec.run_dir(v, seed);
      if (!fs::exists(dir + "/done.json")) continue;
      RunSummary s = summarize(dir);
      loss.push_back(s.val_loss), mvg.push_back(s.maxvio_global), mvb.push_back(s.maxvio_batch_last10);
      worst.push_back(s.maxvio_worst), tps.push_back(s.tokens_per_s), wall.push_back(s.wall_s);
      dirs.push_back(dir);
    }
    if (loss.empty()) continue;
    auto [l, ls] = mean_spread(loss);
    auto [g, gs] = mean_spread(mvg);
    auto [b, bs] = mean_spread(mvb);
    report["variants"].push_back({{"name", v.name}, {"seeds", loss.size()}, {"val_loss", l}, {"val_loss_spread", ls},
                                  {"val_ppl", std::exp(l)}, {"maxvio_global", g}, {"maxvio_global_spread", gs},
                                  {"maxvio_batch_last10", b}, {"maxvio_batch_last10_spread", bs},
                                  {"maxvio_worst_layer", mean_spread(worst).first},
                                  {"tokens_per_s", mean_spread(tps).first}, {"wall_s", mean_spread(wall).first},
                                  {"runs", dirs}});
    md += fmt::format("| {} | {} | {:.4f} ± {:.4f} | {:.2f} | {:.3f} ± {:.3f} | {:.3f} ± {:.3f} | {:.3f} | {:.0f} | {:.0f} |\n",
                      v.name, loss.size(), l, ls, std::exp(l), g, gs, b, bs, mean_spread(worst).first,
                      mean_spread(tps).first, mean_spread(wall).first);
  }
  fs::create_directories(spec.root());
  std::ofstream(spec.root() + "/report.json") << report.dump(2) << "\n";
  if (!python.empty()) {
    std::string cmd = fmt::format("'{}' '{}/scripts/plot_ablation.py' '{}'", python, source_dir, spec.root());
    if (std::system(cmd.c_str()) == 0) {
      md += "\n![validation loss vs tokens](val_loss.png)\n\n![MaxVio_batch vs step](maxvio_batch.png)\n\n"
            "![expert load per layer at the end](expert_load.png)\n\n![loss-free bias trajectories](bias.png)\n";
    } else {
      md += "\n(plots failed: see the output of scripts/plot_ablation.py)\n";
    }
  }
  std::ofstream(spec.root() + "/report.md") << md;
}

}  // namespace moetrain
