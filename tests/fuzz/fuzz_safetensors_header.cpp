// libFuzzer target for the safetensors header parser (reliability.md §6.10).
// The input is a whole file; on success the header must re-serialize and
// parse back to the same tensors (the writer and reader agree).
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#include "io/safetensors_header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  SafetensorsHeader h;
  try {
    h = parse_safetensors_header(data, size, size);
  } catch (const SafetensorsError&) {
    return 0;  // rejected cleanly: the expected outcome for most inputs
  }
  // Re-serialize (file order, offsets unchanged) and parse it again with a
  // zero-filled data buffer of the same size: the result must match.
  const std::string head = serialize_safetensors_header(h.tensors, h.metadata);
  const uint64_t buffer = size - h.data_start;
  std::string file = head + std::string(buffer, '\0');
  const SafetensorsHeader again =
      parse_safetensors_header(reinterpret_cast<const uint8_t*>(file.data()), file.size(), file.size());
  if (again.metadata != h.metadata || again.tensors.size() != h.tensors.size()) std::abort();
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const StTensorInfo& a = h.tensors[i];
    const StTensorInfo& b = again.tensors[i];
    if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.begin != b.begin || a.end != b.end)
      std::abort();
  }
  return 0;
}
