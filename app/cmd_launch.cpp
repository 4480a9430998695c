// moetrain launch --nproc N [--master-port P] -- COMMAND...: runs N local ranks of
// this executable (`moetrain COMMAND...`) with the torchrun variables, like
// `torchrun --no-python --nproc-per-node N moetrain COMMAND...` without Python.
//
// Rank 0 keeps the terminal (its stdout stays clean for output contracts such as
// eval's JSON line); every other rank's stdout+stderr goes through a pipe and is
// printed to stderr line by line as "[rank r] ...". When a rank fails, the others
// get SIGTERM, then SIGKILL after a grace period, and launch exits with the
// failing rank's code (128 + signal for a rank killed by a signal).
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "app/cli.h"
#include "app/commands.h"

extern char** environ;

namespace moetrain {

namespace {

using Clock = std::chrono::steady_clock;

volatile std::sig_atomic_t g_forward_signal = 0;
extern "C" void on_launch_signal(int sig) { g_forward_signal = sig; }

constexpr const char* kUsage = "--nproc N [--master-port PORT] -- COMMAND [ARGS...]";
constexpr const char* kHelp =
    "Run N local data-parallel ranks of `moetrain COMMAND ARGS...` with RANK, WORLD_SIZE, LOCAL_RANK,\n"
    "LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and MASTER_PORT set (torchrun's variables).\n"
    "Rank 0 writes to the terminal; the other ranks' lines are printed to stderr prefixed \"[rank r] \".\n"
    "If a rank fails, the others are stopped (SIGTERM, SIGKILL after 5 s) and launch exits with its code.\n"
    "SIGINT/SIGTERM to launch are forwarded to every rank (they save a checkpoint and stop).\n\n"
    "options:\n"
    "  --nproc N                number of ranks (processes) on this machine\n"
    "  --master-port PORT       rendezvous port of rank 0 (default: a free port)\n"
    "  -h, --help               show this help\n\n"
    "example: moetrain launch --nproc 2 -- train configs/debug.yaml\n";

int64_t parse_count(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || x < lo || x > hi)
    throw UsageError(fmt::format("moetrain launch: {} expects an integer in [{}, {}], got '{}'", flag, lo, hi, v));
  return x;
}

// A port nobody listens on right now (the kernel's choice); rank 0 binds it moments later.
int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("moetrain launch: socket() failed; pass --master-port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(fd);
    throw std::runtime_error("moetrain launch: cannot find a free port; pass --master-port");
  }
  close(fd);
  return ntohs(a.sin_port);
}

struct Rank {
  pid_t pid = -1;
  int out_fd = -1;       // read end of the pipe (ranks > 0), -1 when closed
  std::string pending;   // a partial line
  bool exited = false;
  int code = 0;
};

// The environment of rank r: ours minus the variables we set, plus them.
std::vector<std::string> rank_env(int64_t rank, int64_t world, int port) {
  const char* ours[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT="};
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    bool skip = false;
    for (const char* o : ours) skip = skip || std::strncmp(*e, o, std::strlen(o)) == 0;
    if (!skip) env.emplace_back(*e);
  }
  env.push_back(fmt::format("RANK={}", rank));
  env.push_back(fmt::format("WORLD_SIZE={}", world));
  env.push_back(fmt::format("LOCAL_RANK={}", rank));
  env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", world));
  env.push_back("MASTER_ADDR=127.0.0.1");
  env.push_back(fmt::format("MASTER_PORT={}", port));
  return env;
}

void flush_lines(int64_t r, Rank& k, bool final) {
  size_t nl;
  while ((nl = k.pending.find('\n')) != std::string::npos) {
    std::cerr << fmt::format("[rank {}] {}\n", r, k.pending.substr(0, nl));
    k.pending.erase(0, nl + 1);
  }
  if (final && !k.pending.empty()) {
    std::cerr << fmt::format("[rank {}] {}\n", r, k.pending);
    k.pending.clear();
  }
  std::cerr << std::flush;
}

int run_launch(int64_t nproc, int port, const std::vector<std::string>& command) {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) throw std::runtime_error("moetrain launch: cannot find its own executable (/proc/self/exe)");
  exe[n] = '\0';

  struct sigaction sa {}, old_int {}, old_term {};
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = on_launch_signal;
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);

  std::vector<Rank> ranks(static_cast<size_t>(nproc));
  for (int64_t r = 0; r < nproc; ++r) {
    // Everything the child needs is built before fork (only async-signal-safe calls after it).
    std::vector<std::string> env = rank_env(r, nproc, port);
    std::vector<char*> envp, argv;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::string exe_s = exe;
    argv.push_back(exe_s.data());
    std::vector<std::string> args = command;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int fds[2] = {-1, -1};
    if (r > 0 && pipe(fds) != 0) throw std::runtime_error("moetrain launch: pipe() failed");
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error("moetrain launch: fork() failed");
    if (pid == 0) {
      sigaction(SIGINT, &old_int, nullptr);
      sigaction(SIGTERM, &old_term, nullptr);
      if (r > 0) {
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[0]);
        close(fds[1]);
      }
      execve(exe, argv.data(), envp.data());
      _exit(127);
    }
    if (r > 0) {
      close(fds[1]);
      ranks[static_cast<size_t>(r)].out_fd = fds[0];
    }
    ranks[static_cast<size_t>(r)].pid = pid;
  }
  std::cerr << fmt::format("launch: {} ranks of `moetrain {}` (MASTER_PORT={})\n", nproc, command.front(), port);

  int64_t failed_rank = -1;
  int failed_code = 0;
  std::optional<Clock::time_point> killing_since;  // SIGTERM sent; SIGKILL after the grace period
  auto terminate_all = [&](int sig) {
    for (auto& k : ranks)
      if (!k.exited) kill(k.pid, sig);
  };
  int running = static_cast<int>(nproc);
  while (running > 0) {
    // forward launch's own SIGINT/SIGTERM (a graceful stop: the ranks save and exit 0)
    if (g_forward_signal) {
      terminate_all(g_forward_signal);
      g_forward_signal = 0;
    }
    std::vector<pollfd> pfds;
    std::vector<size_t> which;
    for (size_t i = 0; i < ranks.size(); ++i)
      if (ranks[i].out_fd >= 0) {
        pfds.push_back({ranks[i].out_fd, POLLIN, 0});
        which.push_back(i);
      }
    if (!pfds.empty()) {
      if (poll(pfds.data(), pfds.size(), 100) > 0)
        for (size_t j = 0; j < pfds.size(); ++j) {
          if (!(pfds[j].revents & (POLLIN | POLLHUP | POLLERR))) continue;
          Rank& k = ranks[which[j]];
          char buf[4096];
          const ssize_t got = read(k.out_fd, buf, sizeof(buf));
          if (got > 0) {
            k.pending.append(buf, static_cast<size_t>(got));
            flush_lines(static_cast<int64_t>(which[j]), k, false);
          } else if (got == 0 || errno != EINTR) {
            flush_lines(static_cast<int64_t>(which[j]), k, true);
            close(k.out_fd);
            k.out_fd = -1;
          }
        }
    } else {
      usleep(100 * 1000);
    }
    int status = 0;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
      for (size_t i = 0; i < ranks.size(); ++i) {
        Rank& k = ranks[i];
        if (k.pid != pid || k.exited) continue;
        k.exited = true;
        --running;
        k.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (k.code != 0 && failed_rank < 0 && !killing_since) {
          failed_rank = static_cast<int64_t>(i);
          failed_code = k.code;
          std::cerr << fmt::format("launch: rank {} (pid {}) failed with exit code {}; stopping the other ranks\n", i,
                                   pid, k.code);
          terminate_all(SIGTERM);
          killing_since = Clock::now();
        }
      }
    }
    if (killing_since && Clock::now() - *killing_since > std::chrono::seconds(5)) {
      terminate_all(SIGKILL);
      killing_since = Clock::now() + std::chrono::hours(1);  // once
    }
  }
  for (size_t i = 0; i < ranks.size(); ++i)  // drain what is left in the pipes
    if (ranks[i].out_fd >= 0) {
      char buf[4096];
      ssize_t got;
      while ((got = read(ranks[i].out_fd, buf, sizeof(buf))) > 0) ranks[i].pending.append(buf, static_cast<size_t>(got));
      flush_lines(static_cast<int64_t>(i), ranks[i], true);
      close(ranks[i].out_fd);
    }
  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  if (failed_rank >= 0) return failed_code;
  for (const auto& k : ranks)
    if (k.code != 0) return k.code;
  return 0;
}

}  // namespace

int cmd_launch(int argc, char** argv) {
  return run_command([&] {
    int64_t nproc = 0;
    int port = 0;
    std::vector<std::string> command;
    for (int i = 0; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        std::cout << fmt::format("usage: moetrain launch {}\n\n{}", kUsage, kHelp);
        return 0;
      }
      if (a == "--") {
        command.assign(argv + i + 1, argv + argc);
        break;
      }
      if ((a == "--nproc" || a == "--master-port") && i + 1 >= argc)
        throw UsageError(fmt::format("moetrain launch: {} needs a value", a));
      if (a == "--nproc")
        nproc = parse_count(a, argv[++i], 1, 1024);
      else if (a == "--master-port")
        port = static_cast<int>(parse_count(a, argv[++i], 1, 65535));
      else
        throw UsageError(fmt::format("moetrain launch: unexpected argument '{}' (usage: moetrain launch {})", a, kUsage));
    }
    if (nproc == 0) throw UsageError(fmt::format("moetrain launch: --nproc N is required (usage: moetrain launch {})", kUsage));
    if (command.empty()) throw UsageError(fmt::format("moetrain launch: no command after -- (usage: moetrain launch {})", kUsage));
    if (command.front() == "launch") throw UsageError("moetrain launch: the command cannot be launch itself");
    return run_launch(nproc, port > 0 ? port : free_port(), command);
  });
}

}  // namespace moetrain
