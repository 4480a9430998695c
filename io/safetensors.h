// defines: read_safetensors, read_safetensors_header, write_safetensors,
// SafetensorsFile — tensors in the safetensors format (never pickle). Reading
// validates the whole header first (io/safetensors_header.h) and allocates no
// more than the file holds.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "io/safetensors_header.h"

namespace moetrain {

// Tensors in file order (by data offset) plus the optional __metadata__ map.
struct SafetensorsFile {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  // Throws std::runtime_error naming `name` when absent.
  const torch::Tensor& at(const std::string& name) const;
  bool contains(const std::string& name) const;
};

// Throws SafetensorsError (io/safetensors_header.h) for malformed files and
// std::runtime_error (with the path) for I/O failures. Tensors are CPU,
// contiguous, owning their memory.
SafetensorsFile read_safetensors(const std::string& path);

// Reads and validates only the header (names, dtypes, shapes, offsets, and the
// size check against the file): listing a checkpoint without loading it.
SafetensorsHeader read_safetensors_header(const std::string& path);

// Writes atomically: a temporary file beside `path`, fsync, rename.
// Tensors must have distinct names; they are written contiguous, little-endian,
// in the given dtype (non-CPU tensors are copied to the CPU first).
// File order is the reference writer's (dtype alignment descending, then name),
// so every tensor is naturally aligned; overlapping (aliased) tensors are
// refused, as Python's save_file does.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace moetrain
