// File: base/log.h
//
// Minimal leveled logging to stderr (Debian's absl 20220623 has no absl/log).
//
//   DN_LOG(INFO) << "group " << name << " ready";
//
// Each line is prefixed with the level, the time, the process tag (set once
// with dn::SetLogTag, e.g. "rank1") and file:line. DN_VLOG is on only when
// DENOISED_VERBOSE is set in the environment.
#ifndef DN_BASE_LOG_H_
#define DN_BASE_LOG_H_

#include <sstream>
#include <string>

namespace dn {

enum class LogLevel { kInfo, kWarning, kError, kFatal };

void SetLogTag(std::string tag);
bool VerboseLogging();

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();  // writes the line; kFatal aborts
  LogMessage(const LogMessage&) = delete;
  LogMessage& operator=(const LogMessage&) = delete;
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::ostringstream stream_;
};

}  // namespace dn

#define DN_LOG_LEVEL_INFO ::dn::LogLevel::kInfo
#define DN_LOG_LEVEL_WARNING ::dn::LogLevel::kWarning
#define DN_LOG_LEVEL_ERROR ::dn::LogLevel::kError
#define DN_LOG_LEVEL_FATAL ::dn::LogLevel::kFatal
#define DN_LOG(level) \
  ::dn::LogMessage(DN_LOG_LEVEL_##level, __FILE__, __LINE__).stream()
#define DN_VLOG \
  if (!::dn::VerboseLogging()) {} else DN_LOG(INFO)

#endif  // DN_BASE_LOG_H_
