// defines: listening_port, run_ranks, write_sentence_corpus, launch_tiny_sets, debug_cli,
// train_records, LaunchedTraining — the fixtures of the multi-rank tests: ranks as threads of one test process
// over Gloo (collective-level tests of data, expert and optimizer parallelism), and whole
// runs of a tiny model through `moetrain launch` / torchrun compared with one process.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <nlohmann/json.hpp>
#include <sys/socket.h>
#include <unistd.h>

#include "data/prepare.h"
#include "test_paths.h"
#include "test_util.h"
#include "trainer/distributed.h"
#include "trainer/experiment_config.h"

namespace moetrain::testing {

// A socket listening on a loopback port of the kernel's pick, for rank 0's store to take over
// (DistEnv::master_listen_fd): the port stays taken from the pick on. Returns {fd, port}.
inline std::pair<int, int> listening_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  listen(fd, 128);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  return {fd, ntohs(a.sin_port)};
}

// Runs fn(rank, world group) on `world` threads, one Gloo rank each; returns their errors
// ("rank R: what" lines), empty when every rank finished.
inline std::string run_ranks(int64_t world, const std::function<void(int64_t, ProcessGroup&)>& fn) {
  // c10d's flight recorder is one per process and its Gloo enqueue path is not safe for two
  // process groups submitting at once (ranks as threads): an intermittent SIGSEGV in
  // FlightRecorder::recordWithResetEnabled. Off for these tests (one rank a process elsewhere).
  setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0);
  const std::pair<int, int> listening = listening_port();  // rank 0's store owns (and closes) the socket
  const int listen_fd = listening.first, port = listening.second;
  std::vector<std::string> errors(static_cast<size_t>(world));
  auto rank_main = [&](int64_t rank) {
    try {
      DistEnv env;
      env.rank = rank;
      env.world_size = world;
      env.master_port = port;
      if (rank == 0) env.master_listen_fd = listen_fd;
      ProcessGroup pg(env, "gloo", std::chrono::seconds(30));
      fn(rank, pg);
    } catch (const std::exception& e) {
      errors[static_cast<size_t>(rank)] = fmt::format("rank {}: {}\n", rank, e.what());
    }
  };
  std::vector<std::thread> threads;
  for (int64_t r = 1; r < world; ++r) threads.emplace_back(rank_main, r);
  rank_main(0);
  for (auto& t : threads) t.join();
  std::string all;
  for (const auto& e : errors) all += e;
  return all;
}

// --- whole runs through `moetrain launch` ------------------------------------------------

// dir/text/doc{0..5}.txt: 300 lines each of sentence_corpus.
inline void write_sentence_corpus(const TempDir& dir) {
  for (int doc = 0; doc < 6; ++doc)
    write_file(dir.path() / "text" / ("doc" + std::to_string(doc) + ".txt"), sentence_corpus(doc, 300));
}

// --set overrides of configs/debug.yaml for a tiny MoE model (8 experts, top-2, 1 shared) on
// that corpus (byte tokenizer), global batch 8 of micro-batches 2 × 32 tokens, one CPU thread,
// Gloo; `run` names the logging and checkpoint directories. Append overrides to change it
// (a later --set of the same key wins).
inline std::vector<std::string> launch_tiny_sets(const TempDir& dir, const std::string& run, int steps) {
  return {"model.vocab_size=260", "model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
          "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.kv_lora_rank=32",
          "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=8",
          "model.num_experts_per_tok=2", "model.n_shared_experts=1", "model.init_std=0.02",
          "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=2",
          "train.steps=" + std::to_string(steps), "train.global_batch=8", "train.micro_batch=2", "train.seq_len=32",
          "train.threads=1", "train.eval_every=0", "train.eval_batches=1", "logging.every=1",
          "data.tokenizer=byte", "data.val_fraction=0.2", "distributed.backend=gloo", "distributed.timeout_s=60",
          "data.dir=" + dir.file("data"), "data.sources=" + dir.file("text/*.txt"), "logging.dir=" + dir.file(run),
          "checkpoint.dir=" + dir.file(run + "/ckpt")};
}

inline std::string debug_config_path() { return std::string(MOETRAIN_SOURCE_DIR) + "/configs/debug.yaml"; }

// " configs/debug.yaml --set a=b ...": the arguments of `moetrain train` for `sets`.
inline std::string debug_cli(const std::vector<std::string>& sets) {
  std::string s = " " + debug_config_path();
  for (const auto& x : sets) s += " --set " + x;
  return s;
}

// The training records (not the eval ones) of a metrics.jsonl.
inline std::vector<nlohmann::json> train_records(const std::string& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.value("kind", "") != "eval") out.push_back(j);
  }
  return out;
}

// A test with a temporary directory holding the sentence corpus, prepared as `sets` say
// (prepare()), and `moetrain launch --nproc N -- train` runs with one thread per rank.
class LaunchedTraining : public ::testing::Test {
 protected:
  void prepare(const std::vector<std::string>& sets) {
    write_sentence_corpus(dir_);
    ExperimentConfig cfg = load_experiment_config(debug_config_path(), sets);
    PrepareOptions opt;
    opt.progress = false;
    prepare_data(cfg.data, cfg.model.vocab_size, opt);
  }
  // env: VAR=value assignments before the command; args: appended to the train arguments.
  RunResult launch(int nproc, const std::vector<std::string>& sets, const std::string& args = "",
                   const std::string& env = "") {
    return run_capture(fmt::format("OMP_NUM_THREADS=1 {} {} launch --nproc {} -- train{}{}", env, MOETRAIN_BINARY, nproc,
                                   debug_cli(sets), args));
  }
  TempDir dir_;
};

}  // namespace moetrain::testing
