// Read-only memory map of a .safetensors file, and zero-copy views of the tensors in it.
//
// File layout: u64 little-endian header length N | N bytes of JSON header | data section.
// The JSON is parsed by the caller (Python's json module); this file checks every tensor the
// header names against the file before anything reads it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gally {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws on a missing, short or corrupt file
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  size_t size() const { return size_; }
  std::string header() const;                                      // the JSON header text
  const uint8_t* data() const { return base_ + 8 + header_len_; }  // start of the data section
  size_t data_size() const { return size_ - 8 - header_len_; }

 private:
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  size_t header_len_ = 0;
};

// A tensor: `data` points into a mapped file (kept alive by `file`) or into `owned` memory.
struct Tensor {
  std::string name;
  std::string dtype;  // safetensors spelling: "F32", "BF16", "F16", "I8", ...
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::shared_ptr<MappedFile> file;             // set for views into a file
  std::shared_ptr<std::vector<uint8_t>> owned;  // set for converted copies
  int64_t numel() const;
};

// Bytes per element of a safetensors dtype; 0 if the dtype is unknown.
size_t safetensors_dtype_size(const std::string& dtype);

struct TensorEntry {  // one header entry, as parsed from the JSON
  std::string name, dtype;
  std::vector<int64_t> shape;
  int64_t begin, end;  // data_offsets, relative to the data section
};

// Checks each entry against the file (dtype known, offsets inside the data section, byte span =
// shape × element size, no two tensors overlapping) and returns views. Throws with the file and
// tensor named on the first violation.
std::vector<Tensor> tensor_views(const std::shared_ptr<MappedFile>& file, const std::vector<TensorEntry>& entries);

}  // namespace gally
