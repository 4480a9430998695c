// defines: glob_expand, glob_match — shell-style path globs with `**`.
//
// Components match with fnmatch(3) (`*`, `?`, `[...]`; a leading `.` must be
// matched explicitly, as in the shell); a component that is exactly `**` matches
// zero or more directories. Symlinked directories are not followed under `**`
// (no cycles). Results are regular files, sorted, without duplicates.
#pragma once

#include <string>
#include <vector>

namespace moetrain {

std::vector<std::string> glob_expand(const std::string& pattern);

// Whole-path match with the same rules (used for data.exclude).
bool glob_match(const std::string& pattern, const std::string& path);

bool has_glob_chars(const std::string& s);

}  // namespace moetrain
