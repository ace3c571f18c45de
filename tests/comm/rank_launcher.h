// File: tests/comm/rank_launcher.h
//
// Starts N real rank processes (fork+exec through posix_spawn) for the
// multi-process comm tests, and waits for them with a hard deadline: a rank
// that is still running at the deadline is killed and reported as hung, so a
// test can never hang.
#ifndef DN_TESTS_COMM_RANK_LAUNCHER_H_
#define DN_TESTS_COMM_RANK_LAUNCHER_H_

#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace dn::comm::testing {

// A temporary folder, removed on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "dn-comm-XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    path_ = made ? made : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class RankLauncher {
 public:
  // Exit status of a rank: its exit code, 128+signal when killed by a
  // signal, or kHung when it had to be killed at the deadline.
  static constexpr int kHung = -1;

  ~RankLauncher() {
    for (pid_t& pid : pids_)
      if (pid > 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        pid = -1;
      }
  }

  // Starts `binary` with `args`; returns false when spawning failed.
  bool Start(const std::string& binary, const std::vector<std::string>& args) {
    std::vector<std::string> all = {binary};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : all) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    if (::posix_spawn(&pid, binary.c_str(), nullptr, nullptr, argv.data(),
                      environ) != 0)
      return false;
    pids_.push_back(pid);
    status_.push_back(0);
    return true;
  }

  pid_t pid(int i) const { return pids_[i]; }
  int count() const { return static_cast<int>(pids_.size()); }

  void Kill(int i, int sig) {
    if (pids_[i] > 0) ::kill(pids_[i], sig);
  }

  // Waits for every rank in `which` (all when empty) until `deadline`.
  // Returns false when some rank had to be killed.
  bool Wait(std::chrono::steady_clock::time_point deadline,
            std::vector<int> which = {}) {
    if (which.empty())
      for (int i = 0; i < count(); ++i) which.push_back(i);
    for (;;) {
      bool running = false;
      for (int i : which) {
        if (pids_[i] <= 0) continue;
        int st = 0;
        const pid_t r = ::waitpid(pids_[i], &st, WNOHANG);
        if (r == pids_[i]) {
          status_[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
          pids_[i] = -1;
        } else {
          running = true;
        }
      }
      if (!running) return true;
      if (std::chrono::steady_clock::now() >= deadline) {
        for (int i : which)
          if (pids_[i] > 0) {
            ::kill(pids_[i], SIGKILL);
            ::waitpid(pids_[i], nullptr, 0);
            pids_[i] = -1;
            status_[i] = kHung;
          }
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  int status(int i) const { return status_[i]; }

  // Reaps ranks that have exited; true when any has.
  bool AnyExited() {
    bool any = false;
    for (int i = 0; i < count(); ++i) {
      if (pids_[i] <= 0) {
        any = true;
        continue;
      }
      int st = 0;
      if (::waitpid(pids_[i], &st, WNOHANG) == pids_[i]) {
        status_[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pids_[i] = -1;
        any = true;
      }
    }
    return any;
  }

 private:
  std::vector<pid_t> pids_;
  std::vector<int> status_;
};

// Waits until `path` exists, or `deadline` passes, or a rank of `ranks`
// (when given) exits early.
inline bool WaitForFile(const std::string& path,
                        std::chrono::steady_clock::time_point deadline,
                        RankLauncher* ranks = nullptr) {
  while (std::chrono::steady_clock::now() < deadline) {
    if (std::filesystem::exists(path)) return true;
    if (ranks != nullptr && ranks->AnyExited()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return std::filesystem::exists(path);
}

// Reads "<dir>/result.<rank>": status code name, elapsed ms, message.
struct RankResult {
  bool present = false;
  std::string code;
  long long elapsed_ms = -1;
  std::string message;
};

inline RankResult ReadResult(const std::string& dir, int rank) {
  RankResult r;
  std::ifstream in(dir + "/result." + std::to_string(rank));
  if (!in) return r;
  r.present = true;
  std::string elapsed;
  std::getline(in, r.code);
  std::getline(in, elapsed);
  std::getline(in, r.message);
  r.elapsed_ms = elapsed.empty() ? -1 : std::stoll(elapsed);
  return r;
}

}  // namespace dn::comm::testing

#endif  // DN_TESTS_COMM_RANK_LAUNCHER_H_
