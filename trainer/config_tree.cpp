#include "trainer/config_tree.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/exceptions.h>
#include <yaml-cpp/parser.h>

namespace moetrain {

namespace fs = std::filesystem;

std::string SourceLoc::str() const {
  if (line <= 0) return file;
  return fmt::format("{}:{}:{}", file, line, col);
}

const ConfigNode* ConfigNode::find(const std::string& key) const {
  for (const auto& [k, v] : map)
    if (k == key) return &v;
  return nullptr;
}

ConfigNode* ConfigNode::find(const std::string& key) {
  for (auto& [k, v] : map)
    if (k == key) return &v;
  return nullptr;
}

const char* ConfigNode::kind_name() const {
  switch (kind) {
    case Kind::kNull: return "null";
    case Kind::kScalar: return "a scalar";
    case Kind::kMap: return "a map";
    case Kind::kSeq: return "a list";
  }
  return "?";
}

std::string ConfigError::str() const {
  std::string where = loc.str();
  if (path.empty()) return fmt::format("{}: {}", where, message);
  return fmt::format("{}: {}: {}", where, path, message);
}

static std::string join_errors(const std::vector<ConfigError>& errors) {
  std::string out;
  for (const auto& e : errors) {
    if (!out.empty()) out += '\n';
    out += e.str();
  }
  return out;
}

ConfigErrors::ConfigErrors(std::vector<ConfigError> errors)
    : std::runtime_error(join_errors(errors)), errors_(std::move(errors)) {}

int edit_distance(const std::string& a, const std::string& b) {
  std::vector<int> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j) {
      int sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// ---------------------------------------------------------------------------
// YAML events -> ConfigNode

namespace {

bool is_null_word(const std::string& s) {
  return s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL";
}

class TreeBuilder : public YAML::EventHandler {
 public:
  explicit TreeBuilder(std::string file) : file_(std::move(file)) {}

  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}

  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    check_anchor(mark, anchor);
    ConfigNode n;
    n.loc = loc(mark);
    attach(std::move(n));
  }

  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override {
    error(loc(mark), "YAML aliases (*name) are not supported in configs; use `base:` to share settings");
    ConfigNode n;
    n.loc = loc(mark);
    attach(std::move(n));
  }

  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                const std::string& value) override {
    check_anchor(mark, anchor);
    ConfigNode n;
    n.loc = loc(mark);
    n.quoted = (tag != "?");  // yaml-cpp tags plain scalars "?" and quoted ones "!"
    if (!n.quoted && is_null_word(value)) {
      n.kind = ConfigNode::Kind::kNull;
    } else {
      n.kind = ConfigNode::Kind::kScalar;
      n.scalar = value;
    }
    attach(std::move(n));
  }

  void OnSequenceStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value) override {
    check_anchor(mark, anchor);
    Frame f;
    f.node.kind = ConfigNode::Kind::kSeq;
    f.node.loc = loc(mark);
    stack_.push_back(std::move(f));
  }
  void OnSequenceEnd() override { pop(); }

  void OnMapStart(const YAML::Mark& mark, const std::string&, YAML::anchor_t anchor,
                  YAML::EmitterStyle::value) override {
    check_anchor(mark, anchor);
    Frame f;
    f.node.kind = ConfigNode::Kind::kMap;
    f.node.loc = loc(mark);
    stack_.push_back(std::move(f));
  }
  void OnMapEnd() override { pop(); }

  int documents = 0;
  bool have_root = false;
  ConfigNode root;
  std::vector<ConfigError> errors;

  SourceLoc loc(const YAML::Mark& m) const { return {file_, m.line + 1, m.column + 1}; }
  void error(SourceLoc where, std::string message, std::string path = "") {
    errors.push_back({std::move(where), std::move(path), std::move(message)});
  }

 private:
  struct Frame {
    ConfigNode node;
    bool have_key = false;
    std::string key;
    SourceLoc key_loc;
  };

  void check_anchor(const YAML::Mark& mark, YAML::anchor_t anchor) {
    if (anchor != YAML::NullAnchor)
      error(loc(mark), "YAML anchors (&name) are not supported in configs; use `base:` to share settings");
  }

  void pop() {
    ConfigNode n = std::move(stack_.back().node);
    stack_.pop_back();
    attach(std::move(n));
  }

  void attach(ConfigNode n) {
    if (stack_.empty()) {
      root = std::move(n);
      have_root = true;
      return;
    }
    Frame& top = stack_.back();
    if (top.node.kind == ConfigNode::Kind::kSeq) {
      top.node.seq.push_back(std::move(n));
      return;
    }
    if (!top.have_key) {  // this node is a key
      if (n.kind != ConfigNode::Kind::kScalar) {
        error(n.loc, fmt::format("map keys must be plain words, found {}", n.kind_name()));
        top.key = "?";
      } else {
        top.key = n.scalar;
      }
      top.key_loc = n.loc;
      top.have_key = true;
      for (size_t i = 0; i < top.node.map.size(); ++i) {
        if (top.node.map[i].first == top.key) {
          error(n.loc, fmt::format("duplicate key '{}' (first defined at line {})", top.key,
                                   top.node.key_locs[i].line));
        }
      }
      return;
    }
    top.node.map.emplace_back(top.key, std::move(n));
    top.node.key_locs.push_back(top.key_loc);
    top.have_key = false;
  }

  std::string file_;
  std::vector<Frame> stack_;
};

constexpr std::size_t kMaxConfigBytes = 1 << 20;  // configs are small; refuse anything huge

ConfigNode parse_stream(std::istream& in, const std::string& name) {
  TreeBuilder builder(name);
  try {
    YAML::Parser parser(in);
    while (parser.HandleNextDocument(builder)) {
      if (++builder.documents > 1) {
        builder.error({name, 0, 0}, "a config file holds one YAML document, found several");
        break;
      }
    }
  } catch (const YAML::Exception& e) {
    builder.error(builder.loc(e.mark), fmt::format("YAML syntax error: {}", e.msg));
  }
  if (!builder.errors.empty()) throw ConfigErrors(builder.errors);
  ConfigNode root = std::move(builder.root);
  if (!builder.have_root || root.is_null()) {  // empty file: an empty map
    root = ConfigNode{};
    root.kind = ConfigNode::Kind::kMap;
    root.loc = {name, 1, 1};
  }
  if (root.kind != ConfigNode::Kind::kMap)
    throw ConfigErrors({{root.loc, "", fmt::format("a config file must be a map of sections, found {}", root.kind_name())}});
  return root;
}

}  // namespace

ConfigNode parse_yaml_string(const std::string& text, const std::string& name) {
  if (text.size() > kMaxConfigBytes)
    throw ConfigErrors({{{name, 0, 0}, "", fmt::format("config is {} bytes; the limit is {}", text.size(), kMaxConfigBytes)}});
  std::istringstream in(text);
  return parse_stream(in, name);
}

ConfigNode parse_yaml_file(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    throw ConfigErrors({{{path, 0, 0}, "", "config file not found (or not a regular file)"}});
  auto size = fs::file_size(path, ec);
  if (!ec && size > kMaxConfigBytes)
    throw ConfigErrors({{{path, 0, 0}, "", fmt::format("config is {} bytes; the limit is {}", size, kMaxConfigBytes)}});
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigErrors({{{path, 0, 0}, "", "cannot open config file"}});
  std::stringstream buf;
  buf << in.rdbuf();
  return parse_yaml_string(buf.str(), path);
}

void merge_config(ConfigNode& base, const ConfigNode& over) {
  if (base.kind != ConfigNode::Kind::kMap || over.kind != ConfigNode::Kind::kMap) {
    base = over;
    return;
  }
  for (size_t i = 0; i < over.map.size(); ++i) {
    const auto& [key, value] = over.map[i];
    if (ConfigNode* existing = base.find(key)) {
      merge_config(*existing, value);
    } else {
      base.map.emplace_back(key, value);
      base.key_locs.push_back(over.key_locs[i]);
    }
  }
}

namespace {

ConfigNode load_with_bases(const std::string& path, std::vector<std::string>& chain, const SourceLoc* named_at) {
  std::error_code ec;
  std::string canon = fs::weakly_canonical(path, ec).string();
  if (ec) canon = path;
  if (std::find(chain.begin(), chain.end(), canon) != chain.end()) {
    std::string cycle;
    for (const auto& c : chain) cycle += c + " -> ";
    cycle += canon;
    throw ConfigErrors({{*named_at, "base", fmt::format("`base:` inheritance cycle: {}", cycle)}});
  }
  if (named_at && !fs::is_regular_file(path, ec))
    throw ConfigErrors({{*named_at, "base", fmt::format("base config '{}' not found", path)}});
  ConfigNode node = parse_yaml_file(path);

  // Find and remove `base:`.
  for (size_t i = 0; i < node.map.size(); ++i) {
    if (node.map[i].first != "base") continue;
    ConfigNode base_value = node.map[i].second;
    node.map.erase(node.map.begin() + static_cast<long>(i));
    node.key_locs.erase(node.key_locs.begin() + static_cast<long>(i));
    if (base_value.kind != ConfigNode::Kind::kScalar)
      throw ConfigErrors({{base_value.loc, "base",
                           fmt::format("expected a file path, found {}", base_value.kind_name())}});
    fs::path base_path = fs::path(base_value.scalar);
    if (base_path.is_relative()) base_path = fs::path(path).parent_path() / base_path;
    chain.push_back(canon);
    ConfigNode merged = load_with_bases(base_path.string(), chain, &base_value.loc);
    chain.pop_back();
    merge_config(merged, node);
    return merged;
  }
  return node;
}

}  // namespace

ConfigNode load_config_tree(const std::string& path) {
  std::vector<std::string> chain;
  return load_with_bases(path, chain, nullptr);
}

void apply_set_override(ConfigNode& root, const std::string& assignment, int index) {
  SourceLoc where{fmt::format("--set '{}'", assignment), 0, 0};
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigErrors({{where, "", "expected section.key=value"}});
  std::string key = assignment.substr(0, eq);
  std::string value = assignment.substr(eq + 1);
  std::vector<std::string> parts;
  std::stringstream ks(key);
  for (std::string part; std::getline(ks, part, '.');) parts.push_back(part);
  if (parts.empty() || std::any_of(parts.begin(), parts.end(), [](const std::string& p) { return p.empty(); }) ||
      key.back() == '.')
    throw ConfigErrors({{where, key, "malformed key path (expected section.key=value)"}});

  ConfigNode* node = &root;
  for (size_t i = 0; i + 1 < parts.size(); ++i) {
    ConfigNode* child = node->find(parts[i]);
    if (!child) {
      ConfigNode m;
      m.kind = ConfigNode::Kind::kMap;
      m.loc = where;
      node->map.emplace_back(parts[i], m);
      node->key_locs.push_back(where);
      child = &node->map.back().second;
    } else if (child->kind == ConfigNode::Kind::kNull) {
      child->kind = ConfigNode::Kind::kMap;
    } else if (child->kind != ConfigNode::Kind::kMap) {
      throw ConfigErrors({{where, key, fmt::format("'{}' is {}, not a section", parts[i], child->kind_name())}});
    }
    node = child;
  }
  ConfigNode leaf;
  leaf.loc = where;
  leaf.from_override = true;
  if (is_null_word(value) && !value.empty()) {
    leaf.kind = ConfigNode::Kind::kNull;
  } else {
    leaf.kind = ConfigNode::Kind::kScalar;
    leaf.scalar = value;
  }
  (void)index;
  if (ConfigNode* existing = node->find(parts.back())) {
    *existing = leaf;
  } else {
    node->map.emplace_back(parts.back(), leaf);
    node->key_locs.push_back(where);
  }
}

}  // namespace moetrain
