// defines: ArgParser, UsageError, run_command — the small command-line layer
// shared by every `moetrain <command>`: flags, options, repeated --set, --help,
// and the exit-code contract (0 ok, 1 runtime failure, 2 bad input).
#pragma once

#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace moetrain {

// Bad command line or bad input file: exit code 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ArgParser {
 public:
  ArgParser(std::string command, std::string usage, std::string description);
  void flag(const std::string& name, const std::string& help);                     // --name
  void option(const std::string& name, const std::string& meta, const std::string& help,
              const std::string& default_value = "");                               // --name VALUE
  void positional(const std::string& name, const std::string& help, bool required = true);
  void allow_set();  // repeated --set section.key=value

  // Returns false when --help was printed (the command should exit 0).
  bool parse(int argc, char** argv);

  bool has(const std::string& flag_name) const;
  bool given(const std::string& option_name) const;
  std::string get(const std::string& option_name) const;
  std::string pos(size_t i) const;
  size_t num_positional() const { return positional_values_.size(); }
  const std::vector<std::string>& sets() const { return sets_; }
  std::string help() const;

 private:
  struct Opt {
    std::string name, meta, help, default_value;
    bool is_flag = false;
  };
  std::string command_, usage_, description_;
  std::vector<Opt> opts_;
  std::vector<std::pair<std::string, std::string>> positional_specs_;
  size_t required_positional_ = 0;
  bool allow_set_ = false;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_values_;
  std::vector<std::string> sets_;
};

// Runs fn, mapping exceptions to the exit-code contract with a message on stderr.
int run_command(const std::function<int()>& fn);

}  // namespace moetrain
