#include "data/glob.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <system_error>

#include <fnmatch.h>

namespace moetrain {

namespace fs = std::filesystem;

namespace {

std::vector<std::string> split_components(const std::string& s) {
  std::vector<std::string> out;
  size_t p = 0;
  while (p <= s.size()) {
    size_t q = s.find('/', p);
    if (q == std::string::npos) q = s.size();
    if (q > p) out.push_back(s.substr(p, q - p));  // drops empty parts ("a//b", leading '/')
    p = q + 1;
  }
  return out;
}

bool component_match(const std::string& pat, const std::string& name) {
  return fnmatch(pat.c_str(), name.c_str(), FNM_PERIOD) == 0;
}

// Component-wise match with `**` = zero or more components.
bool match_from(const std::vector<std::string>& pat, size_t i, const std::vector<std::string>& path, size_t j) {
  if (i == pat.size()) return j == path.size();
  if (pat[i] == "**") {
    for (size_t k = j; k <= path.size(); ++k)
      if (match_from(pat, i + 1, path, k)) return true;
    return false;
  }
  return j < path.size() && component_match(pat[i], path[j]) && match_from(pat, i + 1, path, j + 1);
}

void walk(const fs::path& dir, const std::vector<std::string>& pat, size_t i, std::set<std::string>& out) {
  std::error_code ec;
  if (i == pat.size()) {
    if (fs::is_regular_file(dir, ec)) out.insert(dir.string());
    return;
  }
  const std::string& c = pat[i];
  if (c == "**") {
    walk(dir, pat, i + 1, out);  // zero directories
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (name[0] == '.') continue;  // like the shell: ** skips hidden directories
      if (it->is_directory(ec) && !it->is_symlink(ec)) walk(it->path(), pat, i, out);
      else if (i + 1 == pat.size() && it->is_regular_file(ec)) out.insert(it->path().string());  // trailing **
    }
    return;
  }
  if (!has_glob_chars(c)) {
    const fs::path next = dir / c;
    if (fs::exists(next, ec)) walk(next, pat, i + 1, out);
    return;
  }
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (component_match(c, it->path().filename().string())) walk(it->path(), pat, i + 1, out);
  }
}

}  // namespace

bool has_glob_chars(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

std::vector<std::string> glob_expand(const std::string& pattern) {
  std::set<std::string> out;
  const bool absolute = !pattern.empty() && pattern[0] == '/';
  walk(absolute ? fs::path("/") : fs::path("."), split_components(pattern), 0, out);
  std::vector<std::string> files;
  files.reserve(out.size());
  // Relative patterns give relative paths, without the "./" the walk starts from.
  for (const auto& f : out) files.push_back(fs::path(f).lexically_normal().string());
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  return files;
}

bool glob_match(const std::string& pattern, const std::string& path) {
  return match_from(split_components(pattern), 0, split_components(path), 0);
}

}  // namespace moetrain
