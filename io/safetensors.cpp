// Reading and writing safetensors files with torch tensors. The header is
// validated completely (io/safetensors_header.cpp) before any tensor memory is
// allocated, so allocation is bounded by the file's real size.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace moetrain {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; tensors are read and written as raw bytes");

namespace {

using Code = SafetensorsError::Code;

struct DtypePair {
  StDtype st;
  torch::ScalarType torch;
};

// F4 and F6_* have no torch dtype (torch's Float4_e2m1fn_x2 packs two values
// per element, so shapes would not match); they are refused by name.
constexpr DtypePair kTorchDtypes[] = {
    {StDtype::BOOL, torch::kBool},          {StDtype::U8, torch::kByte},
    {StDtype::I8, torch::kChar},            {StDtype::I16, torch::kShort},
    {StDtype::U16, torch::kUInt16},         {StDtype::F16, torch::kHalf},
    {StDtype::BF16, torch::kBFloat16},      {StDtype::I32, torch::kInt},
    {StDtype::U32, torch::kUInt32},         {StDtype::F32, torch::kFloat},
    {StDtype::F64, torch::kDouble},         {StDtype::I64, torch::kLong},
    {StDtype::U64, torch::kUInt64},         {StDtype::C64, torch::kComplexFloat},
    {StDtype::F8_E5M2, torch::kFloat8_e5m2}, {StDtype::F8_E4M3, torch::kFloat8_e4m3fn},
    {StDtype::F8_E8M0, torch::kFloat8_e8m0fnu}, {StDtype::F8_E4M3FNUZ, torch::kFloat8_e4m3fnuz},
    {StDtype::F8_E5M2FNUZ, torch::kFloat8_e5m2fnuz},
};

torch::ScalarType to_torch(StDtype dtype, const std::string& name) {
  for (const DtypePair& p : kTorchDtypes)
    if (p.st == dtype) return p.torch;
  throw SafetensorsError(Code::UnsupportedDtype, "tensor '" + name + "': dtype " + st_dtype_name(dtype) +
                                                     " has no torch equivalent");
}

StDtype from_torch(torch::ScalarType dtype, const std::string& name) {
  for (const DtypePair& p : kTorchDtypes)
    if (p.torch == dtype) return p.st;
  throw SafetensorsError(Code::UnsupportedDtype, "tensor '" + name + "': torch dtype " +
                                                     std::string(c10::toString(dtype)) + " cannot be saved as safetensors");
}

std::string errno_text() { return std::strerror(errno); }

// Closes the descriptor on every path out, exceptions included.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

void read_at(int fd, void* dst, uint64_t count, uint64_t offset, const std::string& path) {
  auto* p = static_cast<char*>(dst);
  while (count > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(count, 1u << 30));
    ssize_t got = ::pread(fd, p, chunk, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw std::runtime_error(path + ": read failed: " + errno_text());
    if (got == 0) throw std::runtime_error(path + ": unexpected end of file (did it change while being read?)");
    p += got;
    count -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
}

void write_all(int fd, const void* src, uint64_t count, const std::string& path) {
  auto* p = static_cast<const char*>(src);
  while (count > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(count, 1u << 30));
    ssize_t put = ::write(fd, p, chunk);
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) throw std::runtime_error(path + ": write failed: " + errno_text());
    p += put;
    count -= static_cast<uint64_t>(put);
  }
}

// Opens `path` and parses its header; the Fd stays open for the tensor reads.
SafetensorsHeader open_and_parse(const std::string& path, Fd& file, uint64_t* file_size) {
  file.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file.fd < 0) throw std::runtime_error(path + ": cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) throw std::runtime_error(path + ": cannot stat: " + errno_text());
  if (!S_ISREG(st.st_mode)) throw std::runtime_error(path + ": not a regular file");
  *file_size = static_cast<uint64_t>(st.st_size);
  try {
    // The length first, checked against the real size: a hostile N never
    // turns into an allocation larger than the file.
    std::vector<uint8_t> head(static_cast<size_t>(std::min<uint64_t>(*file_size, 8)));
    read_at(file.fd, head.data(), head.size(), 0, path);
    const uint64_t n = safetensors_header_length(head.data(), head.size(), *file_size);
    head.resize(static_cast<size_t>(8 + n));
    read_at(file.fd, head.data() + 8, n, 8, path);
    return parse_safetensors_header(head.data(), head.size(), *file_size);
  } catch (const SafetensorsError& e) {
    throw SafetensorsError(e.code(), path + ": " + e.what());
  }
}

}  // namespace

const torch::Tensor& SafetensorsFile::at(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return t;
  throw std::runtime_error("safetensors: no tensor named '" + name + "'");
}

bool SafetensorsFile::contains(const std::string& name) const {
  for (const auto& entry : tensors)
    if (entry.first == name) return true;
  return false;
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  Fd file(-1);
  uint64_t file_size = 0;
  return open_and_parse(path, file, &file_size);
}

SafetensorsFile read_safetensors(const std::string& path) {
  Fd file(-1);
  uint64_t file_size = 0;
  const SafetensorsHeader header = open_and_parse(path, file, &file_size);
  SafetensorsFile out;
  out.metadata = header.metadata;
  out.tensors.reserve(header.tensors.size());
  try {
    // All dtypes are checked before the first allocation.
    std::vector<torch::ScalarType> dtypes;
    for (const StTensorInfo& info : header.tensors) dtypes.push_back(to_torch(info.dtype, info.name));
    for (size_t i = 0; i < header.tensors.size(); ++i) {
      const StTensorInfo& info = header.tensors[i];
      torch::Tensor t = torch::empty(info.shape, torch::TensorOptions().dtype(dtypes[i]));
      const uint64_t bytes = info.end - info.begin;  // == t.nbytes(), checked by the parser
      if (bytes > 0) read_at(file.fd, t.data_ptr(), bytes, header.data_start + info.begin, path);
      if (dtypes[i] == torch::kBool) {
        // torch assumes bool bytes are 0 or 1; anything else is undefined behaviour
        const auto* b = static_cast<const uint8_t*>(t.data_ptr());
        for (uint64_t k = 0; k < bytes; ++k)
          if (b[k] > 1)
            throw SafetensorsError(Code::InvalidBool, "tensor '" + info.name + "': BOOL byte " +
                                                          std::to_string(b[k]) + " at element " + std::to_string(k));
      }
      out.tensors.emplace_back(info.name, std::move(t));
    }
  } catch (const SafetensorsError& e) {
    throw SafetensorsError(e.code(), path + ": " + e.what());
  }
  return out;
}

namespace {

struct Item {
  std::string name;
  torch::Tensor tensor;
  StDtype dtype;
};

// Refuses two tensors whose bytes overlap in one storage: the file would hold
// two independent copies and a reload would silently untie them.
void check_no_aliasing(const std::vector<Item>& items) {
  struct Span {
    torch::Device device;
    uintptr_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;
  for (const Item& it : items) {
    const torch::Tensor& t = it.tensor;
    if (t.numel() == 0) continue;
    uint64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += uint64_t(t.size(d) - 1) * uint64_t(std::abs(t.stride(d)));
    auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    spans.push_back({t.device(), begin, begin + extent * t.element_size(), &it.name});
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return std::make_tuple(a.device.type(), a.device.index(), a.begin) <
           std::make_tuple(b.device.type(), b.device.index(), b.begin);
  });
  for (size_t i = 1; i < spans.size(); ++i) {
    const Span& a = spans[i - 1];
    const Span& b = spans[i];
    if (a.device == b.device && b.begin < a.end)
      throw SafetensorsError(Code::AliasedTensors, "tensors '" + *a.name + "' and '" + *b.name +
                                                       "' share memory; clone one of them before saving");
  }
}

std::string temp_path_for(const std::string& path) {
  static std::atomic<unsigned> counter{0};
  return path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
}

void fsync_directory(const std::string& path) {
  // POSIX, not std::filesystem: libtorch.so exports its own copies of those
  // symbols (pytorch#133437), and some are broken (remove_all segfaults)
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  // the rename is only durable once the directory entry is on disk
  if (d.fd < 0 || ::fsync(d.fd) != 0) throw std::runtime_error(path + ": cannot fsync its directory: " + errno_text());
}

}  // namespace

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  torch::NoGradGuard no_grad;
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw SafetensorsError(Code::InvalidTensor, "tensor '" + name + "' is undefined");
    if (t.layout() != torch::kStrided || t.is_meta())
      throw SafetensorsError(Code::InvalidTensor, "tensor '" + name + "': only dense tensors with data can be saved");
    items.push_back({name, t, from_torch(t.scalar_type(), name)});
  }
  check_no_aliasing(items);
  // The reference writer's order: larger dtypes first, then by name.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.dtype != b.dtype ? a.dtype > b.dtype : a.name < b.name;
  });
  std::vector<StTensorInfo> infos;
  uint64_t offset = 0;
  for (const Item& it : items) {
    const uint64_t bytes = uint64_t(it.tensor.numel()) * uint64_t(it.tensor.element_size());
    infos.push_back({it.name, it.dtype, it.tensor.sizes().vec(), offset, offset + bytes});
    offset += bytes;
  }
  const std::string header = serialize_safetensors_header(infos, metadata);  // validates names

  const std::string tmp = temp_path_for(path);
  Fd file(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (file.fd < 0) throw std::runtime_error(tmp + ": cannot create: " + errno_text());
  try {
    write_all(file.fd, header.data(), header.size(), tmp);
    for (const Item& it : items) {
      // resolve_conj/neg: lazily conjugated views would otherwise be written raw
      torch::Tensor c = it.tensor.to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
      if (c.numel() > 0) write_all(file.fd, c.data_ptr(), c.nbytes(), tmp);
    }
    if (::fsync(file.fd) != 0) throw std::runtime_error(tmp + ": fsync failed: " + errno_text());
    const int fd = file.fd;
    file.fd = -1;
    if (::close(fd) != 0) throw std::runtime_error(tmp + ": close failed: " + errno_text());
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw std::runtime_error(path + ": cannot rename " + tmp + " into place: " + errno_text());
  } catch (...) {
    ::unlink(tmp.c_str());  // never leave a partial file behind
    throw;
  }
  fsync_directory(path);
}

}  // namespace moetrain
