// defines: MetricsLog — one JSON object per line in logging.dir/metrics.jsonl,
// flushed per record so a killed run keeps everything it logged.
#pragma once

#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

namespace moetrain {

class MetricsLog {
 public:
  // truncate: a fresh run starts a fresh file; a resumed run appends.
  MetricsLog(const std::string& dir, bool truncate);
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace moetrain
