#include "worker/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace dn::worker {
namespace {

using Json = nlohmann::json;

// Quotes a (possibly hostile) name for an error message: printable ASCII
// kept, everything else escaped, long names cut.
std::string Quote(const std::string& s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 200; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  if (s.size() > 200) out += "...";
  out += "'";
  return out;
}

std::string JsonTypeForError(const Json& j) {
  if (j.is_number_integer() && !j.is_number_unsigned()) return "negative integer";
  if (j.is_number_float()) return "non-integer number";
  return j.type_name();
}

bool ParseDType(const std::string& s, DType* out) {
  if (s == "F32") { *out = DType::kF32; return true; }
  if (s == "BF16") { *out = DType::kBF16; return true; }
  if (s == "F16") { *out = DType::kF16; return true; }
  return false;
}

absl::Status ParseEntry(const std::string& name, const Json& value,
                        uint64_t data_size, SafetensorsEntry* entry) {
  const std::string where = absl::StrCat("tensor ", Quote(name));
  if (name.empty()) return absl::InvalidArgumentError("empty tensor name");
  if (!value.is_object())
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": expected an object, got ", JsonTypeForError(value)));
  for (auto it = value.begin(); it != value.end(); ++it) {
    if (it.key() != "dtype" && it.key() != "shape" &&
        it.key() != "data_offsets")
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unknown field ", Quote(it.key())));
  }
  entry->name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end())
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing 'dtype'"));
  if (!dtype_it->is_string())
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": 'dtype' must be a string, got ", JsonTypeForError(*dtype_it)));
  const std::string& dtype = dtype_it->get_ref<const std::string&>();
  if (!ParseDType(dtype, &entry->dtype))
    return absl::InvalidArgumentError(
        absl::StrCat(where, " has dtype ", Quote(dtype),
                     "; only F32, BF16 and F16 are supported"));

  auto shape_it = value.find("shape");
  if (shape_it == value.end())
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing 'shape'"));
  if (!shape_it->is_array())
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": 'shape' must be an array, got ", JsonTypeForError(*shape_it)));
  // numel ignoring zero dims, kept <= 2^62 so NumElements never overflows.
  constexpr uint64_t kMaxCount = uint64_t{1} << 62;
  uint64_t nonzero_product = 1;
  bool has_zero = false;
  entry->shape.clear();
  for (const Json& d : *shape_it) {
    if (!d.is_number_unsigned())
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape entries must be non-negative integers, got ",
                       JsonTypeForError(d)));
    const uint64_t v = d.get<uint64_t>();
    if (v > kMaxCount)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape entry ", v, " is too large"));
    if (v == 0) {
      has_zero = true;
    } else {
      if (nonzero_product > kMaxCount / v)  // (not dump(): entries after this one are unchecked)
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": shape ", ShapeString(entry->shape), " times ", v,
            " has more than ", kMaxCount, " elements"));
      nonzero_product *= v;
    }
    entry->shape.push_back(static_cast<int64_t>(v));
  }
  const uint64_t numel = has_zero ? 0 : nonzero_product;
  const uint64_t elem = DTypeSize(entry->dtype);
  if (numel > std::numeric_limits<uint64_t>::max() / elem)
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": byte size overflows"));
  const uint64_t nbytes = numel * elem;

  auto off_it = value.find("data_offsets");
  if (off_it == value.end())
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": missing 'data_offsets'"));
  if (!off_it->is_array() || off_it->size() != 2 ||
      !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned())
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": 'data_offsets' must be [begin, end] of non-negative integers"));
  entry->begin = (*off_it)[0].get<uint64_t>();
  entry->end = (*off_it)[1].get<uint64_t>();
  if (entry->end < entry->begin)
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": data_offsets [", entry->begin, ", ", entry->end,
                     "] end before begin"));
  if (entry->end > data_size)
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": data_offsets [", entry->begin, ", ", entry->end,
                     "] past the end of the data section (", data_size,
                     " bytes)"));
  if (entry->end - entry->begin != nbytes)
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": data_offsets [", entry->begin, ", ", entry->end, "] hold ",
        entry->end - entry->begin, " bytes but ", dtype, " ",
        ShapeString(entry->shape), " needs ", nbytes));
  return absl::OkStatus();
}

}  // namespace

const char* SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
  }
  return "?";
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* file,
                                                         size_t file_size) {
  if (file_size < 8)
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: file is ", file_size,
        " bytes, shorter than the 8-byte header length"));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file[i];
  if (header_len > kSafetensorsMaxHeaderBytes)
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors: header length ", header_len,
                     " exceeds the limit of ", kSafetensorsMaxHeaderBytes));
  if (header_len > file_size - 8)
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: header length ", header_len, " exceeds the ",
        file_size - 8, " bytes after the length field (truncated file?)"));
  if (header_len < 2)
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: header length ", header_len, " is too short"));
  const char* begin = reinterpret_cast<const char*>(file + 8);
  if (begin[0] != '{')
    return absl::InvalidArgumentError(
        "safetensors: header does not start with '{'");

  // Duplicate top-level keys would silently collapse in nlohmann::json.
  std::set<std::string> seen;
  std::string duplicate;
  Json::parser_callback_t on_event = [&](int depth, Json::parse_event_t event,
                                         Json& parsed) {
    if (event == Json::parse_event_t::key && depth == 1 && duplicate.empty() &&
        parsed.is_string()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second) duplicate = k;
    }
    return true;
  };
  Json root;
  try {
    root = Json::parse(begin, begin + header_len, on_event);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors: header is not valid JSON: ", e.what()));
  }
  if (!duplicate.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: header names ", Quote(duplicate), " twice"));
  if (!root.is_object())
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: header must be a JSON object, got ", root.type_name()));

  SafetensorsHeader header;
  header.data_offset = 8 + header_len;
  header.data_size = file_size - header.data_offset;
  header.tensors.reserve(root.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it->is_null()) continue;
      if (!it->is_object())
        return absl::InvalidArgumentError(
            "safetensors: __metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          return absl::InvalidArgumentError(absl::StrCat(
              "safetensors: __metadata__ value ", Quote(m.key()),
              " must be a string, got ", JsonTypeForError(*m)));
        header.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    SafetensorsEntry entry;
    DN_RETURN_IF_ERROR(ParseEntry(it.key(), *it, header.data_size, &entry));
    header.tensors.push_back(std::move(entry));
  }

  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              if (a.begin != b.begin) return a.begin < b.begin;
              if (a.end != b.end) return a.end < b.end;
              return a.name < b.name;
            });
  uint64_t expected = 0;
  const SafetensorsEntry* prev = nullptr;
  for (const SafetensorsEntry& e : header.tensors) {
    if (e.begin < expected)
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors: tensor ", Quote(e.name), " data_offsets [", e.begin,
          ", ", e.end, "] overlap tensor ", Quote(prev->name), " [",
          prev->begin, ", ", prev->end, "]"));
    if (e.begin > expected)
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors: gap in the data section: bytes [", expected, ", ",
          e.begin, ") belong to no tensor (before tensor ", Quote(e.name), ")"));
    expected = e.end;
    prev = &e;
  }
  if (expected != header.data_size)
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors: tensors cover ", expected, " bytes of the ",
        header.data_size, "-byte data section"));
  return header;
}

void ConvertToF32(DType dtype, const void* src, size_t n, float* dst) {
  const auto* bytes = static_cast<const uint8_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = BF16ToF32(v);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v;
        std::memcpy(&v, bytes + 2 * i, 2);
        dst[i] = F16ToF32(v);
      }
      return;
  }
}

void ConvertFromF32(DType dtype, const float* src, size_t n, void* dst) {
  auto* bytes = static_cast<uint8_t*>(dst);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t v = F32ToBF16(src[i]);
        std::memcpy(bytes + 2 * i, &v, 2);
      }
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t v = F32ToF16(src[i]);
        std::memcpy(bytes + 2 * i, &v, 2);
      }
      return;
  }
}

// --- SafetensorsFile ---------------------------------------------------------

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr)
    munmap(const_cast<uint8_t*>(map_), size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return absl::InternalError(
        absl::StrCat(path, ": fstat: ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": safetensors: file is ", size,
        " bytes, shorter than the 8-byte header length"));
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED)
    return absl::InternalError(
        absl::StrCat(path, ": mmap: ", std::strerror(map_err)));
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = static_cast<const uint8_t*>(map);
  file->size_ = size;
  absl::StatusOr<SafetensorsHeader> header =
      ParseSafetensorsHeader(file->map_, size);
  if (!header.ok())
    return absl::Status(header.status().code(),
                        absl::StrCat(path, ": ", header.status().message()));
  file->header_ = std::move(header).value();
  for (size_t i = 0; i < file->header_.tensors.size(); ++i)
    file->index_.emplace(file->header_.tensors[i].name, i);
  return file;
}

const SafetensorsEntry* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

const uint8_t* SafetensorsFile::RawData(const SafetensorsEntry& entry) const {
  return map_ + header_.data_offset + entry.begin;
}

absl::Status SafetensorsFile::ReadF32(const SafetensorsEntry& entry,
                                      float* dst) const {
  if (header_.data_offset + entry.end > size_)
    return absl::InternalError(absl::StrCat(path_, ": tensor ", entry.name,
                                            " lies outside the mapping"));
  const uint8_t* src = RawData(entry);
  const size_t n = static_cast<size_t>(NumElements(entry.shape));
  ConvertToF32(entry.dtype, src, n, dst);
  // Drop the pages just read from our mapping (they stay in the page cache):
  // loading a model tensor by tensor then never holds the whole file mapped.
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(src) + page - 1) & ~(page - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(src) + entry.nbytes()) & ~(page - 1);
  if (hi > lo)
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
  return absl::OkStatus();
}

// --- SafetensorsWriter -------------------------------------------------------

SafetensorsWriter::~SafetensorsWriter() {
  if (file_ != nullptr) {
    std::fclose(file_);
    std::remove(tmp_path_.c_str());
  }
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<TensorInfo> tensors,
    const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const TensorInfo& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__")
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": invalid tensor name ", Quote(t.name)));
    if (!names.insert(t.name).second)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", Quote(t.name), " given twice"));
    for (int64_t d : t.shape)
      if (d < 0)
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": tensor ", t.name, " has negative shape ", ShapeString(t.shape)));
    const uint64_t nbytes =
        static_cast<uint64_t>(NumElements(t.shape)) * DTypeSize(t.dtype);
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = SafetensorsDTypeName(t.dtype);
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + nbytes};
    header[t.name] = std::move(entry);
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot encode header: ", e.what()));
  }
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');

  std::unique_ptr<SafetensorsWriter> w(new SafetensorsWriter());
  w->path_ = path;
  w->tmp_path_ = path + ".tmp";
  w->tensors_ = std::move(tensors);
  w->file_ = std::fopen(w->tmp_path_.c_str(), "wb");
  if (w->file_ == nullptr)
    return absl::PermissionDeniedError(absl::StrCat(
        w->tmp_path_, ": cannot create: ", std::strerror(errno)));
  uint8_t len_bytes[8];
  const uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<uint8_t>(len >> (8 * i));
  if (std::fwrite(len_bytes, 1, 8, w->file_) != 8 ||
      std::fwrite(text.data(), 1, text.size(), w->file_) != text.size())
    return absl::DataLossError(
        absl::StrCat(w->tmp_path_, ": write failed: ", std::strerror(errno)));
  w->file_size_ = 8 + len + offset;
  return w;
}

absl::Status SafetensorsWriter::WriteNext(const void* data, size_t nbytes) {
  if (file_ == nullptr || finished_)
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": writer is closed"));
  if (next_ >= tensors_.size())
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": more tensors written than declared"));
  const TensorInfo& t = tensors_[next_];
  const size_t expected =
      static_cast<size_t>(NumElements(t.shape)) * DTypeSize(t.dtype);
  if (nbytes != expected)
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor ", t.name, " needs ", expected,
                     " bytes, got ", nbytes));
  if (nbytes > 0 && std::fwrite(data, 1, nbytes, file_) != nbytes)
    return absl::DataLossError(absl::StrCat(
        tmp_path_, ": write of tensor ", t.name, " failed: ", std::strerror(errno)));
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (file_ == nullptr || finished_)
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": writer is closed"));
  if (next_ != tensors_.size())
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": ", tensors_.size() - next_,
                     " declared tensors were not written (next: ",
                     tensors_[next_].name, ")"));
  const bool flushed = std::fflush(file_) == 0 && fsync(fileno(file_)) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!flushed || !closed) {
    std::remove(tmp_path_.c_str());
    return absl::DataLossError(
        absl::StrCat(tmp_path_, ": flush failed: ", std::strerror(errno)));
  }
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp_path_.c_str());
    return absl::InternalError(absl::StrCat("rename ", tmp_path_, " -> ",
                                            path_, ": ", std::strerror(err)));
  }
  finished_ = true;
  return absl::OkStatus();
}

absl::Status WriteSafetensors(
    const std::string& path, const std::vector<SafetensorsTensorRef>& tensors,
    const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsWriter::TensorInfo> infos;
  infos.reserve(tensors.size());
  for (const SafetensorsTensorRef& t : tensors)
    infos.push_back({t.name, t.dtype, t.shape});
  DN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                      SafetensorsWriter::Create(path, std::move(infos), metadata));
  for (const SafetensorsTensorRef& t : tensors)
    DN_RETURN_IF_ERROR(writer->WriteNext(
        t.data, static_cast<size_t>(NumElements(t.shape)) * DTypeSize(t.dtype)));
  return writer->Finish();
}

}  // namespace dn::worker
