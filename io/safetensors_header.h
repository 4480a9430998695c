// defines: StDtype, StTensorInfo, SafetensorsHeader, SafetensorsError,
// parse_safetensors_header, serialize_safetensors_header — the safetensors
// header (8-byte length + JSON), parsed and validated without torch so that it
// can be fuzzed on its own (tests/fuzz/). Rules: reference/reliability.md §3.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace moetrain {

// In the reference implementation's enum order (by alignment): its writer sorts
// tensors by this order, descending, then by name; ours does the same, so both
// produce byte-identical files and every tensor is naturally aligned.
enum class StDtype : uint8_t {
  BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ,
  F8_E5M2FNUZ, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
};

const char* st_dtype_name(StDtype dtype);
uint32_t st_dtype_bits(StDtype dtype);  // 4 and 6 for the sub-byte float types
// Returns false for a name not in the list above (names are case-sensitive).
bool st_dtype_from_name(const std::string& name, StDtype* out);

struct StTensorInfo {
  std::string name;
  StDtype dtype = StDtype::F32;
  std::vector<int64_t> shape;  // each dim >= 0; {} is a 0-d tensor
  uint64_t begin = 0, end = 0;  // byte offsets into the data buffer, end exclusive
};

struct SafetensorsHeader {
  std::vector<StTensorInfo> tensors;  // sorted by offset (file order)
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + N: where the data buffer begins in the file
};

class SafetensorsError : public std::runtime_error {
 public:
  enum class Code {
    HeaderTooSmall,       // fewer than 8 bytes
    HeaderTooLarge,       // N > kMaxHeaderBytes
    InvalidHeaderLength,  // 8 + N runs past the end of the file
    InvalidUtf8,
    InvalidJson,          // syntax error, byte-order mark
    InvalidStructure,     // wrong JSON type, missing or unknown field, nesting
    UnknownDtype,
    UnsupportedDtype,     // valid safetensors dtype that torch cannot hold / write
    BadMetadata,          // __metadata__ not a map of strings to strings
    DuplicateName,        // two tensors with the same name
    DuplicateKey,         // a repeated key inside an entry or in __metadata__
    ReservedName,         // a tensor named __metadata__
    NulInName,
    BadName,              // tensor name that is not valid UTF-8 (writer)
    NegativeDim,
    ShapeOverflow,        // elements × bits overflows 64 bits / int64
    NonByteSize,          // sub-byte dtype whose total is not whole bytes
    SizeMismatch,         // end - begin != bytes of dtype × shape
    InvalidOffset,        // first begin != 0, gap, overlap, end < begin
    OffsetsPastEof,       // data buffer shorter than the offsets claim
    TrailingBytes,        // bytes after the last tensor (anti-polyglot)
    InvalidBool,          // BOOL tensor holding a byte other than 0 or 1
    AliasedTensors,       // writer: two tensors share memory
    InvalidTensor,        // writer: sparse or otherwise unwritable tensor
  };
  SafetensorsError(Code code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  Code code() const { return code_; }

 private:
  Code code_;
};

const char* safetensors_error_name(SafetensorsError::Code code);

constexpr uint64_t kMaxHeaderBytes = 100000000;  // same cap as the reference

// Checks the 8-byte prefix (rules 1-3) and returns N. `size` bytes of the file
// are available at `data` (at least 8 unless the file itself is shorter).
uint64_t safetensors_header_length(const uint8_t* data, size_t size, uint64_t file_size);

// Validates the whole header against the file size: JSON, dtypes, shapes,
// offsets contiguous from 0, and last end == file_size - (8 + N). `data` must
// hold at least the first 8 + N bytes of the file (the fuzzer passes the whole
// input with file_size == size). Throws SafetensorsError; std::invalid_argument
// when `size` is shorter than 8 + N though the file is long enough.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, uint64_t file_size);

// The 8-byte length plus the compact JSON, padded with spaces to a multiple of
// 8 bytes. `tensors` must already be in file order with contiguous offsets.
// Throws SafetensorsError for duplicate, reserved, NUL-holding or non-UTF-8
// names and for a header over kMaxHeaderBytes.
std::string serialize_safetensors_header(const std::vector<StTensorInfo>& tensors,
                                         const std::map<std::string, std::string>& metadata);

}  // namespace moetrain
