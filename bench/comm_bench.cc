// `denoised bench comm`: all-to-all latency and bus bandwidth. See
// bench/comm_bench.h.
#include "bench/comm_bench.h"

#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/flags.h"
#include "bench/bench_common.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "comm/process_group.h"
#include "comm/store.h"

#ifdef DENOISED_WITH_CUDA
#include <cuda_runtime_api.h>

#include "base/cuda_check.h"
#include "comm/nccl_process_group.h"
#endif

extern char** environ;

namespace dn::bench {

namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  int ranks = 2;
  std::string backend = "gloo";
  std::string min_bytes = "64K";
  std::string max_bytes;  // default depends on the backend
  int iters = 20;
  int warmup = 5;
  int timeout_ms = 60000;
  std::string json;
};

void AddCommonFlags(FlagSet& flags, Config* c) {
  flags.Int("ranks", &c->ranks, "number of rank processes");
  flags.String("backend", &c->backend, "gloo (CPU ranks, loopback TCP) | nccl (GPU = rank)");
  flags.String("min-bytes", &c->min_bytes, "smallest per-rank size (K/M/G = KiB/MiB/GiB)");
  flags.String("max-bytes", &c->max_bytes,
               "largest per-rank size (default 16M for gloo, 256M for nccl)");
  flags.Int("iters", &c->iters, "timed all-to-alls per size (median reported)");
  flags.Int("warmup", &c->warmup, "untimed all-to-alls per size");
  flags.Int("timeout-ms", &c->timeout_ms, "process-group timeout");
  flags.String("json", &c->json, "also write the results to this JSON file");
}

absl::StatusOr<uint64_t> ParseBytes(const std::string& flag, const std::string& text) {
  size_t pos = 0;
  while (pos < text.size() && std::isdigit(static_cast<unsigned char>(text[pos]))) ++pos;
  std::string unit = text.substr(pos);
  for (char& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  uint64_t mult = 0;
  if (unit.empty() || unit == "B") mult = 1;
  else if (unit == "K" || unit == "KB" || unit == "KIB") mult = 1ULL << 10;
  else if (unit == "M" || unit == "MB" || unit == "MIB") mult = 1ULL << 20;
  else if (unit == "G" || unit == "GB" || unit == "GIB") mult = 1ULL << 30;
  if (pos == 0 || mult == 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, ": '", text, "' is not a size (e.g. 65536, 64K, 256M, 1G)"));
  return std::stoull(text.substr(0, pos)) * mult;
}

absl::Status Resolve(Config* c, uint64_t* min_bytes, uint64_t* max_bytes) {
  if (c->ranks < 1)
    return absl::InvalidArgumentError(absl::StrCat("--ranks must be >= 1, got ", c->ranks));
  if (c->backend != "gloo" && c->backend != "nccl")
    return absl::InvalidArgumentError(
        absl::StrCat("--backend must be gloo or nccl, got '", c->backend, "'"));
#ifndef DENOISED_WITH_CUDA
  if (c->backend == "nccl")
    return absl::FailedPreconditionError(
        "--backend nccl: this denoised was built without CUDA (DENOISED_CUDA=OFF)");
#endif
  if (c->iters < 1 || c->warmup < 0)
    return absl::InvalidArgumentError("--iters must be >= 1 and --warmup >= 0");
  if (c->max_bytes.empty()) c->max_bytes = c->backend == "gloo" ? "16M" : "256M";
  DN_ASSIGN_OR_RETURN(*min_bytes, ParseBytes("min-bytes", c->min_bytes));
  DN_ASSIGN_OR_RETURN(*max_bytes, ParseBytes("max-bytes", c->max_bytes));
  if (*min_bytes == 0 || *min_bytes > *max_bytes)
    return absl::InvalidArgumentError(absl::StrCat(
        "--min-bytes (", *min_bytes, ") must be in [1, --max-bytes (", *max_bytes, ")]"));
  return absl::OkStatus();
}

// Word i (16-bit) of the block that rank src sends to rank dst for sweep
// step `salt`: a misplaced block, a shifted offset or stale data all show.
inline uint16_t Word(int src, int dst, uint64_t salt, uint64_t i) {
  return static_cast<uint16_t>((i * 0x9E37u + static_cast<uint64_t>(src) * 0x3C6Fu +
                                static_cast<uint64_t>(dst) * 0x7F4Bu + salt * 0x2545u) ^
                               (i >> 16));
}

void FillSend(int rank, int world, size_t words_per_peer, uint64_t salt, uint16_t* send) {
  for (int dst = 0; dst < world; ++dst) {
    uint16_t* block = send + static_cast<size_t>(dst) * words_per_peer;
    for (size_t i = 0; i < words_per_peer; ++i) block[i] = Word(rank, dst, salt, i);
  }
}

int64_t CountWrong(int rank, int world, size_t words_per_peer, uint64_t salt,
                   const uint16_t* recv) {
  int64_t wrong = 0;
  for (int src = 0; src < world; ++src) {
    const uint16_t* block = recv + static_cast<size_t>(src) * words_per_peer;
    for (size_t i = 0; i < words_per_peer; ++i) wrong += block[i] != Word(src, rank, salt, i);
  }
  return wrong;
}

// One backend's buffers and timed all-to-all.
class Runner {
 public:
  virtual ~Runner() = default;
  // Fills the send buffer for this step and clears the receive buffer.
  virtual absl::Status Prepare(size_t bytes_per_peer, uint64_t salt) = 0;
  // One all-to-all; returns its time in microseconds. NCCL: events around
  // the call on the stream, then a host sync (as the PyTorch anchor times
  // it); Gloo: host time after a barrier.
  virtual absl::StatusOr<double> TimeOne(size_t bytes_per_peer) = 0;
  // `n` all-to-alls issued back to back (no host sync between them, as the
  // model issues them); returns the mean time of one, in microseconds.
  virtual absl::StatusOr<double> TimeBackToBack(size_t bytes_per_peer, int n) = 0;
  // Wrong words of this rank's receive buffer.
  virtual absl::StatusOr<int64_t> Verify(size_t bytes_per_peer, uint64_t salt) = 0;
};

class GlooRunner : public Runner {
 public:
  GlooRunner(comm::ProcessGroup& pg, size_t max_total)
      : pg_(pg), send_(max_total / 2), recv_(max_total / 2) {}

  absl::Status Prepare(size_t bytes_per_peer, uint64_t salt) override {
    FillSend(pg_.rank(), pg_.size(), bytes_per_peer / 2, salt, send_.data());
    std::fill(recv_.begin(), recv_.end(), 0);
    return absl::OkStatus();
  }
  absl::StatusOr<double> TimeOne(size_t bytes_per_peer) override {
    DN_RETURN_IF_ERROR(pg_.Barrier());
    const auto t0 = Clock::now();
    DN_RETURN_IF_ERROR(pg_.AllToAll(send_.data(), recv_.data(), bytes_per_peer));
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  }
  absl::StatusOr<double> TimeBackToBack(size_t bytes_per_peer, int n) override {
    DN_RETURN_IF_ERROR(pg_.Barrier());
    const auto t0 = Clock::now();
    for (int i = 0; i < n; ++i)
      DN_RETURN_IF_ERROR(pg_.AllToAll(send_.data(), recv_.data(), bytes_per_peer));
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / n;
  }
  absl::StatusOr<int64_t> Verify(size_t bytes_per_peer, uint64_t salt) override {
    return CountWrong(pg_.rank(), pg_.size(), bytes_per_peer / 2, salt, recv_.data());
  }

 private:
  comm::ProcessGroup& pg_;
  std::vector<uint16_t> send_, recv_;
};

#ifdef DENOISED_WITH_CUDA
struct DeviceFree {
  void operator()(void* p) const { (void)cudaFree(p); }
};
struct EventDestroy {
  void operator()(CUevent_st* e) const { (void)cudaEventDestroy(e); }
};
struct StreamDestroy {
  void operator()(CUstream_st* s) const { (void)cudaStreamDestroy(s); }
};

class NcclRunner : public Runner {
 public:
  static absl::StatusOr<std::unique_ptr<NcclRunner>> Create(comm::Store& store,
                                                            comm::ProcessGroup& ctl,
                                                            size_t max_total,
                                                            std::chrono::milliseconds timeout) {
    std::unique_ptr<NcclRunner> r(new NcclRunner(ctl, max_total));
    DN_CUDA_RETURN_IF_ERROR(cudaSetDevice(ctl.rank()));
    cudaStream_t stream = nullptr;
    DN_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    r->stream_.reset(stream);
    for (auto* e : {&r->start_, &r->stop_}) {
      cudaEvent_t ev = nullptr;
      DN_CUDA_RETURN_IF_ERROR(cudaEventCreate(&ev));
      e->reset(ev);
    }
    void* p = nullptr;
    DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, max_total));
    r->send_.reset(p);
    DN_CUDA_RETURN_IF_ERROR(cudaMalloc(&p, max_total));
    r->recv_.reset(p);
    comm::NcclOptions o;
    o.rank = ctl.rank();
    o.size = ctl.size();
    o.device = ctl.rank();
    o.stream = stream;
    o.timeout = timeout;
    o.prefix = "bench-nccl";
    DN_ASSIGN_OR_RETURN(r->pg_, comm::MakeNcclProcessGroup(store, o));
    return r;
  }

  absl::Status Prepare(size_t bytes_per_peer, uint64_t salt) override {
    const size_t total = bytes_per_peer * static_cast<size_t>(ctl_.size());
    FillSend(ctl_.rank(), ctl_.size(), bytes_per_peer / 2, salt, host_.data());
    DN_CUDA_RETURN_IF_ERROR(cudaMemcpy(send_.get(), host_.data(), total, cudaMemcpyHostToDevice));
    DN_CUDA_RETURN_IF_ERROR(cudaMemset(recv_.get(), 0, total));
    return absl::OkStatus();
  }
  // No host barrier per call: the previous call's completion and the host
  // sync already line the ranks up, exactly as in the PyTorch anchor (a
  // Gloo barrier here added its own rank skew to every measurement).
  absl::StatusOr<double> TimeOne(size_t bytes_per_peer) override {
    return TimeBackToBack(bytes_per_peer, 1);
  }
  absl::StatusOr<double> TimeBackToBack(size_t bytes_per_peer, int n) override {
    DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(start_.get(), stream_.get()));
    for (int i = 0; i < n; ++i)
      DN_RETURN_IF_ERROR(pg_->AllToAll(send_.get(), recv_.get(), bytes_per_peer));
    DN_CUDA_RETURN_IF_ERROR(cudaEventRecord(stop_.get(), stream_.get()));
    DN_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop_.get()));
    float ms = 0;
    DN_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start_.get(), stop_.get()));
    return 1000.0 * ms / n;
  }
  absl::StatusOr<int64_t> Verify(size_t bytes_per_peer, uint64_t salt) override {
    const size_t total = bytes_per_peer * static_cast<size_t>(ctl_.size());
    DN_CUDA_RETURN_IF_ERROR(cudaMemcpy(host_.data(), recv_.get(), total, cudaMemcpyDeviceToHost));
    return CountWrong(ctl_.rank(), ctl_.size(), bytes_per_peer / 2, salt, host_.data());
  }

 private:
  NcclRunner(comm::ProcessGroup& ctl, size_t max_total) : ctl_(ctl), host_(max_total / 2) {}

  comm::ProcessGroup& ctl_;
  std::vector<uint16_t> host_;
  std::unique_ptr<CUstream_st, StreamDestroy> stream_;
  std::unique_ptr<CUevent_st, EventDestroy> start_, stop_;
  std::unique_ptr<void, DeviceFree> send_, recv_;
  std::unique_ptr<comm::ProcessGroup> pg_;  // destroyed first
};
#endif

struct Row {
  uint64_t bytes = 0;  // per rank
  uint64_t bytes_per_peer = 0;
  double us = 0;
  double b2b_us = 0;            // mean of back-to-back calls
  double algbw = 0, busbw = 0;  // GB/s, from us
  int64_t wrong = 0;
};

absl::Status WriteJson(const std::string& path, const Config& c, const std::vector<Row>& rows) {
  std::ofstream out(path);
  if (!out) return absl::InvalidArgumentError(absl::StrCat("--json: cannot write ", path));
  out << "{\n  \"backend\": \"" << c.backend << "\",\n  \"world\": " << c.ranks
      << ",\n  \"iters\": " << c.iters << ",\n  \"warmup\": " << c.warmup
      << ",\n  \"rows\": [";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    out << (i ? ",\n" : "\n")
        << absl::StrFormat(
               "    {\"bytes\": %d, \"bytes_per_peer\": %d, \"us\": %.3f, "
               "\"b2b_us\": %.3f, \"algbw_gbs\": %.4f, \"busbw_gbs\": %.4f, "
               "\"wrong\": %d}",
               r.bytes, r.bytes_per_peer, r.us, r.b2b_us, r.algbw, r.busbw, r.wrong);
  }
  out << "\n  ]\n}\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("--json: writing ", path, " failed"));
  return absl::OkStatus();
}

absl::Status RunCommRank(Config c, int rank, const std::string& dir, int64_t* total_wrong) {
  uint64_t min_bytes = 0, max_bytes = 0;
  DN_RETURN_IF_ERROR(Resolve(&c, &min_bytes, &max_bytes));
  DN_ASSIGN_OR_RETURN(std::unique_ptr<comm::Store> store, comm::MakeFileStore(dir));
  comm::GlooOptions go;
  go.rank = rank;
  go.size = c.ranks;
  go.timeout = std::chrono::milliseconds(c.timeout_ms);
  go.prefix = "bench-ctl";
  DN_ASSIGN_OR_RETURN(std::unique_ptr<comm::ProcessGroup> ctl,
                      comm::MakeGlooProcessGroup(*store, go));
  // Per-rank buffers hold max_bytes (rounded like the sweep below).
  const size_t max_total = static_cast<size_t>(max_bytes);
  std::unique_ptr<Runner> runner;
  if (c.backend == "gloo") {
    runner = std::make_unique<GlooRunner>(*ctl, max_total);
  } else {
#ifdef DENOISED_WITH_CUDA
    DN_ASSIGN_OR_RETURN(runner, NcclRunner::Create(*store, *ctl, max_total, go.timeout));
#endif
  }
  if (rank == 0) {
    std::printf("# denoised bench comm: all-to-all, backend=%s ranks=%d iters=%d warmup=%d\n",
                c.backend.c_str(), c.ranks, c.iters, c.warmup);
    std::printf("# busbw = algbw * (n-1)/n; time = median over iters of the slowest rank;\n"
                "# b2b = mean of iters calls issued back to back (no host sync between)\n");
    std::printf("# %12s %12s %12s %12s %11s %11s %8s\n", "size(B)", "per-peer(B)", "time(us)",
                "b2b(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong");
    std::fflush(stdout);
  }
  std::vector<Row> rows;
  uint64_t salt = 1;
  for (uint64_t size = min_bytes; size <= max_bytes; size *= 4, ++salt) {
    // `size` bytes per rank in total, split into `ranks` blocks of 16-bit
    // words (as the PyTorch baseline in bench/anchors splits bf16 buffers).
    const size_t per_peer = size / 2 / static_cast<uint64_t>(c.ranks) * 2;
    if (per_peer == 0) continue;
    DN_RETURN_IF_ERROR(runner->Prepare(per_peer, salt));
    DN_RETURN_IF_ERROR(ctl->Barrier());
    for (int i = 0; i < c.warmup; ++i) DN_RETURN_IF_ERROR(runner->TimeOne(per_peer).status());
    std::vector<double> times;
    for (int i = 0; i < c.iters; ++i) {
      DN_ASSIGN_OR_RETURN(double us, runner->TimeOne(per_peer));
      times.push_back(us);
    }
    double med = Median(times);
    DN_RETURN_IF_ERROR(ctl->AllReduce(&med, 1, comm::ReduceType::kF64, comm::ReduceOp::kMax));
    DN_ASSIGN_OR_RETURN(double b2b, runner->TimeBackToBack(per_peer, c.iters));
    DN_RETURN_IF_ERROR(ctl->AllReduce(&b2b, 1, comm::ReduceType::kF64, comm::ReduceOp::kMax));
    DN_ASSIGN_OR_RETURN(int64_t wrong, runner->Verify(per_peer, salt));
    DN_RETURN_IF_ERROR(ctl->AllReduce(&wrong, 1, comm::ReduceType::kI64, comm::ReduceOp::kSum));
    Row row;
    row.bytes = per_peer * static_cast<uint64_t>(c.ranks);
    row.bytes_per_peer = per_peer;
    row.us = med;
    row.b2b_us = b2b;
    row.algbw = med > 0 ? static_cast<double>(row.bytes) / (med * 1e-6) / 1e9 : 0;
    row.busbw = row.algbw * (c.ranks - 1) / c.ranks;
    row.wrong = wrong;
    rows.push_back(row);
    *total_wrong += wrong;
    if (rank == 0) {
      std::printf("  %12llu %12llu %12.1f %12.1f %11.3f %11.3f %8lld\n",
                  static_cast<unsigned long long>(row.bytes),
                  static_cast<unsigned long long>(row.bytes_per_peer), row.us, row.b2b_us, row.algbw,
                  row.busbw, static_cast<long long>(row.wrong));
      std::fflush(stdout);
    }
    if (size > max_bytes / 4) break;  // no overflow on the next step
  }
  DN_RETURN_IF_ERROR(ctl->Barrier());
  if (rank == 0 && !c.json.empty()) DN_RETURN_IF_ERROR(WriteJson(c.json, c, rows));
  return absl::OkStatus();
}

std::string SelfExe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

}  // namespace

int BenchCommRankCommand(int argc, char** argv) {
  Config c;
  int rank = 0;
  std::string dir;
  FlagSet flags("denoised bench comm-rank", "one rank of `denoised bench comm` (internal)");
  AddCommonFlags(flags, &c);
  flags.Int("rank", &rank, "this rank");
  flags.String("dir", &dir, "FileStore folder shared by the ranks");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  SetLogTag(absl::StrCat("bench-rank", rank));
  int64_t wrong = 0;
  absl::Status st = RunCommRank(c, rank, dir, &wrong);
  if (!st.ok()) {
    DN_LOG(ERROR) << "bench comm rank " << rank << ": " << st;
    return 1;
  }
  if (wrong != 0) {
    if (rank == 0) DN_LOG(ERROR) << "bench comm: " << wrong << " wrong words";
    return 1;
  }
  return 0;
}

int BenchCommCommand(int argc, char** argv) {
  Config c;
  FlagSet flags("denoised bench comm",
                "All-to-all latency and bus bandwidth (Gloo CPU ranks or NCCL GPUs).");
  AddCommonFlags(flags, &c);
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  uint64_t min_bytes = 0, max_bytes = 0;
  if (absl::Status st = Resolve(&c, &min_bytes, &max_bytes); !st.ok()) {
    std::fprintf(stderr, "denoised bench comm: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  const std::string self = SelfExe();
  std::string tmpl = (std::filesystem::temp_directory_path() / "dn-bench-comm-XXXXXX").string();
  if (self.empty() || ::mkdtemp(tmpl.data()) == nullptr) {
    std::fprintf(stderr, "denoised bench comm: cannot find the executable or make a temp folder\n");
    return 1;
  }
  const std::string dir = tmpl;

  std::vector<pid_t> pids;
  for (int r = 0; r < c.ranks; ++r) {
    std::vector<std::string> args = {self,
                                     "bench",
                                     "comm-rank",
                                     "--rank=" + std::to_string(r),
                                     "--dir=" + dir,
                                     "--ranks=" + std::to_string(c.ranks),
                                     "--backend=" + c.backend,
                                     "--min-bytes=" + c.min_bytes,
                                     "--max-bytes=" + c.max_bytes,
                                     "--iters=" + std::to_string(c.iters),
                                     "--warmup=" + std::to_string(c.warmup),
                                     "--timeout-ms=" + std::to_string(c.timeout_ms),
                                     "--json=" + c.json};
    std::vector<char*> argv_c;
    for (std::string& s : args) argv_c.push_back(s.data());
    argv_c.push_back(nullptr);
    pid_t pid = -1;
    if (::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv_c.data(), environ) != 0) {
      std::fprintf(stderr, "denoised bench comm: cannot start rank %d\n", r);
      for (pid_t p : pids) ::kill(p, SIGKILL);
      pid = -1;
      break;
    }
    pids.push_back(pid);
  }
  // Wait for every rank. When one fails, the others get an error within the
  // group timeout; past that (plus slack) they are killed.
  bool failed = static_cast<int>(pids.size()) != c.ranks;
  Clock::time_point kill_at = Clock::time_point::max();
  if (failed) kill_at = Clock::now();
  size_t running = pids.size();
  std::vector<bool> done(pids.size(), false);
  while (running > 0) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (done[i]) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        done[i] = true;
        --running;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
          if (!failed) kill_at = Clock::now() + std::chrono::milliseconds(c.timeout_ms + 5000);
          failed = true;
        }
      }
    }
    if (running > 0 && Clock::now() >= kill_at) {
      for (size_t i = 0; i < pids.size(); ++i)
        if (!done[i]) ::kill(pids[i], SIGKILL);
      kill_at = Clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (failed) std::fprintf(stderr, "denoised bench comm: FAILED (see the rank errors above)\n");
  return failed ? 1 : 0;
}

}  // namespace dn::bench
