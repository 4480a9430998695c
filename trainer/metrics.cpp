#include "trainer/metrics.h"

#include <filesystem>
#include <stdexcept>

namespace moetrain {

MetricsLog::MetricsLog(const std::string& dir, bool truncate) : path_(dir + "/metrics.jsonl") {
  std::filesystem::create_directories(dir);
  out_.open(path_, truncate ? std::ios::trunc : std::ios::app);
  if (!out_) throw std::runtime_error("cannot open " + path_ + " for writing");
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
}

}  // namespace moetrain
