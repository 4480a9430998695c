// The safetensors header parser: no torch here, so the fuzzer links this file
// alone. Every rejection has its own Code and a message naming the tensor.
#include "io/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

namespace moetrain {
namespace {

using Json = nlohmann::json;
using Code = SafetensorsError::Code;

struct DtypeRow {
  StDtype dtype;
  const char* name;
  uint32_t bits;
};

constexpr DtypeRow kDtypes[] = {
    {StDtype::BOOL, "BOOL", 8},          {StDtype::F4, "F4", 4},
    {StDtype::F6_E2M3, "F6_E2M3", 6},    {StDtype::F6_E3M2, "F6_E3M2", 6},
    {StDtype::U8, "U8", 8},              {StDtype::I8, "I8", 8},
    {StDtype::F8_E5M2, "F8_E5M2", 8},    {StDtype::F8_E4M3, "F8_E4M3", 8},
    {StDtype::F8_E8M0, "F8_E8M0", 8},    {StDtype::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {StDtype::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8},
    {StDtype::I16, "I16", 16},           {StDtype::U16, "U16", 16},
    {StDtype::F16, "F16", 16},           {StDtype::BF16, "BF16", 16},
    {StDtype::I32, "I32", 32},           {StDtype::U32, "U32", 32},
    {StDtype::F32, "F32", 32},           {StDtype::C64, "C64", 64},
    {StDtype::F64, "F64", 64},           {StDtype::I64, "I64", 64},
    {StDtype::U64, "U64", 64},
};

[[noreturn]] void fail(Code code, const std::string& message) {
  throw SafetensorsError(code, message);
}

// Names go into messages quoted, with control bytes (NUL above all) escaped so
// that a hostile name cannot hide or forge text in a log line.
// Long strings are cut: a message should not carry megabytes of header.
std::string quote(const std::string& s) {
  std::string out = "'";
  for (unsigned char c : s.substr(0, 200)) {
    if (c < 0x20 || c == 0x7f) {
      const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + (s.size() > 200 ? "'..." : "'");
}

std::string snippet(const Json& value) {
  const std::string text = value.dump();
  return text.size() > 40 ? text.substr(0, 40) + "..." : text;
}

std::string tensor_ref(const std::string& name) { return "tensor " + quote(name); }

// Strict UTF-8 (no overlongs, surrogates or code points above U+10FFFF), as
// Rust's str::from_utf8 in the reference reader. Returns the first bad offset.
size_t utf8_error_at(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = s[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > n) return i;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1f) : len == 3 ? (c & 0x0f) : (c & 0x07);
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    static const uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
    i += len;
  }
  return n;
}

// Parses the JSON, rejecting duplicate keys at any level (nlohmann would keep
// the last one silently: the parser differential of TOB-SFTN-7) and nesting
// deeper than header -> entry -> shape array, which also bounds the DOM.
Json parse_json(const char* text, size_t n) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string entry;                         // the top-level key being parsed
  Json::parser_callback_t cb = [&](int depth, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth > 2) fail(Code::InvalidStructure, "header nested too deeply (inside entry " + quote(entry) + ")");
        if (event == Json::parse_event_t::object_start) keys.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        keys.pop_back();
        break;
      case Json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (depth == 1) entry = key;
        if (!keys.back().insert(key).second) {
          if (depth == 1 && key != "__metadata__")
            fail(Code::DuplicateName, "duplicate " + tensor_ref(key) + " in header");
          fail(Code::DuplicateKey, "duplicate key " + quote(key) +
                                       (depth == 1 ? std::string(" in header") : " inside entry " + quote(entry)));
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return Json::parse(text, text + n, cb);
  } catch (const Json::exception& e) {  // parse_error, or out_of_range for 1e999
    fail(Code::InvalidJson, std::string("header is not valid JSON: ") + e.what());
  }
}

std::map<std::string, std::string> parse_metadata(const Json& value) {
  std::map<std::string, std::string> out;
  if (value.is_null()) return out;  // the reference reads null as "no metadata"
  if (!value.is_object()) fail(Code::BadMetadata, "'__metadata__' must be a map of strings to strings");
  for (const auto& [key, v] : value.items()) {
    if (!v.is_string()) {
      // #849: a tensor saved under this name looks like a metadata map
      if (value.contains("data_offsets"))
        fail(Code::ReservedName, "a tensor may not be named '__metadata__' (reserved for the metadata map)");
      fail(Code::BadMetadata, "'__metadata__' value for key " + quote(key) + " is not a string");
    }
    out[key] = v.get<std::string>();
  }
  return out;
}

[[noreturn]] void shape_overflow(const StTensorInfo& t) {
  std::string dims;
  for (int64_t d : t.shape) dims += (dims.empty() ? "" : ",") + std::to_string(d);
  fail(Code::ShapeOverflow, tensor_ref(t.name) + ": size of shape [" + dims + "] overflows");
}

StTensorInfo parse_entry(const std::string& name, const Json& value) {
  const std::string who = tensor_ref(name);
  if (name.find('\0') != std::string::npos) fail(Code::NulInName, who + ": name contains a NUL byte");
  if (!value.is_object()) fail(Code::InvalidStructure, who + ": entry must be an object");
  for (const auto& [key, v] : value.items()) {
    (void)v;
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      fail(Code::InvalidStructure, who + ": unknown field " + quote(key));
  }
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!value.contains(field)) fail(Code::InvalidStructure, who + ": missing field '" + field + "'");

  StTensorInfo info;
  info.name = name;
  const Json& dtype = value["dtype"];
  if (!dtype.is_string()) fail(Code::InvalidStructure, who + ": 'dtype' must be a string");
  if (!st_dtype_from_name(dtype.get<std::string>(), &info.dtype))
    fail(Code::UnknownDtype, who + ": unknown dtype " + quote(dtype.get<std::string>()));

  const Json& shape = value["shape"];
  if (!shape.is_array()) fail(Code::InvalidStructure, who + ": 'shape' must be an array");
  for (const Json& d : shape) {
    if (d.is_number_unsigned()) {
      if (d.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
        fail(Code::ShapeOverflow, who + ": dimension " + d.dump() + " does not fit in int64");
      info.shape.push_back(d.get<int64_t>());
    } else if (d.is_number_integer()) {
      fail(Code::NegativeDim, who + ": negative dimension " + d.dump() + " in shape");
    } else {
      fail(Code::InvalidStructure, who + ": shape entries must be integers, got " + snippet(d));
    }
  }

  const Json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2)
    fail(Code::InvalidStructure, who + ": 'data_offsets' must be [begin, end]");
  for (const Json& o : offsets) {
    if (o.is_number_integer() && !o.is_number_unsigned())
      fail(Code::InvalidOffset, who + ": negative data offset " + o.dump());
    if (!o.is_number_unsigned())
      fail(Code::InvalidStructure, who + ": data offsets must be integers below 2^64, got " + snippet(o));
  }
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  return info;
}

// Bytes of dtype × shape, with checked arithmetic. Zero dims are skipped in
// the overflow check (stricter than the reference, which stops multiplying
// at a zero) so that torch is never asked for a shape whose strides overflow.
uint64_t tensor_bytes(const StTensorInfo& t) {
  uint64_t nonzero = 1, bits = 0;
  bool empty = false;
  for (int64_t d : t.shape) {
    empty = empty || d == 0;
    if (__builtin_mul_overflow(nonzero, std::max<uint64_t>(uint64_t(d), 1), &nonzero)) shape_overflow(t);
  }
  const uint64_t elems = empty ? 0 : nonzero;
  if (nonzero > uint64_t(std::numeric_limits<int64_t>::max()) ||
      __builtin_mul_overflow(elems, uint64_t(st_dtype_bits(t.dtype)), &bits))
    shape_overflow(t);
  if (bits % 8 != 0)
    fail(Code::NonByteSize, tensor_ref(t.name) + ": " + std::to_string(elems) + " elements of " +
                                st_dtype_name(t.dtype) + " are not a whole number of bytes");
  return bits / 8;
}

}  // namespace

const char* st_dtype_name(StDtype dtype) { return kDtypes[static_cast<int>(dtype)].name; }
uint32_t st_dtype_bits(StDtype dtype) { return kDtypes[static_cast<int>(dtype)].bits; }

bool st_dtype_from_name(const std::string& name, StDtype* out) {
  for (const DtypeRow& row : kDtypes) {
    if (name == row.name) {
      *out = row.dtype;
      return true;
    }
  }
  return false;
}

const char* safetensors_error_name(SafetensorsError::Code code) {
  static const char* const kNames[] = {
      "HeaderTooSmall", "HeaderTooLarge", "InvalidHeaderLength", "InvalidUtf8", "InvalidJson",
      "InvalidStructure", "UnknownDtype", "UnsupportedDtype", "BadMetadata", "DuplicateName",
      "DuplicateKey", "ReservedName", "NulInName", "BadName", "NegativeDim", "ShapeOverflow",
      "NonByteSize", "SizeMismatch", "InvalidOffset", "OffsetsPastEof", "TrailingBytes",
      "InvalidBool", "AliasedTensors", "InvalidTensor"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == size_t(Code::InvalidTensor) + 1, "one name per Code");
  return kNames[static_cast<int>(code)];
}

uint64_t safetensors_header_length(const uint8_t* data, size_t size, uint64_t file_size) {
  if (file_size < 8) fail(Code::HeaderTooSmall, "file has " + std::to_string(file_size) + " bytes, fewer than the 8-byte header length");
  if (size < 8) throw std::invalid_argument("safetensors_header_length: needs the first 8 bytes");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];  // little-endian u64
  if (n > kMaxHeaderBytes)
    fail(Code::HeaderTooLarge, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  if (n > file_size - 8)
    fail(Code::InvalidHeaderLength, "header length " + std::to_string(n) + " runs past the end of the " + std::to_string(file_size) + "-byte file");
  return n;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size, uint64_t file_size) {
  const uint64_t n = safetensors_header_length(data, size, file_size);
  if (size < 8 + n) throw std::invalid_argument("parse_safetensors_header: needs the first 8 + N bytes");
  const uint8_t* text = data + 8;
  size_t bad = utf8_error_at(text, n);
  if (bad != n) fail(Code::InvalidUtf8, "header is not valid UTF-8 (at header byte " + std::to_string(bad) + ")");
  // Two parser differentials with the reference (serde_json): nlohmann skips a
  // byte-order mark, and stops at a raw NUL, ignoring whatever follows it.
  if (n >= 3 && text[0] == 0xef && text[1] == 0xbb && text[2] == 0xbf)
    fail(Code::InvalidJson, "header starts with a UTF-8 byte-order mark");
  if (const void* nul = std::memchr(text, 0, n))
    fail(Code::InvalidJson, "header holds a raw NUL byte (at header byte " +
                                std::to_string(static_cast<const uint8_t*>(nul) - text) + ")");
  const Json json = parse_json(reinterpret_cast<const char*>(text), n);
  if (!json.is_object()) fail(Code::InvalidStructure, "header must be a JSON object");

  SafetensorsHeader header;
  header.data_start = 8 + n;
  for (const auto& [key, value] : json.items()) {
    if (key == "__metadata__") {
      header.metadata = parse_metadata(value);
    } else {
      header.tensors.push_back(parse_entry(key, value));
    }
  }
  std::sort(header.tensors.begin(), header.tensors.end(), [](const StTensorInfo& a, const StTensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });

  // Offsets must tile the data buffer exactly: from 0, no gap, no overlap.
  uint64_t expected = 0;
  const std::string* prev = nullptr;
  for (const StTensorInfo& t : header.tensors) {
    const std::string who = tensor_ref(t.name);
    const std::string span = "[" + std::to_string(t.begin) + ", " + std::to_string(t.end) + ")";
    if (t.end < t.begin) fail(Code::InvalidOffset, who + ": data_offsets " + span + " end before they begin");
    if (t.begin != expected) {
      if (!prev) fail(Code::InvalidOffset, who + ": first tensor begins at " + std::to_string(t.begin) + ", not 0");
      if (t.begin > expected)
        fail(Code::InvalidOffset, who + ": gap of " + std::to_string(t.begin - expected) + " bytes after " +
                                      tensor_ref(*prev) + " (which ends at " + std::to_string(expected) + ")");
      fail(Code::InvalidOffset, who + ": data_offsets " + span + " overlap " + tensor_ref(*prev) +
                                    " (which ends at " + std::to_string(expected) + ")");
    }
    const uint64_t need = tensor_bytes(t);
    if (t.end - t.begin != need)
      fail(Code::SizeMismatch, who + ": data_offsets " + span + " span " + std::to_string(t.end - t.begin) +
                                   " bytes but " + st_dtype_name(t.dtype) + " x shape needs " + std::to_string(need));
    expected = t.end;
    prev = &t.name;
  }
  const uint64_t buffer = file_size - header.data_start;
  if (expected > buffer)
    fail(Code::OffsetsPastEof, "offsets end at byte " + std::to_string(expected) + " of the data buffer (" +
                                   tensor_ref(*prev) + ") but the file holds only " + std::to_string(buffer) +
                                   " bytes after the header (truncated?)");
  if (expected < buffer)
    fail(Code::TrailingBytes, std::to_string(buffer - expected) + " trailing bytes after the last tensor");
  return header;
}

std::string serialize_safetensors_header(const std::vector<StTensorInfo>& tensors,
                                         const std::map<std::string, std::string>& metadata) {
  // Same layout as the reference writer: metadata first, then tensors in file
  // order; keys within an entry in the order dtype, shape, data_offsets.
  nlohmann::ordered_json json = nlohmann::ordered_json::object();
  if (!metadata.empty()) json["__metadata__"] = metadata;
  std::set<std::string> seen;
  for (const StTensorInfo& t : tensors) {
    const std::string who = tensor_ref(t.name);
    if (t.name == "__metadata__") fail(Code::ReservedName, "a tensor may not be named '__metadata__' (reserved for the metadata map)");
    if (t.name.find('\0') != std::string::npos) fail(Code::NulInName, who + ": name contains a NUL byte");
    if (utf8_error_at(reinterpret_cast<const uint8_t*>(t.name.data()), t.name.size()) != t.name.size())
      fail(Code::BadName, who + ": name is not valid UTF-8");
    if (!seen.insert(t.name).second) fail(Code::DuplicateName, "duplicate " + who);
    json[t.name] = {{"dtype", st_dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  for (const auto& [k, v] : metadata) {
    for (const std::string* s : {&k, &v})
      if (utf8_error_at(reinterpret_cast<const uint8_t*>(s->data()), s->size()) != s->size())
        fail(Code::BadMetadata, "metadata key or value " + quote(*s) + " is not valid UTF-8");
  }
  std::string text = json.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderBytes)
    fail(Code::HeaderTooLarge, "header of " + std::to_string(text.size()) + " bytes exceeds the limit of " +
                                   std::to_string(kMaxHeaderBytes));
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((uint64_t(text.size()) >> (8 * i)) & 0xff);
  return out + text;
}

}  // namespace moetrain
