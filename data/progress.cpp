#include "data/progress.h"

#include <algorithm>
#include <cstdio>
#include <unistd.h>

#include <fmt/format.h>

namespace moetrain {

ProgressBar::ProgressBar(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

ProgressBar::~ProgressBar() {
  if (!finished_) finish();
}

double ProgressBar::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string ProgressBar::human(double v) {
  if (v >= 1e9) return fmt::format("{:.2f}G", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

std::string ProgressBar::duration(double seconds) {
  auto s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

void ProgressBar::add(int64_t n) {
  done_.fetch_add(n);
  maybe_draw(false);
}

void ProgressBar::set(int64_t done) {
  done_.store(done);
  maybe_draw(false);
}

void ProgressBar::finish() {
  if (finished_) return;
  maybe_draw(true);
  finished_ = true;
  if (enabled_ && tty_) std::fputc('\n', stderr);
}

std::string ProgressBar::render() const {
  const double el = elapsed_s();
  const auto d = static_cast<double>(done_.load());
  const double rate = el > 0 ? d / el : 0.0;
  std::string out = label_ + " ";
  if (total_ > 0) {
    const double frac = std::min(1.0, d / static_cast<double>(total_));
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    out += "[" + std::string(filled, '#') + std::string(kWidth - filled, '.') + "] ";
    out += fmt::format("{:5.1f}% ", 100.0 * frac);
  }
  out += fmt::format("{}{}  {}{}/s  {}", human(d), unit_, human(rate), unit_, duration(el));
  if (total_ > 0 && rate > 0 && d < static_cast<double>(total_))
    out += " ETA " + duration((static_cast<double>(total_) - d) / rate);
  return out;
}

void ProgressBar::maybe_draw(bool force) {
  if (!enabled_ || finished_) return;
  // try_lock: a worker never waits on another one's drawing.
  std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
  if (force) lock.lock();
  else if (!lock.try_lock()) return;
  const auto now = std::chrono::steady_clock::now();
  // Redraw often on a terminal; into a log file, only a line every 10 s (and the last).
  const auto min_gap = tty_ ? std::chrono::milliseconds(100) : std::chrono::milliseconds(10000);
  if (!force && now - last_draw_ < min_gap) return;
  last_draw_ = now;
  const std::string line = render();
  if (tty_) std::fprintf(stderr, "\r%s\x1b[K", line.c_str());
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace moetrain
