#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace gally {
namespace {

// The safetensors format caps its JSON header at 100 MB (its reference reader refuses more);
// header() copies it, so a file may not claim more.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::runtime_error file_error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

}  // namespace

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw file_error(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw file_error(path, std::string("cannot stat: ") + std::strerror(e));
  }
  size_ = size_t(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    throw std::invalid_argument(path + ": not a safetensors file (" + std::to_string(size_) +
                                " bytes, shorter than 8 bytes: the 8-byte header length)");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  int e = errno;
  ::close(fd);
  if (p == MAP_FAILED) throw file_error(path, std::string("cannot mmap: ") + std::strerror(e));
  base_ = (const uint8_t*)p;
#if defined(MADV_HUGEPAGE)
  // Weights are read front to back every token: ask for huge pages where the kernel can back a
  // file with them (fewer TLB misses, prefetchers that don't stop every 4 KiB), and read ahead.
  ::madvise(p, size_, MADV_HUGEPAGE);
#endif
  ::madvise(p, size_, MADV_WILLNEED);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | base_[i];  // little-endian u64
  if (n > kMaxHeaderBytes) {
    ::munmap((void*)base_, size_);
    throw std::invalid_argument(path + ": corrupt safetensors file: header length " + std::to_string(n) +
                                " exceeds the format's limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (n > size_ - 8) {
    ::munmap((void*)base_, size_);
    throw std::invalid_argument(path + ": corrupt or truncated safetensors file: header length " + std::to_string(n) +
                                " exceeds the file size " + std::to_string(size_));
  }
  header_len_ = size_t(n);
}

MappedFile::~MappedFile() {
  if (base_) ::munmap((void*)base_, size_);
}

std::string MappedFile::header() const { return std::string((const char*)base_ + 8, header_len_); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t safetensors_dtype_size(const std::string& t) {
  if (t == "F64" || t == "I64" || t == "U64") return 8;
  if (t == "F32" || t == "I32" || t == "U32") return 4;
  if (t == "F16" || t == "BF16" || t == "I16" || t == "U16") return 2;
  if (t == "I8" || t == "U8" || t == "BOOL" || t == "F8_E4M3" || t == "F8_E5M2") return 1;
  return 0;
}

std::vector<Tensor> tensor_views(const std::shared_ptr<MappedFile>& file, const std::vector<TensorEntry>& entries) {
  const std::string& path = file->path();
  const int64_t data_size = int64_t(file->data_size());
  auto bad = [&](const TensorEntry& e, const std::string& what) {
    return std::invalid_argument(path + ": tensor '" + e.name + "': " + what);
  };
  std::vector<Tensor> out;
  std::vector<std::pair<int64_t, int64_t>> spans;
  std::vector<const std::string*> span_names;
  for (const auto& e : entries) {
    const size_t esize = safetensors_dtype_size(e.dtype);
    if (esize == 0) throw bad(e, "unknown dtype '" + e.dtype + "'");
    int64_t numel = 1;
    for (int64_t d : e.shape) {
      if (d < 0) throw bad(e, "negative dimension in shape");
      if (d != 0 && numel > (int64_t(1) << 50) / d) throw bad(e, "shape too large");
      numel *= d;
    }
    if (e.begin < 0 || e.end < e.begin)
      throw bad(e, "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "] are not an interval");
    if (e.end > data_size)
      throw bad(e, "data_offsets end " + std::to_string(e.end) + " lies past the data section (" +
                       std::to_string(data_size) + " bytes): the file is truncated or corrupt");
    if (e.end - e.begin != numel * int64_t(esize))
      throw bad(e, "byte span " + std::to_string(e.end - e.begin) + " does not match shape × " + std::to_string(esize) +
                       " bytes = " + std::to_string(numel * int64_t(esize)));
    Tensor t;
    t.name = e.name;
    t.dtype = e.dtype;
    t.shape = e.shape;
    t.data = file->data() + e.begin;
    t.file = file;
    out.push_back(std::move(t));
    if (e.end > e.begin) {
      spans.push_back({e.begin, e.end});
      span_names.push_back(&e.name);
    }
  }
  std::vector<size_t> order(spans.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return spans[a] < spans[b]; });
  for (size_t i = 1; i < order.size(); ++i)
    if (spans[order[i]].first < spans[order[i - 1]].second)
      throw std::invalid_argument(path + ": corrupt safetensors file: the data of tensors '" +
                                  *span_names[order[i - 1]] + "' and '" + *span_names[order[i]] + "' overlap");
  return out;
}

}  // namespace gally
