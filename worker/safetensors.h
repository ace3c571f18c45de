// File: worker/safetensors.h
//
// The safetensors file format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of JSON header, then the
// data section. The header maps tensor names to {dtype, shape, data_offsets}
// (offsets relative to the data section) plus an optional "__metadata__"
// object of string values.
//
// Files are untrusted input. ParseSafetensorsHeader validates everything
// before any byte of tensor data is touched: header length within the file,
// valid JSON object, no duplicate names, dtype one of F32/BF16/F16 (other
// dtypes are rejected with the tensor's name), shape of non-negative
// integers whose byte size does not overflow, data_offsets [begin, end] with
// end - begin equal to the tensor's byte size, and the tensors tiling the data
// section exactly (no overlap, no gap, nothing past the end), as the reference
// implementation requires.
//
// SafetensorsFile memory-maps a file and converts tensors to f32 one at a
// time; SafetensorsWriter streams tensors into a new file in the given order.
#ifndef DN_WORKER_SAFETENSORS_H_
#define DN_WORKER_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/tensor.h"

namespace dn::worker {

// Largest JSON header accepted (the reference implementation's limit).
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = uint64_t{100} << 20;

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> tensors;  // ordered by data offset
  std::map<std::string, std::string> metadata;
  uint64_t data_offset = 0;  // 8 + header length: where the data section starts
  uint64_t data_size = 0;    // bytes in the data section
};

// Parses and validates the header of a safetensors file whose complete
// contents are `file[0, file_size)`. Only the first 8 + N bytes are read;
// file_size bounds the data offsets. Never crashes on malformed input.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file,
                                                         size_t file_size);

// "F32", "BF16", "F16".
const char* SafetensorsDTypeName(DType dtype);

// n elements of `dtype` at `src` (any alignment, little-endian) -> f32.
void ConvertToF32(DType dtype, const void* src, size_t n, float* dst);
// n f32 values -> `dtype` at `dst` (bf16/f16 round to nearest even).
void ConvertFromF32(DType dtype, const float* src, size_t n, void* dst);

// A read-only, memory-mapped safetensors file.
class SafetensorsFile {
 public:
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::string& path);

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<SafetensorsEntry>& tensors() const {
    return header_.tensors;
  }
  // nullptr when the file has no tensor of that name.
  const SafetensorsEntry* Find(const std::string& name) const;
  // The tensor's raw bytes inside the mapping.
  const uint8_t* RawData(const SafetensorsEntry& entry) const;
  // Converts the tensor to f32 into dst (NumElements(entry.shape) floats),
  // then releases the pages it touched from this process's mapping.
  // Thread-safe.
  absl::Status ReadF32(const SafetensorsEntry& entry, float* dst) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  SafetensorsHeader header_;
  std::unordered_map<std::string, size_t> index_;
};

// Writes a safetensors file: the header (tensors in the given order, then
// padded with spaces so the data section starts 8-byte aligned), then each
// tensor's bytes, which the caller supplies one tensor at a time in the same
// order. Writes to `path + ".tmp"` and renames on Finish, so an interrupted
// write never leaves a truncated file under `path`.
class SafetensorsWriter {
 public:
  struct TensorInfo {
    std::string name;
    DType dtype = DType::kF32;
    Shape shape;
  };

  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<TensorInfo> tensors,
      const std::map<std::string, std::string>& metadata = {});

  // Appends the bytes of the next tensor (exactly its byte size).
  absl::Status WriteNext(const void* data, size_t nbytes);
  // Checks every tensor was written, flushes, and renames into place.
  absl::Status Finish();

  // Bytes of the finished file (header included).
  uint64_t file_size() const { return file_size_; }

 private:
  SafetensorsWriter() = default;

  std::string path_;
  std::string tmp_path_;
  std::FILE* file_ = nullptr;
  std::vector<TensorInfo> tensors_;
  size_t next_ = 0;
  uint64_t file_size_ = 0;
  bool finished_ = false;
};

// One in-memory tensor for WriteSafetensors.
struct SafetensorsTensorRef {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
  const void* data = nullptr;  // NumElements(shape) * DTypeSize(dtype) bytes
};

// Convenience: writes in-memory tensors (in the given order) to `path`.
absl::Status WriteSafetensors(
    const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace dn::worker

#endif  // DN_WORKER_SAFETENSORS_H_
