// moetrain params FILE [--json] [--memory [--world-size N]]: analytic counts, nothing allocated.
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <iostream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "app/cli.h"
#include "app/commands.h"
#include "models/params.h"
#include "trainer/experiment_config.h"

namespace moetrain {

namespace {

std::string human(double n) {
  if (n >= 1e10) return fmt::format("{:.2f}B", n / 1e9);
  if (n >= 1e6) return fmt::format("{:.1f}M", n / 1e6);
  if (n >= 1e3) return fmt::format("{:.1f}K", n / 1e3);
  return fmt::format("{:.0f}", n);
}

std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0)); }

}  // namespace

int cmd_params(int argc, char** argv) {
  ArgParser args("params", "FILE [--json] [--memory [--world-size N]] [--set KEY=VALUE]...",
                 "Parameter counts, FLOPs per token and (with --memory) training memory per rank,\n"
                 "computed from the config's shapes alone (nothing is allocated). With\n"
                 "distributed.zero_stage 1 the Adam state per rank is divided by --world-size\n"
                 "(the data-parallel ranks; default 1: give the size you will launch).");
  args.positional("FILE", "experiment config (YAML)");
  args.flag("json", "print one JSON object instead of the table");
  args.flag("memory", "add bytes per rank for weights, gradients, Adam state and activations");
  args.option("world-size", "N", "data-parallel ranks the Adam state is sharded over (ZeRO-1)", "1");
  args.allow_set();
  return run_command([&] {
    if (!args.parse(argc, argv)) return 0;
    ExperimentConfig cfg = load_experiment_config(args.pos(0), args.sets());
    const ModelConfig& m = cfg.model;
    ParamCounts p = count_params(m, cfg.train.seq_len);

    // Memory per rank. train.param_dtype fp32: weights (the masters), gradients and both Adam
    // moments are fp32 (bf16 autocast casts on the fly). bf16: weights and gradients are bf16
    // and the optimizer holds fp32 masters (the ~0.1 % of 1-D norm weights, fp32 in fact, are
    // counted as matrices). Activations follow the compute dtype.
    const bool bf16_weights = cfg.train.param_dtype == "bf16";
    const double all_params = static_cast<double>(p.total + p.mtp);
    const double weight_bytes = bf16_weights ? 2.0 : 4.0;
    const double weights = weight_bytes * all_params + 4.0 * static_cast<double>(p.router_bias);
    const double grads = weight_bytes * all_params;
    int64_t world = 1;
    try {
      size_t used = 0;
      world = std::stoll(args.get("world-size"), &used);
      if (used != args.get("world-size").size() || world < 1) throw std::invalid_argument("");
    } catch (const std::exception&) {
      throw UsageError(fmt::format("--world-size: expected a positive integer, got '{}'", args.get("world-size")));
    }
    // ZeRO-1 (trainer/zero.h): the moments (and masters) of ceil(params / world) elements per rank
    const bool zero = cfg.distributed.zero_stage == 1;
    const double held = zero ? std::ceil(all_params / static_cast<double>(world)) : all_params;
    const double adam = (cfg.optim.moment_dtype == "bf16" ? 4.0 : 8.0) * held;  // two moments
    // fp32 masters, or their int16 remainders beside the bf16 weights (optim.master_storage split)
    const double masters = bf16_weights ? (cfg.optim.master_storage == "split" ? 2.0 : 4.0) * held : 0.0;
    const double act_bytes = (cfg.train.dtype == "bf16" ? 2.0 : 4.0) * activation_elements_per_token(m) *
                             static_cast<double>(cfg.train.micro_batch * cfg.train.seq_len);

    if (args.has("json")) {
      nlohmann::json j = {{"total", p.total},
                          {"active", p.active},
                          {"active_excl_embedding", p.active - p.embedding},
                          {"embedding", p.embedding},
                          {"flop_params", p.flop_params},
                          {"mtp", p.mtp},
                          {"mtp_active", p.mtp_active},
                          {"gflop_per_token", p.flops_per_token / 1e9},
                          {"seq_len", cfg.train.seq_len}};
      if (args.has("memory"))
        j["memory_bytes"] = {{"weights", weights}, {"grads", grads}, {"optimizer", adam},
                             {"masters", masters}, {"activations", act_bytes},
                             {"total", weights + grads + adam + masters + act_bytes},
                             {"world_size", world}, {"zero_stage", cfg.distributed.zero_stage},
                             {"param_dtype", cfg.train.param_dtype}, {"moment_dtype", cfg.optim.moment_dtype}};
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    auto row = [](const std::string& name, double n, const std::string& note = "") {
      std::cout << fmt::format("{:<38} {:>10}  {:>16}{}\n", name, human(n), static_cast<int64_t>(n),
                               note.empty() ? "" : "  " + note);
    };
    row("total", static_cast<double>(p.total), "main model");
    row("active (incl. input embedding)", static_cast<double>(p.active));
    row("active (excl. input embedding)", static_cast<double>(p.active - p.embedding));
    row("flop params (excl. input embedding)", static_cast<double>(p.flop_params), "matmul weights a token touches");
    row("mtp", static_cast<double>(p.mtp),
        fmt::format("{} module(s), unique (shared embedding + head excluded)", m.num_nextn_predict_layers));
    std::cout << fmt::format("{:<38} {:>10.3f}  (6·flop params + attention at T = {})\n", "GFLOP/token",
                             p.flops_per_token / 1e9, cfg.train.seq_len);
    if (args.has("memory")) {
      std::cout << fmt::format("\nmemory per rank (micro_batch {} × seq_len {}, {}):\n", cfg.train.micro_batch,
                               cfg.train.seq_len, cfg.train.dtype);
      const std::string zero_note = zero ? fmt::format("  (ZeRO-1: ÷ {} ranks)", world) : "";
      std::cout << fmt::format("  {:<20} {:>12}\n", fmt::format("weights ({})", cfg.train.param_dtype), gib(weights));
      std::cout << fmt::format("  {:<20} {:>12}\n", fmt::format("gradients ({})", cfg.train.param_dtype), gib(grads));
      if (bf16_weights) std::cout << fmt::format("  {:<20} {:>12}{}\n", cfg.optim.master_storage == "split" ? "masters (split)" : "masters (fp32)",
                                                 gib(masters), zero_note);
      std::cout << fmt::format("  {:<20} {:>12}{}\n", fmt::format("optimizer (Adam {})", cfg.optim.moment_dtype), gib(adam),
                               zero_note);
      std::cout << fmt::format("  {:<20} {:>12}  (estimate)\n", "activations", gib(act_bytes));
      std::cout << fmt::format("  {:<20} {:>12}\n", "total", gib(weights + grads + adam + masters + act_bytes));
    }
    return 0;
  });
}

}  // namespace moetrain
