#include "base/log.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>

namespace dn {
namespace {

std::mutex& TagMutex() {
  static std::mutex* m = new std::mutex;
  return *m;
}
std::string& Tag() {
  static std::string* tag = new std::string;
  return *tag;
}

}  // namespace

void SetLogTag(std::string tag) {
  std::lock_guard<std::mutex> lock(TagMutex());
  Tag() = std::move(tag);
}

bool VerboseLogging() {
  static const bool verbose = std::getenv("DENOISED_VERBOSE") != nullptr;
  return verbose;
}

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level) {
  static const char kLetters[] = {'I', 'W', 'E', 'F'};
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(
                          now.time_since_epoch())
                          .count() %
                      1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char stamp[32];
  std::snprintf(stamp, sizeof(stamp), "%02d:%02d:%02d.%03d", tm.tm_hour,
                tm.tm_min, tm.tm_sec, static_cast<int>(millis));
  const char* base = std::strrchr(file, '/');
  std::string tag;
  {
    std::lock_guard<std::mutex> lock(TagMutex());
    tag = Tag();
  }
  stream_ << kLetters[static_cast<int>(level)] << ' ' << stamp << ' ';
  if (!tag.empty()) stream_ << '[' << tag << "] ";
  stream_ << (base ? base + 1 : file) << ':' << line << "] ";
}

LogMessage::~LogMessage() {
  stream_ << '\n';
  const std::string text = stream_.str();
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
  if (level_ == LogLevel::kFatal) std::abort();
}

}  // namespace dn
