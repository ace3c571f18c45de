#include "server/demo_model.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"

#ifndef DENOISED_SOURCE_DEMO_MODEL
#define DENOISED_SOURCE_DEMO_MODEL ""
#endif

namespace dn::server {

namespace {

bool IsFile(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool IsDir(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string ExeDir() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  std::string p(buf, static_cast<size_t>(n));
  const size_t slash = p.rfind('/');
  return slash == std::string::npos ? "" : p.substr(0, slash);
}

}  // namespace

std::string SourceDemoModelDir() { return DENOISED_SOURCE_DEMO_MODEL; }

absl::Status CheckDemoModelDir(const std::string& dir) {
  if (!IsDir(dir)) return absl::NotFoundError(dir + ": no such folder");
  for (const char* f : {"config.json", kDemoPromptTableFile}) {
    if (!IsFile(absl::StrCat(dir, "/", f))) {
      return absl::NotFoundError(absl::StrCat(dir, ": no ", f));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DemoModelSearch> FindDemoModel(const std::string& flag) {
  DemoModelSearch s;
  if (!flag.empty()) {
    if (absl::Status st = CheckDemoModelDir(flag); !st.ok()) {
      return absl::NotFoundError(absl::StrCat("--model ", st.message()));
    }
    s.dir = flag;
    s.source = "--model";
    return s;
  }
  if (const char* env = std::getenv(kDemoModelEnv); env && *env) {
    if (absl::Status st = CheckDemoModelDir(env); !st.ok()) {
      return absl::NotFoundError(
          absl::StrCat("$", kDemoModelEnv, ": ", st.message()));
    }
    s.dir = env;
    s.source = absl::StrCat("$", kDemoModelEnv);
    return s;
  }
  std::vector<std::pair<std::string, std::string>> places;
  if (std::string exe = ExeDir(); !exe.empty()) {
    places.emplace_back(exe + "/../share/denoised/demo_model",
                        "next to the binary");
  }
  if (!SourceDemoModelDir().empty()) {
    places.emplace_back(SourceDemoModelDir(), "the source tree");
  }
  for (const auto& [dir, how] : places) {
    if (absl::Status st = CheckDemoModelDir(dir); !st.ok()) {
      s.looked.push_back(std::string(st.message()));
      continue;
    }
    s.dir = dir;
    s.source = how;
    return s;
  }
  return s;
}

}  // namespace dn::server
