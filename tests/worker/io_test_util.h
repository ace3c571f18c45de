// File: tests/worker/io_test_util.h
//
// Helpers shared by the io_test sources: a self-removing temporary folder and
// small file utilities.
#ifndef DN_TESTS_WORKER_IO_TEST_UTIL_H_
#define DN_TESTS_WORKER_IO_TEST_UTIL_H_

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace dn::worker::testing_util {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "/dn_io_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    const char* made = mkdtemp(buf.data());
    EXPECT_NE(made, nullptr);
    path_ = made ? made : tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline void WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

}  // namespace dn::worker::testing_util

#endif  // DN_TESTS_WORKER_IO_TEST_UTIL_H_
