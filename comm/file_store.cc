// FileStore: the rendezvous store in a folder shared by all ranks. Each key is
// one file; Set writes a temporary file and renames it into place, so a reader
// sees either nothing or the whole value. Get polls until the key appears.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/store.h"

namespace dn::comm {
namespace {

// Keys may contain '/' and other characters; file names get [A-Za-z0-9._-]
// verbatim and %XX for everything else. A leading '.' is escaped too so that
// no key collides with the temporary files.
std::string EncodeKey(const std::string& key) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(key.size());
  for (size_t i = 0; i < key.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(key[i]);
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                       (c >= '0' && c <= '9') || c == '_' || c == '-' ||
                       (c == '.' && i > 0);
    if (plain) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back('%');
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
    }
  }
  return out;
}

absl::Status ErrnoStatus(const std::string& what, int err) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(err)));
}

absl::Status WriteAll(int fd, const char* data, size_t n,
                      const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(absl::StrCat("write ", path), errno);
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

// Reads the whole file at `path`. NOT_FOUND when it does not exist (yet).
absl::StatusOr<std::vector<char>> ReadFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(path);
    return ErrnoStatus(absl::StrCat("open ", path), errno);
  }
  std::vector<char> data;
  char chunk[8192];
  for (;;) {
    const ssize_t r = ::read(fd, chunk, sizeof(chunk));
    if (r < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return ErrnoStatus(absl::StrCat("read ", path), err);
    }
    if (r == 0) break;
    data.insert(data.end(), chunk, chunk + r);
  }
  ::close(fd);
  return data;
}

class FileStore : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}

  absl::Status Set(const std::string& key,
                   const std::vector<char>& value) override {
    const std::string path = Path(key);
    // Unique per process and call: pid + a process-wide counter.
    static std::atomic<uint64_t> counter{0};
    const std::string tmp =
        absl::StrCat(dir_, "/.tmp.", ::getpid(), ".", counter.fetch_add(1), ".",
                     EncodeKey(key));
    const int fd =
        ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoStatus(absl::StrCat("create ", tmp), errno);
    absl::Status st = WriteAll(fd, value.data(), value.size(), tmp);
    if (::close(fd) != 0 && st.ok())
      st = ErrnoStatus(absl::StrCat("close ", tmp), errno);
    if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0)
      st = ErrnoStatus(absl::StrCat("rename to ", path), errno);
    if (!st.ok()) {
      ::unlink(tmp.c_str());
      return absl::Status(st.code(), absl::StrCat("FileStore::Set key '", key,
                                                  "': ", st.message()));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<char>> Get(
      const std::string& key, std::chrono::milliseconds timeout) override {
    const std::string path = Path(key);
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + timeout;
    auto sleep = std::chrono::milliseconds(1);
    for (;;) {
      absl::StatusOr<std::vector<char>> data = ReadFile(path);
      if (data.ok()) return data;
      if (!absl::IsNotFound(data.status())) {
        return absl::Status(data.status().code(),
                            absl::StrCat("FileStore::Get key '", key,
                                         "': ", data.status().message()));
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "key '", key, "' did not appear in file store ", dir_, " within ",
            timeout.count(), " ms"));
      }
      std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(
          sleep, deadline - now));
      sleep = std::min(sleep * 2, std::chrono::milliseconds(20));
    }
  }

 private:
  std::string Path(const std::string& key) const {
    return absl::StrCat(dir_, "/", EncodeKey(key));
  }

  const std::string dir_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> MakeFileStore(const std::string& dir) {
  if (dir.empty())
    return absl::InvalidArgumentError("file store: folder path is empty");
  // mkdir -p
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
      return absl::InvalidArgumentError(absl::StrCat(
          "file store: cannot create folder ", prefix, ": ",
          std::strerror(errno)));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("file store: ", dir, " is not a folder"));
  }
  std::string clean = dir;
  while (clean.size() > 1 && clean.back() == '/') clean.pop_back();
  return std::unique_ptr<Store>(std::make_unique<FileStore>(clean));
}

}  // namespace dn::comm
