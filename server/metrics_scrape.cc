#include "server/metrics_scrape.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace dn::server {

namespace {

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

bool WaitFd(int fd, short events, std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return false;
  pollfd p{fd, events, 0};
  return poll(&p, 1, static_cast<int>(left.count())) == 1;
}

}  // namespace

absl::StatusOr<std::string> HttpGet(const std::string& host_port,
                                    const std::string& path,
                                    std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError("expected HOST:PORT, got " + host_port);
  }
  const std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
    return absl::UnavailableError("cannot resolve " + host_port);
  }
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> res_guard(res, freeaddrinfo);
  Fd fd(socket(res->ai_family, res->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
               res->ai_protocol));
  if (fd.get() < 0) return absl::UnavailableError("socket failed");
  if (connect(fd.get(), res->ai_addr, res->ai_addrlen) != 0 &&
      errno != EINPROGRESS) {
    return absl::UnavailableError(absl::StrCat("connect ", host_port, ": ",
                                               std::strerror(errno)));
  }
  if (!WaitFd(fd.get(), POLLOUT, deadline)) {
    return absl::DeadlineExceededError("connect timed out: " + host_port);
  }
  int err = 0;
  socklen_t len = sizeof(err);
  getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
  if (err != 0) {
    return absl::UnavailableError(absl::StrCat("connect ", host_port, ": ",
                                               std::strerror(err)));
  }
  const std::string req = absl::StrCat("GET ", path, " HTTP/1.0\r\nHost: ",
                                       host_port, "\r\nConnection: close\r\n\r\n");
  size_t sent = 0;
  while (sent < req.size()) {
    if (!WaitFd(fd.get(), POLLOUT, deadline)) {
      return absl::DeadlineExceededError("send timed out: " + host_port);
    }
    const ssize_t n = send(fd.get(), req.data() + sent, req.size() - sent,
                           MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
      return absl::UnavailableError("send failed: " + host_port);
    }
    if (n > 0) sent += static_cast<size_t>(n);
  }
  std::string response;
  char buf[16384];
  for (;;) {
    if (!WaitFd(fd.get(), POLLIN, deadline)) {
      return absl::DeadlineExceededError("read timed out: " + host_port);
    }
    const ssize_t n = recv(fd.get(), buf, sizeof(buf), 0);
    if (n == 0) break;
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return absl::UnavailableError("recv failed: " + host_port);
    }
    response.append(buf, static_cast<size_t>(n));
  }
  const size_t body = response.find("\r\n\r\n");
  if (body == std::string::npos || response.compare(0, 5, "HTTP/") != 0) {
    return absl::UnavailableError("malformed HTTP response from " + host_port);
  }
  const size_t sp = response.find(' ');
  if (response.compare(sp + 1, 3, "200") != 0) {
    return absl::UnavailableError(absl::StrCat(
        "GET http://", host_port, path, ": ",
        response.substr(0, response.find("\r\n"))));
  }
  return response.substr(body + 4);
}

std::vector<MetricSample> ParseMetricsText(const std::string& text) {
  std::vector<MetricSample> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    MetricSample s;
    size_t i = 0;
    while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
    s.name = line.substr(0, i);
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        const size_t eq = line.find('=', i);
        if (eq == std::string::npos) break;
        std::string key = line.substr(i, eq - i);
        size_t j = eq + 2;  // skip ="
        std::string value;
        while (j < line.size() && line[j] != '"') {
          if (line[j] == '\\' && j + 1 < line.size()) {
            ++j;
            value.push_back(line[j] == 'n' ? '\n' : line[j]);
          } else {
            value.push_back(line[j]);
          }
          ++j;
        }
        s.labels[key] = value;
        i = j + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      ++i;  // '}'
    }
    while (i < line.size() && line[i] == ' ') ++i;
    std::string value = line.substr(i);
    value = value.substr(0, value.find(' '));  // drop a timestamp
    if (value == "+Inf") {
      s.value = std::numeric_limits<double>::infinity();
    } else if (value == "-Inf") {
      s.value = -std::numeric_limits<double>::infinity();
    } else if (!absl::SimpleAtod(value, &s.value)) {
      s.value = std::nan("");
    }
    out.push_back(std::move(s));
  }
  return out;
}

namespace {

bool Matches(const MetricSample& s,
             const std::map<std::string, std::string>& match) {
  for (const auto& [k, v] : match) {
    auto it = s.labels.find(k);
    if (it == s.labels.end() || it->second != v) return false;
  }
  return true;
}

}  // namespace

double SumSamples(const std::vector<MetricSample>& samples,
                  const std::string& name,
                  const std::map<std::string, std::string>& match) {
  double sum = 0;
  for (const auto& s : samples) {
    if (s.name == name && Matches(s, match)) sum += s.value;
  }
  return sum;
}

double HistogramQuantile(const std::vector<MetricSample>& samples,
                         const std::string& name, double q,
                         const std::map<std::string, std::string>& match) {
  std::map<double, double> cumulative;  // le -> count
  for (const auto& s : samples) {
    if (s.name != name + "_bucket" || !Matches(s, match)) continue;
    auto le = s.labels.find("le");
    if (le == s.labels.end()) continue;
    double bound = 0;
    if (le->second == "+Inf") {
      bound = std::numeric_limits<double>::infinity();
    } else if (!absl::SimpleAtod(le->second, &bound)) {
      continue;
    }
    cumulative[bound] += s.value;
  }
  if (cumulative.empty()) return std::nan("");
  const double total = cumulative.rbegin()->second;
  if (total <= 0) return std::nan("");
  const double rank = q * total;
  double prev_bound = 0, prev_count = 0;
  for (const auto& [bound, count] : cumulative) {
    if (count >= rank) {
      if (std::isinf(bound)) return prev_bound;
      if (count == prev_count) return bound;
      return prev_bound +
             (bound - prev_bound) * (rank - prev_count) / (count - prev_count);
    }
    prev_bound = bound;
    prev_count = count;
  }
  return prev_bound;
}

}  // namespace dn::server
