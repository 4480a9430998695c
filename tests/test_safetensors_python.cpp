// Cross-check with Python's safetensors (label: parity): a file written by
// moetrain loads in safe_open with the expected dtypes, shapes, values and
// metadata, and Python's save_file of the same tensors is byte-identical to
// ours and reads back in moetrain. Skipped when the Python lacks the modules.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

#include "io/safetensors.h"
#include "test_paths.h"

namespace {

// Tensors are arange(numel) cast to the dtype, on both sides, so the values
// need no transfer; the two spec tables must match.
struct Spec {
  const char* name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
};

const std::vector<Spec> kSpecs = {
    {"bool", torch::kBool, {2, 3}},         {"u8", torch::kByte, {2, 3}},
    {"i8", torch::kChar, {2, 3}},           {"i16", torch::kShort, {2, 3}},
    {"u16", torch::kUInt16, {2, 3}},        {"f16", torch::kHalf, {2, 3}},
    {"bf16", torch::kBFloat16, {2, 3}},     {"i32", torch::kInt, {2, 3}},
    {"u32", torch::kUInt32, {2, 3}},        {"f32", torch::kFloat, {2, 3}},
    {"f64", torch::kDouble, {2, 3}},        {"i64", torch::kLong, {2, 3}},
    {"u64", torch::kUInt64, {2, 3}},        {"c64", torch::kComplexFloat, {2, 3}},
    {"f8e4m3", torch::kFloat8_e4m3fn, {5}}, {"f8e5m2", torch::kFloat8_e5m2, {5}},
    {"f8e8m0", torch::kFloat8_e8m0fnu, {5}}, {"f8e4m3fnuz", torch::kFloat8_e4m3fnuz, {5}},
    {"f8e5m2fnuz", torch::kFloat8_e5m2fnuz, {5}}, {"layers.0.ffn.w\u00fc\\\"q", torch::kFloat, {2}},
    {"scalar", torch::kFloat, {}},
    {"empty", torch::kFloat, {0, 4}},       {"empty_i64", torch::kLong, {3, 0}},
};

const char* kScript = R"PY(
import sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
specs = {
    "bool": (torch.bool, [2, 3]), "u8": (torch.uint8, [2, 3]), "i8": (torch.int8, [2, 3]),
    "i16": (torch.int16, [2, 3]), "u16": (torch.uint16, [2, 3]), "f16": (torch.float16, [2, 3]),
    "bf16": (torch.bfloat16, [2, 3]), "i32": (torch.int32, [2, 3]), "u32": (torch.uint32, [2, 3]),
    "f32": (torch.float32, [2, 3]), "f64": (torch.float64, [2, 3]), "i64": (torch.int64, [2, 3]),
    "u64": (torch.uint64, [2, 3]), "c64": (torch.complex64, [2, 3]),
    "f8e4m3": (torch.float8_e4m3fn, [5]), "f8e5m2": (torch.float8_e5m2, [5]),
    "f8e8m0": (torch.float8_e8m0fnu, [5]), "f8e4m3fnuz": (torch.float8_e4m3fnuz, [5]),
    "f8e5m2fnuz": (torch.float8_e5m2fnuz, [5]), "layers.0.ffn.w\u00fc\\\"q": (torch.float32, [2]),
    "scalar": (torch.float32, []),
    "empty": (torch.float32, [0, 4]), "empty_i64": (torch.int64, [3, 0]),
}
def make(dtype, shape):
    n = 1
    for d in shape: n *= d
    base = torch.arange(n, dtype=torch.float32).reshape(shape)
    return (base.to(torch.int64) % 2).to(torch.bool) if dtype == torch.bool else base.to(dtype)
def raw(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
ours, theirs = sys.argv[1], sys.argv[2]
with safe_open(ours, framework="pt") as f:
    assert f.metadata() == {"format": "pt"}, f.metadata()
    assert sorted(f.keys()) == sorted(specs), f.keys()
    for name, (dtype, shape) in specs.items():
        t = f.get_tensor(name)
        assert t.dtype == dtype and list(t.shape) == shape, (name, t.dtype, t.shape)
        assert torch.equal(raw(t), raw(make(dtype, shape))), name
save_file({name: make(*s) for name, s in specs.items()}, theirs, metadata={"format": "pt"})
print("python cross-check ok")
)PY";

torch::Tensor make(const Spec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  torch::Tensor base = torch::arange(n, torch::kFloat).reshape(s.shape);
  return s.dtype == torch::kBool ? (base.to(torch::kLong) % 2).to(torch::kBool) : base.to(s.dtype);
}

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() && a.nbytes() == b.nbytes() &&
         (a.nbytes() == 0 || std::memcmp(a.data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0);
}

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST(SafetensorsPython, BothDirectionsAndByteIdentical) {
  const std::string python = MOETRAIN_PYTHON;
  if (python.empty() || std::system((python + " -c 'import torch, safetensors' 2>/dev/null").c_str()) != 0)
    GTEST_SKIP() << "no Python with torch and safetensors at '" << python << "'";
  // POSIX, not std::filesystem (see tests/test_safetensors.cpp)
  char tmpl[] = "/tmp/moetrain_st_py_XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string ours = dir + "/ours.safetensors", theirs = dir + "/theirs.safetensors", script = dir + "/check.py";
  std::ofstream(script) << kScript;

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const Spec& s : kSpecs) tensors.emplace_back(s.name, make(s));
  moetrain::write_safetensors(ours, tensors, {{"format", "pt"}});

  const std::string cmd = python + " " + script + " " + ours + " " + theirs;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  auto file = moetrain::read_safetensors(theirs);
  EXPECT_EQ(file.metadata.at("format"), "pt");
  ASSERT_EQ(file.tensors.size(), kSpecs.size());
  for (const auto& [name, t] : tensors) EXPECT_TRUE(same_bytes(file.at(name), t)) << name;
  // same sort order, JSON layout and padding as the reference writer
  EXPECT_EQ(slurp(ours), slurp(theirs));
  for (const std::string& f : {ours, theirs, script}) ::unlink(f.c_str());
  ::rmdir(dir.c_str());
}
