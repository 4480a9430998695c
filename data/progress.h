// defines: ProgressBar — a one-line progress bar with rate and ETA on stderr,
// safe to advance from several threads.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace moetrain {

class ProgressBar {
 public:
  // total: work units expected (0 = unknown: no percentage, no ETA); unit names
  // them, appended as given ("B" → "7.3MB", " tok" → "7.3M tok"). Draws nothing when `enabled` is false.
  ProgressBar(std::string label, int64_t total, std::string unit, bool enabled = true);
  ~ProgressBar();  // finishes the line if finish() was not called
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void add(int64_t n);    // thread-safe; redraws at most every 0.1 s (tty) or 10 s (log file)
  void set(int64_t done);
  void finish();          // final redraw + newline
  int64_t done() const { return done_.load(); }
  double elapsed_s() const;

  // "12.3k", "4.56M": shared with the trainer's console lines.
  static std::string human(double v);
  static std::string duration(double seconds);  // "1:05", "1:02:03"

 private:
  void maybe_draw(bool force);
  std::string render() const;

  std::string label_, unit_;
  int64_t total_;
  bool enabled_, tty_;
  std::atomic<bool> finished_{false};
  std::atomic<int64_t> done_{0};
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  std::mutex mu_;  // serializes drawing, not counting
};

}  // namespace moetrain
