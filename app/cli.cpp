#include "app/cli.h"

#include <iostream>

#include <fmt/format.h>

#include "trainer/config_tree.h"

namespace moetrain {

ArgParser::ArgParser(std::string command, std::string usage, std::string description)
    : command_(std::move(command)), usage_(std::move(usage)), description_(std::move(description)) {}

void ArgParser::flag(const std::string& name, const std::string& help) {
  opts_.push_back({name, "", help, "", true});
}

void ArgParser::option(const std::string& name, const std::string& meta, const std::string& help,
                       const std::string& default_value) {
  opts_.push_back({name, meta, help, default_value, false});
  if (!default_value.empty()) values_[name] = default_value;
}

void ArgParser::positional(const std::string& name, const std::string& help, bool required) {
  positional_specs_.emplace_back(name, help);
  if (required) required_positional_ = positional_specs_.size();
}

void ArgParser::allow_set() { allow_set_ = true; }

std::string ArgParser::help() const {
  std::string out = fmt::format("usage: moetrain {} {}\n\n{}\n", command_, usage_, description_);
  if (!positional_specs_.empty()) {
    out += "\narguments:\n";
    for (const auto& [name, h] : positional_specs_) out += fmt::format("  {:<24} {}\n", name, h);
  }
  out += "\noptions:\n";
  for (const auto& o : opts_) {
    std::string lhs = o.is_flag ? "--" + o.name : fmt::format("--{} {}", o.name, o.meta);
    std::string rhs = o.help;
    if (!o.default_value.empty()) rhs += fmt::format(" (default: {})", o.default_value);
    out += fmt::format("  {:<24} {}\n", lhs, rhs);
  }
  if (allow_set_) out += fmt::format("  {:<24} {}\n", "--set KEY=VALUE", "override a config key (repeatable; lists as a,b)");
  out += fmt::format("  {:<24} {}\n", "-h, --help", "show this help");
  return out;
}

bool ArgParser::parse(int argc, char** argv) {
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::cout << help();
      return false;
    }
    if (a.rfind("--", 0) == 0 && a.size() > 2) {
      std::string name = a.substr(2), value;
      bool inline_value = false;
      if (auto eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        inline_value = true;
      }
      if (name == "set" && allow_set_) {
        if (!inline_value) {
          if (i + 1 >= argc) throw UsageError("--set needs KEY=VALUE");
          value = argv[++i];
        }
        sets_.push_back(value);
        continue;
      }
      const Opt* opt = nullptr;
      for (const auto& o : opts_)
        if (o.name == name) opt = &o;
      if (!opt) throw UsageError(fmt::format("moetrain {}: unknown option '--{}' (see --help)", command_, name));
      if (opt->is_flag) {
        if (inline_value) throw UsageError(fmt::format("--{} takes no value", name));
        values_[name] = "1";
        continue;
      }
      if (!inline_value) {
        if (i + 1 >= argc) throw UsageError(fmt::format("--{} needs a value ({})", name, opt->meta));
        value = argv[++i];
      }
      values_[name] = value;
      continue;
    }
    positional_values_.push_back(a);
  }
  if (positional_values_.size() < required_positional_)
    throw UsageError(fmt::format("moetrain {}: missing argument {} (usage: moetrain {} {})", command_,
                                 positional_specs_[positional_values_.size()].first, command_, usage_));
  if (positional_values_.size() > positional_specs_.size())
    throw UsageError(fmt::format("moetrain {}: unexpected argument '{}'", command_,
                                 positional_values_[positional_specs_.size()]));
  return true;
}

bool ArgParser::has(const std::string& flag_name) const { return values_.count(flag_name) > 0; }
bool ArgParser::given(const std::string& option_name) const { return values_.count(option_name) > 0; }
std::string ArgParser::get(const std::string& option_name) const {
  auto it = values_.find(option_name);
  return it == values_.end() ? "" : it->second;
}
std::string ArgParser::pos(size_t i) const { return i < positional_values_.size() ? positional_values_[i] : ""; }

int run_command(const std::function<int()>& fn) {
  try {
    return fn();
  } catch (const ConfigErrors& e) {
    std::cerr << "error: invalid config (" << e.errors().size() << (e.errors().size() == 1 ? " problem" : " problems")
              << "):\n" << e.what() << "\n";
    return 2;
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace moetrain
