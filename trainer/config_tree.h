// defines: ConfigNode, SourceLoc, ConfigError, ConfigErrors, load_config_tree,
// apply_set_override — YAML files as a tree that remembers where every value
// came from (file:line:col), so every config error can point at its source.
//
// Why not YAML::Node: yaml-cpp (<= 0.9) silently accepts duplicate keys and
// loses marks across merges; building our own tree from yaml-cpp's event parser
// lets us reject duplicates with both lines and keep each value's origin through
// `base:` inheritance and `--set` overrides.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace moetrain {

struct SourceLoc {
  std::string file;  // a path, or "--set" for command-line overrides
  int line = 0;      // 1-based
  int col = 0;       // 1-based
  std::string str() const;  // "file:line:col"
};

struct ConfigNode {
  enum class Kind { kNull, kScalar, kMap, kSeq };
  Kind kind = Kind::kNull;
  std::string scalar;   // kScalar: the text as written
  bool quoted = false;  // kScalar: written in quotes (never a null or number)
  bool from_override = false;  // kScalar from `--set`: a list field splits it on commas
  std::vector<std::pair<std::string, ConfigNode>> map;  // kMap, in file order
  std::vector<SourceLoc> key_locs;                      // kMap: where each key is written
  std::vector<ConfigNode> seq;                          // kSeq
  SourceLoc loc;

  bool is_null() const { return kind == Kind::kNull; }
  const ConfigNode* find(const std::string& key) const;
  ConfigNode* find(const std::string& key);
  const char* kind_name() const;  // "a map", "a list", "a scalar", "null"
};

struct ConfigError {
  SourceLoc loc;
  std::string path;     // dotted key path, e.g. "optim.lr"
  std::string message;  // "expected …, found …"
  std::string str() const;  // "file:line:col: path: message"
};

// All errors found in one pass; thrown as one exception so a user fixes them
// all at once.
class ConfigErrors : public std::runtime_error {
 public:
  explicit ConfigErrors(std::vector<ConfigError> errors);
  const std::vector<ConfigError>& errors() const { return errors_; }

 private:
  std::vector<ConfigError> errors_;
};

// Parses one YAML file (no `base:` processing). Rejects duplicate keys, anchors
// and aliases, multi-document files, non-scalar keys and files over 1 MiB.
ConfigNode parse_yaml_file(const std::string& path);
ConfigNode parse_yaml_string(const std::string& text, const std::string& name);

// Loads `path` and resolves `base:` inheritance: the base path is relative to
// the file naming it; maps deep-merge, lists and scalars replace; cycles are errors.
ConfigNode load_config_tree(const std::string& path);

// Deep-merges `over` onto `base` (maps merge key by key, everything else replaces).
void merge_config(ConfigNode& base, const ConfigNode& over);

// Applies one `--set a.b.c=value` onto the tree. The value is kept as a scalar
// (its type is decided when the tree is bound to the config structs; a list
// field splits it on commas). Throws ConfigErrors for a malformed override.
void apply_set_override(ConfigNode& root, const std::string& assignment, int index);

// Damerau-free Levenshtein distance, for did-you-mean suggestions.
int edit_distance(const std::string& a, const std::string& b);

}  // namespace moetrain
