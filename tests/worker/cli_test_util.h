// File: tests/worker/cli_test_util.h
//
// Helpers for tests that run the `denoised` binary as a user would (real
// rank processes over loopback): run a command with its output captured, and
// read the latents it wrote. Shared by run_command_test and cfg_parallel_test.
#ifndef DN_TESTS_WORKER_CLI_TEST_UTIL_H_
#define DN_TESTS_WORKER_CLI_TEST_UTIL_H_

#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/worker/io_test_util.h"
#include "worker/safetensors.h"
#include "worker/tensor.h"

namespace dn::worker::testing_util {

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs `<binary> <command> --threads 1 --timeout-s 60 <args>`, stdout and
// stderr captured in files under `dir` (numbered by `*counter`).
inline CliResult RunDenoised(const std::string& binary, const std::string& dir, int* counter,
                             const std::string& command, const std::string& args) {
  const int n = (*counter)++;
  const std::string out_file = absl::StrCat(dir, "/stdout", n);
  const std::string err_file = absl::StrCat(dir, "/stderr", n);
  const std::string cmd = absl::StrCat(binary, " ", command, " --threads 1 --timeout-s 60 ", args,
                                       " > ", out_file, " 2> ", err_file);
  CliResult r;
  const int st = std::system(cmd.c_str());
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = ReadFile(out_file);
  r.err = ReadFile(err_file);
  return r;
}

// The f32 values of tensor "latents" in a safetensors file (ADD_FAILURE and
// empty when it cannot be read); optionally its shape and the file's header.
inline std::vector<float> ReadLatents(const std::string& path, Shape* shape = nullptr,
                                      SafetensorsHeader* header = nullptr) {
  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) {
    ADD_FAILURE() << file.status();
    return {};
  }
  const SafetensorsEntry* e = (*file)->Find("latents");
  if (e == nullptr) {
    ADD_FAILURE() << "no latents in " << path;
    return {};
  }
  std::vector<float> v(static_cast<size_t>(NumElements(e->shape)));
  EXPECT_TRUE((*file)->ReadF32(*e, v.data()).ok());
  if (shape != nullptr) *shape = e->shape;
  if (header != nullptr) *header = (*file)->header();
  return v;
}

inline double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::abs(x)));
  return m;
}

inline double MaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    m = std::max(m, static_cast<double>(std::abs(a[i] - b[i])));
  return m;
}

}  // namespace dn::worker::testing_util

#endif  // DN_TESTS_WORKER_CLI_TEST_UTIL_H_
