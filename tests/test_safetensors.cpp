// Tests for io/safetensors*: round trips of every dtype, the writer's layout
// and atomicity, and one test per rejection rule of reliability.md §3 / §6.8,
// each checking the error Code and a message substring.
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <set>

#include "io/safetensors.h"

using moetrain::SafetensorsError;
using moetrain::write_safetensors;
using Code = SafetensorsError::Code;

namespace {

// 8-byte little-endian length, the header text, then the data bytes.
std::string st_bytes(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((uint64_t(header.size()) >> (8 * i)) & 0xff);
  return out + header + data;
}

moetrain::SafetensorsHeader parse(const std::string& bytes) {
  return moetrain::parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                                            bytes.size());
}

// POSIX, not std::filesystem: the torch wheel's libtorch.so exports its own
// copies of the std::filesystem symbols (pytorch#133437), and calls bound to
// them crash (remove_all segfaults in torch 2.11.0).
std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const std::string& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// Same dtype, shape and bytes (torch::equal does not cover fp8 or uint16).
bool same_tensor(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  torch::Tensor x = a.contiguous(), y = b.contiguous();
  return x.nbytes() == y.nbytes() && (x.nbytes() == 0 || std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0);
}

class SafetensorsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/moetrain_st_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    for (const std::string& f : files()) ::unlink((dir + "/" + f).c_str());
    ::rmdir(dir.c_str());
  }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.push_back(e->d_name);
      ::closedir(d);
    }
    return out;
  }
  size_t file_count() const { return files().size(); }
  std::string path_of(const std::string& name) const { return dir + "/" + name; }
  std::string dir;
};

std::vector<std::pair<std::string, torch::Tensor>> every_dtype() {
  torch::manual_seed(0);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  const std::vector<std::pair<std::string, torch::ScalarType>> dtypes = {
      {"bool", torch::kBool},       {"u8", torch::kByte},         {"i8", torch::kChar},
      {"i16", torch::kShort},       {"u16", torch::kUInt16},      {"f16", torch::kHalf},
      {"bf16", torch::kBFloat16},   {"i32", torch::kInt},         {"u32", torch::kUInt32},
      {"f32", torch::kFloat},       {"f64", torch::kDouble},      {"i64", torch::kLong},
      {"u64", torch::kUInt64},      {"c64", torch::kComplexFloat}, {"f8e4m3", torch::kFloat8_e4m3fn},
      {"f8e5m2", torch::kFloat8_e5m2}, {"f8e8m0", torch::kFloat8_e8m0fnu},
      {"f8e4m3fnuz", torch::kFloat8_e4m3fnuz}, {"f8e5m2fnuz", torch::kFloat8_e5m2fnuz}};
  for (const auto& [name, dt] : dtypes) {
    torch::Tensor t = dt == torch::kBool ? torch::randint(0, 2, {2, 3}).to(dt)
                      : c10::isFloatingType(dt) || c10::isComplexType(dt) ? torch::randn({2, 3}).to(dt)
                                                                           : torch::randint(0, 120, {2, 3}).to(dt);
    out.emplace_back(name, t);
  }
  out.emplace_back("scalar", torch::scalar_tensor(3.5));                       // 0-d
  out.emplace_back("empty_rows", torch::zeros({0, 4}));                        // zero-size
  out.emplace_back("empty_cols", torch::zeros({3, 0}, torch::kLong));
  out.emplace_back("transposed", torch::arange(12, torch::kFloat).view({3, 4}).t());  // non-contiguous
  return out;
}

}  // namespace

// ---------------------------------------------------------------- round trips

TEST_F(SafetensorsFiles, RoundTripEveryDtype) {
  auto tensors = every_dtype();
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "ünïcode \"quoted\"\n"}};
  write_safetensors(path_of("a.safetensors"), tensors, metadata);
  auto file = moetrain::read_safetensors(path_of("a.safetensors"));
  EXPECT_EQ(file.metadata, metadata);
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(file.contains(name)) << name;
    const torch::Tensor& r = file.at(name);
    EXPECT_TRUE(same_tensor(r, t)) << name;
    EXPECT_TRUE(r.is_contiguous() && r.device().is_cpu()) << name;
  }
  EXPECT_EQ(file.at("scalar").dim(), 0);
  EXPECT_THROW(file.at("missing"), std::runtime_error);
  EXPECT_EQ(file_count(), 1u);  // no temporary file left
}

TEST_F(SafetensorsFiles, RoundTripNoTensors) {
  write_safetensors(path_of("e.safetensors"), {});
  EXPECT_EQ(slurp(path_of("e.safetensors")), st_bytes("{}      "));
  auto file = moetrain::read_safetensors(path_of("e.safetensors"));
  EXPECT_TRUE(file.tensors.empty() && file.metadata.empty());
}

TEST_F(SafetensorsFiles, WriterLayoutPaddedAlignedSorted) {
  const std::string path = path_of("l.safetensors");
  write_safetensors(path, every_dtype());
  const std::string bytes = slurp(path);
  auto h = moetrain::read_safetensors_header(path);
  EXPECT_EQ(h.data_start % 8, 0u);
  const std::string text = bytes.substr(8, h.data_start - 8);
  EXPECT_EQ(text.find_last_not_of(' '), text.rfind('}'));  // padded with spaces only
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const auto& t = h.tensors[i];
    EXPECT_EQ((h.data_start + t.begin) % std::max(1u, moetrain::st_dtype_bits(t.dtype) / 8), 0u) << t.name;
    if (i > 0) {
      EXPECT_GE(h.tensors[i - 1].dtype, t.dtype);  // larger dtypes first
    }
  }
  EXPECT_EQ(h.tensors.front().dtype, moetrain::StDtype::U64);
  EXPECT_EQ(h.tensors.back().dtype, moetrain::StDtype::BOOL);
  EXPECT_NE(text.find(R"("u64":{"dtype":"U64","shape":[2,3],"data_offsets":[0,48]})"), std::string::npos) << text;
}

TEST_F(SafetensorsFiles, WriteReplacesExistingFileAtomically) {
  const std::string path = path_of("w.safetensors");
  write_safetensors(path, {{"a", torch::ones({2})}});
  write_safetensors(path, {{"b", torch::zeros({3})}});
  auto file = moetrain::read_safetensors(path);
  EXPECT_FALSE(file.contains("a"));
  EXPECT_TRUE(same_tensor(file.at("b"), torch::zeros({3})));
  // a refused write leaves the previous file intact and no temporary behind
  EXPECT_THROW(write_safetensors(path, {{"x", torch::ones({1})}, {"x", torch::ones({1})}}), SafetensorsError);
  EXPECT_TRUE(moetrain::read_safetensors(path).contains("b"));
  EXPECT_EQ(file_count(), 1u);
}

// ---------------------------------------------------------------- writer refusals

void expect_write_error(const std::vector<std::pair<std::string, torch::Tensor>>& tensors, Code code,
                        const std::string& substring, const std::map<std::string, std::string>& metadata = {}) {
  const std::string path = "/tmp/moetrain_st_refused_" + std::to_string(::getpid());
  try {
    write_safetensors(path, tensors, metadata);
    ADD_FAILURE() << "no error, expected " << moetrain::safetensors_error_name(code);
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
  }
  EXPECT_NE(::access(path.c_str(), F_OK), 0) << "refused write left " << path;
}

TEST(SafetensorsWriter, RefusesDuplicateNames) {
  expect_write_error({{"w", torch::ones({1})}, {"w", torch::ones({2})}}, Code::DuplicateName, "'w'");
}
TEST(SafetensorsWriter, RefusesReservedName) {
  expect_write_error({{"__metadata__", torch::ones({1})}}, Code::ReservedName, "__metadata__");
}
TEST(SafetensorsWriter, RefusesNulInName) {
  expect_write_error({{std::string("a\0b", 3), torch::ones({1})}}, Code::NulInName, "NUL");
}
TEST(SafetensorsWriter, RefusesInvalidUtf8) {
  expect_write_error({{"bad\xff", torch::ones({1})}}, Code::BadName, "UTF-8");
  expect_write_error({{"a", torch::ones({1})}}, Code::BadMetadata, "UTF-8", {{"k", "\xc0\x80"}});
}
TEST(SafetensorsWriter, RefusesAliasedTensors) {
  torch::Tensor w = torch::randn({4, 4});
  expect_write_error({{"embed", w}, {"head", w}}, Code::AliasedTensors, "'embed' and 'head'");
  expect_write_error({{"row", w[1]}, {"rows", w.slice(0, 1, 3)}}, Code::AliasedTensors, "share memory");
  // disjoint views of one storage are fine
  const std::string path = "/tmp/moetrain_st_views_" + std::to_string(::getpid());
  write_safetensors(path, {{"r0", w[0]}, {"r1", w[1]}});
  EXPECT_TRUE(same_tensor(moetrain::read_safetensors(path).at("r1"), w[1]));
  ::unlink(path.c_str());
}
TEST(SafetensorsWriter, RefusesUnsupportedDtypeAndLayout) {
  expect_write_error({{"z", torch::ones({2}, torch::kComplexDouble)}}, Code::UnsupportedDtype, "'z'");
  expect_write_error({{"s", torch::eye(3).to_sparse()}}, Code::InvalidTensor, "'s'");
  expect_write_error({{"u", torch::Tensor()}}, Code::InvalidTensor, "undefined");
}

// ---------------------------------------------------------------- reader acceptance

TEST(SafetensorsHeader, AcceptsWhitespaceEmptyAndZeroSize) {
  EXPECT_TRUE(parse(st_bytes("  {}  ")).tensors.empty());
  const std::string bytes = st_bytes(R"( {"b":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                          R"("a":{"data_offsets":[0,4],"shape":[],"dtype":"I32"},)"
                          R"("__metadata__":{"k":"v"}}   )",
                          "1234");
  auto h = parse(bytes);
  EXPECT_EQ(h.data_start, bytes.size() - 4);
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.tensors[0].name, "a");  // sorted by offset, not by key
  EXPECT_TRUE(h.tensors[0].shape.empty());
  EXPECT_EQ(h.tensors[1].shape, (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(h.metadata.at("k"), "v");
  EXPECT_TRUE(parse(st_bytes(R"({"__metadata__":null})")).metadata.empty());
}

// ---------------------------------------------------------------- reader rejections

struct Bad {
  const char* label;
  std::string bytes;
  Code code;
  const char* substring;
};

std::ostream& operator<<(std::ostream& os, const Bad& b) { return os << b.label; }

std::string f32(const std::string& name, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

const std::vector<Bad>& bad_cases() {
  static const std::string eight(8, 'x');
  static const std::vector<Bad> cases = {
      {"HeaderTooSmall", std::string("\x02\0\0\0{}", 6), Code::HeaderTooSmall, "fewer than the 8-byte"},
      {"HeaderTooLarge", std::string("\x01\xe1\xf5\x05\0\0\0\0{}      ", 16), Code::HeaderTooLarge, "100000001"},
      {"HeaderPastEof", std::string("\x40\0\0\0\0\0\0\0{}", 10), Code::InvalidHeaderLength, "runs past the end"},
      {"HugeHeaderLength", std::string(8, '\xff') + "{}", Code::HeaderTooLarge, "exceeds the limit"},
      {"InvalidUtf8", st_bytes("{\"a\xff\":1}"), Code::InvalidUtf8, "header byte 3"},
      {"Utf8Surrogate", st_bytes("{\"\xed\xa0\x80\":1}"), Code::InvalidUtf8, "UTF-8"},
      {"InvalidJson", st_bytes("{\"a\":"), Code::InvalidJson, "not valid JSON"},
      {"ByteOrderMark", st_bytes("\xef\xbb\xbf{}"), Code::InvalidJson, "byte-order mark"},
      {"NulAfterJson", st_bytes(std::string("{}\0junk", 7)), Code::InvalidJson, "raw NUL byte (at header byte 2)"},
      {"NumberOverflow", st_bytes("{" + f32("a", "[1e999]", "[0,4]") + "}", "1234"), Code::InvalidJson,
       "number overflow"},
      {"EmptyHeader", st_bytes(""), Code::InvalidJson, "not valid JSON"},
      {"TopLevelArray", st_bytes("[]"), Code::InvalidStructure, "must be a JSON object"},
      {"EntryNotObject", st_bytes("{\"a\":[1]}"), Code::InvalidStructure, "tensor 'a': entry must be an object"},
      {"MissingField", st_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[]}}"), Code::InvalidStructure,
       "tensor 'a': missing field 'data_offsets'"},
      {"UnknownField", st_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"x\":1}}", "1234"),
       Code::InvalidStructure, "unknown field 'x'"},
      {"FloatDim", st_bytes("{" + f32("a", "[1.0]", "[0,4]") + "}", "1234"), Code::InvalidStructure,
       "shape entries must be integers"},
      {"ThreeOffsets", st_bytes("{" + f32("a", "[1]", "[0,4,8]") + "}", "1234"), Code::InvalidStructure,
       "must be [begin, end]"},
      {"TooDeep", st_bytes("{\"a\":{\"shape\":[[1]]}}"), Code::InvalidStructure, "nested too deeply"},
      {"UnknownDtype", st_bytes("{\"w\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", eight + eight),
       Code::UnknownDtype, "tensor 'w': unknown dtype 'F128'"},
      {"LowercaseDtype", st_bytes("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", "1234"),
       Code::UnknownDtype, "'f32'"},
      {"MetadataNotStrings", st_bytes("{\"__metadata__\":{\"k\":1}}"), Code::BadMetadata, "key 'k' is not a string"},
      {"MetadataNotMap", st_bytes("{\"__metadata__\":[\"k\"]}"), Code::BadMetadata, "map of strings"},
      {"DuplicateName", st_bytes("{" + f32("w", "[1]", "[0,4]") + "," + f32("w", "[1]", "[4,8]") + "}", eight),
       Code::DuplicateName, "duplicate tensor 'w'"},
      {"DuplicateFieldKey", st_bytes("{\"w\":{\"dtype\":\"F32\",\"dtype\":\"F16\"}}"), Code::DuplicateKey,
       "duplicate key 'dtype' inside entry 'w'"},
      {"DuplicateMetadataKey", st_bytes("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"), Code::DuplicateKey,
       "duplicate key 'k' inside entry '__metadata__'"},
      {"DuplicateMetadata", st_bytes("{\"__metadata__\":{},\"__metadata__\":{}}"), Code::DuplicateKey,
       "duplicate key '__metadata__' in header"},
      {"ReservedName", st_bytes("{" + f32("__metadata__", "[1]", "[0,4]") + "}", "1234"), Code::ReservedName,
       "may not be named '__metadata__'"},
      {"NulInName", st_bytes("{" + f32("a\\u0000b", "[1]", "[0,4]") + "}", "1234"), Code::NulInName,
       "tensor 'a\\x00b': name contains a NUL byte"},
      {"NegativeDim", st_bytes("{" + f32("a", "[2,-1]", "[0,4]") + "}", "1234"), Code::NegativeDim,
       "tensor 'a': negative dimension -1"},
      {"ShapeOverflow", st_bytes("{" + f32("a", "[4294967296,4294967296]", "[0,4]") + "}", "1234"),
       Code::ShapeOverflow, "tensor 'a': size of shape [4294967296,4294967296] overflows"},
      {"BitsOverflow", st_bytes("{" + f32("a", "[4611686018427387904]", "[0,4]") + "}", "1234"),
       Code::ShapeOverflow, "overflows"},
      {"DimPastInt64", st_bytes("{" + f32("a", "[9223372036854775808]", "[0,4]") + "}", "1234"),
       Code::ShapeOverflow, "does not fit in int64"},
      {"ZeroSizeHidesOverflow", st_bytes("{" + f32("a", "[0,4294967296,4294967296]", "[0,0]") + "}"),
       Code::ShapeOverflow, "overflows"},
      {"NonByteSize", st_bytes("{\"a\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", "12"),
       Code::NonByteSize, "3 elements of F4"},
      {"SizeMismatch", st_bytes("{" + f32("a", "[2]", "[0,4]") + "}", "1234"), Code::SizeMismatch,
       "tensor 'a': data_offsets [0, 4) span 4 bytes but F32 x shape needs 8"},
      {"FirstBeginNotZero", st_bytes("{" + f32("a", "[1]", "[4,8]") + "}", eight), Code::InvalidOffset,
       "tensor 'a': first tensor begins at 4, not 0"},
      {"Gap", st_bytes("{" + f32("a", "[1]", "[0,4]") + "," + f32("b", "[1]", "[8,12]") + "}", eight + "1234"),
       Code::InvalidOffset, "tensor 'b': gap of 4 bytes after tensor 'a'"},
      {"Overlap", st_bytes("{" + f32("a", "[2]", "[0,8]") + "," + f32("b", "[1]", "[4,8]") + "}", eight),
       Code::InvalidOffset, "tensor 'b': data_offsets [4, 8) overlap tensor 'a'"},
      {"Aliasing", st_bytes("{" + f32("a", "[1]", "[0,4]") + "," + f32("b", "[1]", "[0,4]") + "}", "1234"),
       Code::InvalidOffset, "tensor 'b': data_offsets [0, 4) overlap tensor 'a'"},
      {"EndBeforeBegin", st_bytes("{" + f32("a", "[1]", "[0,4]") + "," + f32("b", "[1]", "[8,4]") + "}", eight),
       Code::InvalidOffset, "tensor 'b': data_offsets [8, 4) end before they begin"},
      {"NegativeOffset", st_bytes("{" + f32("a", "[1]", "[-4,0]") + "}"), Code::InvalidOffset,
       "negative data offset -4"},
      {"OffsetsPastEof", st_bytes("{" + f32("a", "[4]", "[0,16]") + "}", eight), Code::OffsetsPastEof,
       "offsets end at byte 16 of the data buffer (tensor 'a') but the file holds only 8"},
      {"TrailingBytes", st_bytes("{" + f32("a", "[1]", "[0,4]") + "}", eight), Code::TrailingBytes,
       "4 trailing bytes after the last tensor"},
      {"DataWithoutTensors", st_bytes("{}", "x"), Code::TrailingBytes, "1 trailing bytes"},
  };
  return cases;
}

class SafetensorsReject : public ::testing::TestWithParam<Bad> {};

TEST_P(SafetensorsReject, GivesCodeAndMessage) {
  const Bad& bad = GetParam();
  try {
    parse(bad.bytes);
    FAIL() << "accepted; expected " << moetrain::safetensors_error_name(bad.code);
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(moetrain::safetensors_error_name(e.code()), std::string(moetrain::safetensors_error_name(bad.code)))
        << e.what();
    EXPECT_NE(std::string(e.what()).find(bad.substring), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Rules, SafetensorsReject, ::testing::ValuesIn(bad_cases()),
                         [](const ::testing::TestParamInfo<Bad>& info) { return std::string(info.param.label); });

TEST(SafetensorsHeader, RejectionMessagesAreDistinct) {
  std::set<std::string> messages;
  for (const Bad& bad : bad_cases()) {
    try {
      parse(bad.bytes);
    } catch (const SafetensorsError& e) {
      EXPECT_TRUE(messages.insert(e.what()).second) << bad.label << ": " << e.what();
    }
  }
}

// ---------------------------------------------------------------- damaged files on disk

class SafetensorsDamage : public SafetensorsFiles {
 protected:
  void SetUp() override {
    SafetensorsFiles::SetUp();
    path = path_of("m.safetensors");
    write_safetensors(path, {{"w", torch::randn({4, 4})}, {"b", torch::ones({4}, torch::kBFloat16)}}, {{"step", "7"}});
    good = slurp(path);
  }
  void expect_read_error(const std::string& bytes, Code code, const std::string& substring) {
    spit(path, bytes);
    try {
      moetrain::read_safetensors(path);
      ADD_FAILURE() << "accepted; expected " << moetrain::safetensors_error_name(code);
    } catch (const SafetensorsError& e) {
      EXPECT_EQ(e.code(), code) << e.what();
      EXPECT_NE(std::string(e.what()).find(substring), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "message names the file: " << e.what();
    }
  }
  std::string path, good;
};

TEST_F(SafetensorsDamage, TruncatedFile) {
  expect_read_error(good.substr(0, good.size() - 1), Code::OffsetsPastEof, "holds only");
  expect_read_error(good.substr(0, 40), Code::InvalidHeaderLength, "runs past the end");
  expect_read_error(good.substr(0, 7), Code::HeaderTooSmall, "7 bytes");
  expect_read_error("", Code::HeaderTooSmall, "0 bytes");
}

TEST_F(SafetensorsDamage, HugeClaimIsRejectedBeforeAllocation) {
  // 4 TiB promised by a 100-byte file: rejected from the header, never allocated
  expect_read_error(st_bytes("{" + f32("big", "[1099511627776]", "[0,4398046511104]") + "}", "1234"),
                    Code::OffsetsPastEof, "holds only 4 bytes");
}

TEST_F(SafetensorsDamage, TrailingBytes) { expect_read_error(good + "PK\x03\x04", Code::TrailingBytes, "4 trailing"); }

TEST_F(SafetensorsDamage, BitFlippedHeader) {
  std::string bad = good;
  bad[8] ^= 0x04;  // '{' -> '\x7f'
  expect_read_error(bad, Code::InvalidJson, "not valid JSON");
  bad = good;
  bad[2] ^= 0x01;  // header length += 65536
  expect_read_error(bad, Code::InvalidHeaderLength, "runs past the end");
}

TEST_F(SafetensorsDamage, EveryHeaderBitFlipIsRejectedOrHarmless) {
  // Never a crash nor another exception type; a flip that keeps the header
  // valid (a letter of a name or of metadata) still describes the same bytes.
  const auto h = moetrain::read_safetensors_header(path);
  int rejected = 0;
  for (size_t i = 0; i < h.data_start; ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = good;
      bad[i] ^= static_cast<char>(1 << bit);
      try {
        auto parsed = parse(bad);
        EXPECT_EQ(parsed.tensors.size(), 2u);
        EXPECT_EQ(parsed.data_start, h.data_start);
      } catch (const SafetensorsError&) {
        ++rejected;
      }
    }
  }
  EXPECT_GT(rejected, 0);
}

TEST_F(SafetensorsDamage, BoolBytesMustBeZeroOrOne) {
  write_safetensors(path, {{"mask", torch::ones({3}, torch::kBool)}});
  std::string bad = slurp(path);
  bad[bad.size() - 2] = 2;
  expect_read_error(bad, Code::InvalidBool, "tensor 'mask': BOOL byte 2");
}

TEST_F(SafetensorsDamage, DtypeTorchCannotHold) {
  spit(path, st_bytes("{\"q\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}", "x"));
  EXPECT_EQ(moetrain::read_safetensors_header(path).tensors.at(0).dtype, moetrain::StDtype::F4);
  expect_read_error(slurp(path), Code::UnsupportedDtype, "tensor 'q': dtype F4 has no torch equivalent");
}

TEST(SafetensorsRead, MissingFileNamesPath) {
  try {
    moetrain::read_safetensors("/nonexistent/x.safetensors");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/x.safetensors: cannot open"), std::string::npos) << e.what();
  }
}
