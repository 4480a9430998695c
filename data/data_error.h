// defines: DataError — bad data input (missing/empty sources, stale or corrupt
// token files, a dataset that does not fit the model). The app maps it to exit 2.
#pragma once

#include <stdexcept>

namespace moetrain {

// data/ must not depend on app/, so this mirrors app's UsageError: a problem the
// user fixes by changing inputs or config, not a crash.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace moetrain
