// nccl_comm_test: the Gloo tests' checks on the NCCL backend, one GPU per
// rank. Not registered with ctest (CI has no GPU); run it on a GPU machine:
//
//   build/bin/nccl_comm_test                 # world = number of GPUs (>= 2)
//   build/bin/nccl_comm_test --world 4 --timeout_ms 5000
//
// Without --rank it is the launcher: it starts `world` copies of itself
// (fork+exec, FileStore in a temporary folder), first for the healthy checks
// (every byte of all-to-alls, all-gather, broadcast, all-reduce, barrier,
// the Ulysses exchange on device buffers: head-sharded result = the global
// tensor, packed QKV = three separate exchanges, round trip = identity),
// then for the failure checks (a rank SIGKILLed mid-run: every survivor gets
// an error within the timeout, never a hang; the same with the survivors
// replaying a CUDA graph that captured the all-to-all; Abort() ends a stuck
// collective). The healthy phase also replays a captured all-to-all through
// LaunchWatched and checks every byte. It prints one summary line "nccl_comm_test: PASS ..." or
// "nccl_comm_test: FAIL ..." and exits non-zero on failure.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "base/log.h"
#include "comm/nccl_process_group.h"
#include "comm/store.h"
#include "comm/ulysses.h"
#include "tests/comm/comm_test_util.h"
#include "tests/comm/rank_launcher.h"

namespace dn::comm::testing {
namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string mode = "healthy";
  int rank = -1;
  int world = 0;
  std::string dir;
  int timeout_ms = 5000;
  std::string self;
};

int Fail(const std::string& what) {
  std::fprintf(stderr, "nccl_comm_test rank: FAIL: %s\n", what.c_str());
  return 1;
}

#define CUDA_OR_FAIL(expr)                                                 \
  do {                                                                     \
    cudaError_t e_ = (expr);                                               \
    if (e_ != cudaSuccess)                                                 \
      return Fail(absl::StrCat(#expr, ": ", cudaGetErrorString(e_)));      \
  } while (0)

#define OK_OR_FAIL(expr)                                  \
  do {                                                    \
    absl::Status s_ = (expr);                             \
    if (!s_.ok()) return Fail(absl::StrCat(#expr, ": ", s_.ToString())); \
  } while (0)

struct DeviceBuf {
  void* p = nullptr;
  size_t n = 0;
  ~DeviceBuf() {
    if (p) cudaFree(p);
  }
};

// Host-to-host all-to-all through device buffers (for host-side relayouts).
struct Staging {
  DeviceBuf send, recv;
  cudaStream_t stream = nullptr;
  absl::Status Run(ProcessGroup& pg, const void* hs, void* hr, size_t block) {
    const size_t total = block * static_cast<size_t>(pg.size());
    if (cudaMemcpyAsync(send.p, hs, total, cudaMemcpyHostToDevice, stream) != cudaSuccess)
      return absl::InternalError("copy to device");
    if (absl::Status st = pg.AllToAll(send.p, recv.p, block); !st.ok()) return st;
    if (cudaMemcpyAsync(hr, recv.p, total, cudaMemcpyDeviceToHost, stream) != cudaSuccess)
      return absl::InternalError("copy to host");
    if (cudaStreamSynchronize(stream) != cudaSuccess)
      return absl::InternalError("stream sync");
    return absl::OkStatus();
  }
};

void WriteResult(const Args& a, const absl::Status& st, int64_t ms) {
  std::ofstream out(absl::StrCat(a.dir, "/result.", a.rank));
  out << absl::StatusCodeToString(st.code()) << "\n" << ms << "\n" << st.message() << "\n";
}

// Byte j of the block rank `from` sends to rank `to` in round `round`.
uint8_t GraphByte(int from, int to, size_t j, int round) {
  return static_cast<uint8_t>(from * 31 + to * 7 + j * 3 + round * 13 + 1);
}

// An all-to-all captured into a CUDA graph on the group's stream (issued
// during the capture: recorded, not watched), then replayed through
// LaunchWatched with new send contents each round, every byte checked; and
// an eager collective between replays still works.
int RunGraphAllToAll(const Args& a, ProcessGroup& pg, cudaStream_t stream) {
  const int P = a.world, r = a.rank;
  const size_t bytes = (1u << 20) + 40;  // per peer
  DeviceBuf dsend, drecv;
  CUDA_OR_FAIL(cudaMalloc(&dsend.p, bytes * P));
  CUDA_OR_FAIL(cudaMalloc(&drecv.p, bytes * P));
  std::vector<uint8_t> hsend(bytes * P), hrecv(bytes * P);
  // One eager call of the size first (connections), as the engine does.
  OK_OR_FAIL(pg.AllToAll(dsend.p, drecv.p, bytes));
  CUDA_OR_FAIL(cudaStreamSynchronize(stream));
  CUDA_OR_FAIL(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
  const absl::Status issued = pg.AllToAll(dsend.p, drecv.p, bytes);
  cudaGraph_t graph = nullptr;
  CUDA_OR_FAIL(cudaStreamEndCapture(stream, &graph));
  OK_OR_FAIL(issued);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  CUDA_OR_FAIL(inst);
  int rc = 0;
  for (int round = 0; round < 3 && rc == 0; ++round) {
    for (int p = 0; p < P; ++p)
      for (size_t j = 0; j < bytes; ++j) hsend[p * bytes + j] = GraphByte(r, p, j, round);
    if (cudaMemcpyAsync(dsend.p, hsend.data(), hsend.size(), cudaMemcpyHostToDevice,
                        stream) != cudaSuccess ||
        cudaMemsetAsync(drecv.p, 0, bytes * P, stream) != cudaSuccess) {
      rc = Fail("graph round staging");
      break;
    }
    absl::Status st = pg.LaunchWatched([&]() -> absl::Status {
      const cudaError_t e = cudaGraphLaunch(exec, stream);
      return e == cudaSuccess ? absl::OkStatus()
                              : absl::InternalError(cudaGetErrorString(e));
    });
    if (!st.ok()) {
      rc = Fail(absl::StrCat("LaunchWatched: ", st.ToString()));
      break;
    }
    if (cudaMemcpyAsync(hrecv.data(), drecv.p, hrecv.size(), cudaMemcpyDeviceToHost,
                        stream) != cudaSuccess ||
        cudaStreamSynchronize(stream) != cudaSuccess) {
      rc = Fail("graph round copy back");
      break;
    }
    for (int q = 0; q < P && rc == 0; ++q)
      for (size_t j = 0; j < bytes; ++j)
        if (hrecv[q * bytes + j] != GraphByte(q, r, j, round)) {
          rc = Fail(absl::StrCat("graph replay ", round, ": byte ", j, " from rank ", q));
          break;
        }
    // An eager collective between replays (mixing captured and not).
    if (rc == 0 && !pg.Barrier().ok()) rc = Fail("Barrier between replays");
  }
  cudaGraphExecDestroy(exec);
  return rc;
}

int RunHealthy(const Args& a, ProcessGroup& pg, cudaStream_t stream) {
  const int P = a.world, r = a.rank;
  const size_t kMax = 16u << 20;  // bytes per peer
  DeviceBuf dsend, drecv;
  CUDA_OR_FAIL(cudaMalloc(&dsend.p, kMax * P));
  CUDA_OR_FAIL(cudaMalloc(&drecv.p, kMax * P));
  // All-to-all, every byte.
  uint64_t salt = 0;
  for (size_t bytes : {size_t{1}, size_t{7}, size_t{4096}, size_t{65536 + 3},
                       size_t{1} << 20, kMax}) {
    std::vector<uint8_t> send(bytes * P), recv(bytes * P, 0xEE);
    for (int iter = 0; iter < 2; ++iter, ++salt) {
      FillA2aSend(r, P, bytes, salt, send.data());
      CUDA_OR_FAIL(cudaMemcpyAsync(dsend.p, send.data(), send.size(),
                                   cudaMemcpyHostToDevice, stream));
      CUDA_OR_FAIL(cudaMemsetAsync(drecv.p, 0xEE, recv.size(), stream));
      OK_OR_FAIL(pg.AllToAll(dsend.p, drecv.p, bytes));
      CUDA_OR_FAIL(cudaMemcpyAsync(recv.data(), drecv.p, recv.size(),
                                   cudaMemcpyDeviceToHost, stream));
      CUDA_OR_FAIL(cudaStreamSynchronize(stream));
      std::string bad = CheckA2aRecv(r, P, bytes, salt, recv.data());
      if (!bad.empty()) return Fail(absl::StrCat("all-to-all of ", bytes, " bytes: ", bad));
    }
  }
  // All-gather.
  {
    const size_t bytes = 1003;
    std::vector<uint8_t> send(bytes), recv(bytes * P);
    for (size_t i = 0; i < bytes; ++i) send[i] = A2aByte(r, 255, i, 77);
    CUDA_OR_FAIL(cudaMemcpyAsync(dsend.p, send.data(), bytes, cudaMemcpyHostToDevice, stream));
    OK_OR_FAIL(pg.AllGather(dsend.p, drecv.p, bytes));
    CUDA_OR_FAIL(cudaMemcpyAsync(recv.data(), drecv.p, recv.size(), cudaMemcpyDeviceToHost, stream));
    CUDA_OR_FAIL(cudaStreamSynchronize(stream));
    for (int p = 0; p < P; ++p)
      for (size_t i = 0; i < bytes; ++i)
        if (recv[p * bytes + i] != A2aByte(p, 255, i, 77))
          return Fail(absl::StrCat("all-gather: byte ", i, " from rank ", p));
  }
  // Broadcast from every root.
  for (int root = 0; root < P; ++root) {
    const size_t bytes = 5000 + root;
    std::vector<uint8_t> buf(bytes);
    for (size_t i = 0; i < bytes; ++i) buf[i] = r == root ? A2aByte(root, 0, i, 91) : 0;
    CUDA_OR_FAIL(cudaMemcpyAsync(dsend.p, buf.data(), bytes, cudaMemcpyHostToDevice, stream));
    OK_OR_FAIL(pg.Broadcast(dsend.p, bytes, root));
    CUDA_OR_FAIL(cudaMemcpyAsync(buf.data(), dsend.p, bytes, cudaMemcpyDeviceToHost, stream));
    CUDA_OR_FAIL(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < bytes; ++i)
      if (buf[i] != A2aByte(root, 0, i, 91))
        return Fail(absl::StrCat("broadcast from root ", root, ": byte ", i));
  }
  // All-reduce sum/max of exactly representable values.
  for (auto op : {ReduceOp::kSum, ReduceOp::kMax}) {
    const size_t n = 1000;
    std::vector<float> f(n);
    std::vector<double> d(n);
    std::vector<int64_t> q(n);
    for (size_t i = 0; i < n; ++i) {
      f[i] = static_cast<float>((r + 1) * static_cast<int>(i % 17) - 3 * r);
      d[i] = 0.5 * (r + 1) * static_cast<double>(i) - r;
      q[i] = (static_cast<int64_t>(r) << 33) * ((i % 2) ? 1 : -1) + static_cast<int64_t>(i);
    }
    char* base = static_cast<char*>(dsend.p);
    CUDA_OR_FAIL(cudaMemcpyAsync(base, f.data(), n * 4, cudaMemcpyHostToDevice, stream));
    CUDA_OR_FAIL(cudaMemcpyAsync(base + 8192, d.data(), n * 8, cudaMemcpyHostToDevice, stream));
    CUDA_OR_FAIL(cudaMemcpyAsync(base + 16384, q.data(), n * 8, cudaMemcpyHostToDevice, stream));
    OK_OR_FAIL(pg.AllReduce(base, n, ReduceType::kF32, op));
    OK_OR_FAIL(pg.AllReduce(base + 8192, n, ReduceType::kF64, op));
    OK_OR_FAIL(pg.AllReduce(base + 16384, n, ReduceType::kI64, op));
    CUDA_OR_FAIL(cudaMemcpyAsync(f.data(), base, n * 4, cudaMemcpyDeviceToHost, stream));
    CUDA_OR_FAIL(cudaMemcpyAsync(d.data(), base + 8192, n * 8, cudaMemcpyDeviceToHost, stream));
    CUDA_OR_FAIL(cudaMemcpyAsync(q.data(), base + 16384, n * 8, cudaMemcpyDeviceToHost, stream));
    CUDA_OR_FAIL(cudaStreamSynchronize(stream));
    for (size_t i = 0; i < n; ++i) {
      float wf = op == ReduceOp::kSum ? 0.f : -1e30f;
      double wd = op == ReduceOp::kSum ? 0.0 : -1e300;
      int64_t wq = op == ReduceOp::kSum ? 0 : INT64_MIN;
      for (int p = 0; p < P; ++p) {
        const float vf = static_cast<float>((p + 1) * static_cast<int>(i % 17) - 3 * p);
        const double vd = 0.5 * (p + 1) * static_cast<double>(i) - p;
        const int64_t vq = (static_cast<int64_t>(p) << 33) * ((i % 2) ? 1 : -1) +
                           static_cast<int64_t>(i);
        if (op == ReduceOp::kSum) {
          wf += vf; wd += vd; wq += vq;
        } else {
          wf = std::max(wf, vf); wd = std::max(wd, vd); wq = std::max(wq, vq);
        }
      }
      if (f[i] != wf || d[i] != wd || q[i] != wq)
        return Fail(absl::StrCat("all-reduce element ", i, ": ", f[i], "/", d[i], "/", q[i],
                                 " want ", wf, "/", wd, "/", wq));
    }
  }
  OK_OR_FAIL(pg.Barrier());

  // Ulysses: host relayouts, device all-to-all.
  Staging staging;
  staging.stream = stream;
  const size_t kStage = 8u << 20;
  CUDA_OR_FAIL(cudaMalloc(&staging.send.p, kStage));
  CUDA_OR_FAIL(cudaMalloc(&staging.recv.p, kStage));
  struct Case { int64_t batch, seq; int hpr, d; size_t es; };
  const Case cases[] = {{1, 8L * P, 2, 8, 4}, {2, 8L * P + 3, 1, 5, 2}, {1, P - 1, 3, 4, 4},
                        {2, 37, 2, 16, 2}};
  for (const Case& c : cases) {
    UlyssesLayout l;
    l.batch = c.batch; l.seq_total = std::max<int64_t>(c.seq, 1); l.world = P;
    l.heads = c.hpr * P; l.head_dim = c.d; l.elem_size = c.es;
    OK_OR_FAIL(l.Validate());
    if (l.qkv_block_bytes() * P > kStage) return Fail("staging too small");
    const std::string name = absl::StrCat("[B=", l.batch, " L=", l.seq_total, " H=", l.heads,
                                          " d=", l.head_dim, " es=", l.elem_size, "]");
    std::vector<uint8_t> x[3], y[3];
    for (int t = 0; t < 3; ++t) x[t] = MakeSeqSharded(l, r, t);
    const size_t head_bytes = static_cast<size_t>(l.head_sharded_elems()) * l.elem_size;
    for (int t = 0; t < 3; ++t) y[t].assign(head_bytes, 0);
    std::vector<uint8_t> send(l.qkv_block_bytes() * P), recv(send.size());
    PackQkvHost(l, x[0].data(), x[1].data(), x[2].data(), send.data());
    OK_OR_FAIL(staging.Run(pg, send.data(), recv.data(), l.qkv_block_bytes()));
    UnpackQkvHost(l, recv.data(), y[0].data(), y[1].data(), y[2].data());
    for (int t = 0; t < 3; ++t) {
      std::string bad = CheckHeadSharded(l, r, t, y[t].data());
      if (!bad.empty()) return Fail(absl::StrCat(name, " SeqToHead: ", bad));
    }
    // Packed QKV = three separate single-tensor exchanges, each relayout
    // written here by index: [B,S,H,d] -> blocks [P,B,S,h,d] -> [B,P*S,h,d].
    for (int t = 0; t < 3; ++t) {
      std::vector<uint8_t> s1(l.out_block_bytes() * P), r1(s1.size()), o1(head_bytes);
      const int64_t S = l.shard(), h = l.heads_per_rank();
      for (int64_t p = 0; p < P; ++p)
        for (int64_t b = 0; b < l.batch; ++b)
          for (int64_t s = 0; s < S; ++s)
            std::memcpy(&s1[(((p * l.batch + b) * S + s) * h) * l.head_dim * l.elem_size],
                        &x[t][((b * S + s) * l.heads + p * h) * l.head_dim * l.elem_size],
                        h * l.head_dim * l.elem_size);
      OK_OR_FAIL(staging.Run(pg, s1.data(), r1.data(), l.out_block_bytes()));
      for (int64_t p = 0; p < P; ++p)
        for (int64_t b = 0; b < l.batch; ++b)
          std::memcpy(&o1[((b * P + p) * S) * h * l.head_dim * l.elem_size],
                      &r1[((p * l.batch + b) * S) * h * l.head_dim * l.elem_size],
                      S * h * l.head_dim * l.elem_size);
      if (o1 != y[t])
        return Fail(absl::StrCat(name, " packed QKV differs from the separate exchange of ", t));
    }
    // Round trip.
    for (int t = 0; t < 3; ++t) {
      std::vector<uint8_t> osend(l.out_block_bytes() * P), orecv(osend.size());
      std::vector<uint8_t> back(x[t].size(), 0xCD);
      PackOutHost(l, y[t].data(), osend.data());
      OK_OR_FAIL(staging.Run(pg, osend.data(), orecv.data(), l.out_block_bytes()));
      UnpackOutHost(l, orecv.data(), back.data());
      if (back != x[t]) return Fail(absl::StrCat(name, " round trip of tensor ", t));
    }
  }
  {
    UlyssesLayout bad;
    bad.seq_total = 16; bad.world = P; bad.heads = P + 1;
    if (P > 1 && bad.Validate().code() != absl::StatusCode::kFailedPrecondition)
      return Fail("heads % world != 0 not FAILED_PRECONDITION");
    // The host exchange refuses a device group.
    UlyssesLayout ok;
    ok.seq_total = 16; ok.world = P; ok.heads = P;
    if (UlyssesExchange::Create(pg, ok).ok())
      return Fail("UlyssesExchange accepted a device-memory group");
  }
  if (int rc = RunGraphAllToAll(a, pg, stream); rc != 0) return rc;
  OK_OR_FAIL(pg.Barrier());
  return 0;
}

// The victim (last rank) stops after a few collectives and sleeps; the
// launcher SIGKILLs it. Survivors loop AllToAll + stream sync until an error
// shows (a call returns one, or the watchdog aborts and the next call is
// ABORTED).
// With `graph` (mode killed-graph) every iteration replays a captured
// all-to-all through LaunchWatched instead of calling AllToAll.
int RunKilled(const Args& a, ProcessGroup& pg, cudaStream_t stream, bool graph) {
  const size_t bytes = 1 << 20;
  DeviceBuf s, rcv;
  CUDA_OR_FAIL(cudaMalloc(&s.p, bytes * a.world));
  CUDA_OR_FAIL(cudaMalloc(&rcv.p, bytes * a.world));
  const bool victim = a.rank == a.world - 1;
  cudaGraphExec_t exec = nullptr;
  if (graph) {
    OK_OR_FAIL(pg.AllToAll(s.p, rcv.p, bytes));
    CUDA_OR_FAIL(cudaStreamSynchronize(stream));
    CUDA_OR_FAIL(cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed));
    const absl::Status issued = pg.AllToAll(s.p, rcv.p, bytes);
    cudaGraph_t g = nullptr;
    CUDA_OR_FAIL(cudaStreamEndCapture(stream, &g));
    OK_OR_FAIL(issued);
    const cudaError_t inst = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    CUDA_OR_FAIL(inst);
  }
  auto collective = [&]() -> absl::Status {
    if (!graph) return pg.AllToAll(s.p, rcv.p, bytes);
    return pg.LaunchWatched([&]() -> absl::Status {
      const cudaError_t e = cudaGraphLaunch(exec, stream);
      return e == cudaSuccess ? absl::OkStatus()
                              : absl::InternalError(cudaGetErrorString(e));
    });
  };
  auto prev_start = Clock::now();
  for (int iter = 0; iter < 100000; ++iter) {
    if (victim && iter == 3) {
      std::ofstream(absl::StrCat(a.dir, "/victim_ready")) << "ready\n";
      std::this_thread::sleep_for(std::chrono::seconds(120));
      return 0;
    }
    const auto start = Clock::now();
    absl::Status st = collective();
    // A refused call means the previous iteration's collective was the one
    // that hung (its stream sync returned after the watchdog's abort).
    auto since = st.ok() ? start : prev_start;
    if (st.ok()) {
      const cudaError_t e = cudaStreamSynchronize(stream);
      if (e != cudaSuccess) st = absl::InternalError(cudaGetErrorString(e));
    }
    prev_start = start;
    if (st.ok()) continue;
    const int64_t ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - since).count();
    WriteResult(a, st, ms);
    std::fprintf(stderr, "rank %d: iteration %d failed after %lld ms: %s\n", a.rank, iter,
                 static_cast<long long>(ms), st.ToString().c_str());
    if (iter < 3) return Fail("failed before the victim stopped");
    if (pg.Barrier().code() != absl::StatusCode::kAborted)
      return Fail("call after the failure was not ABORTED");
    return 0;
  }
  return Fail("no error after 100000 iterations");
}

// Rank 0 waits in a collective the others never join; Abort() from another
// thread ends it (the sync returns, the next call is ABORTED).
int RunAbort(const Args& a, ProcessGroup& pg, cudaStream_t stream) {
  const size_t bytes = 4096;
  DeviceBuf s, rcv;
  CUDA_OR_FAIL(cudaMalloc(&s.p, bytes * a.world));
  CUDA_OR_FAIL(cudaMalloc(&rcv.p, bytes * a.world));
  if (a.rank != 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(3 * a.timeout_ms));
    return 0;
  }
  std::thread aborter([&pg] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    pg.Abort();
  });
  const auto start = Clock::now();
  absl::Status st = pg.AllToAll(s.p, rcv.p, bytes);
  if (st.ok()) {
    const cudaError_t e = cudaStreamSynchronize(stream);
    if (e != cudaSuccess) st = absl::InternalError(cudaGetErrorString(e));
  }
  if (st.ok()) st = pg.Barrier();
  const int64_t ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  aborter.join();
  WriteResult(a, st, ms);
  if (st.code() != absl::StatusCode::kAborted)
    return Fail(absl::StrCat("after Abort(): ", st.ToString()));
  if (ms >= a.timeout_ms) return Fail("Abort() did not end the wait before the timeout");
  return 0;
}

int RankMain(const Args& a) {
  SetLogTag(absl::StrCat("rank", a.rank));
  CUDA_OR_FAIL(cudaSetDevice(a.rank));
  cudaStream_t stream = nullptr;
  CUDA_OR_FAIL(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  auto store = MakeFileStore(a.dir);
  if (!store.ok()) return Fail(store.status().ToString());
  NcclOptions o;
  o.rank = a.rank;
  o.size = a.world;
  o.device = a.rank;
  o.stream = stream;
  o.timeout = std::chrono::milliseconds(a.timeout_ms);
  o.prefix = absl::StrCat("nccl-test-", a.mode);
  auto pg = MakeNcclProcessGroup(**store, o);
  if (!pg.ok()) return Fail(pg.status().ToString());
  if ((*pg)->memory() != MemoryKind::kDevice || (*pg)->backend_name() != "nccl" ||
      (*pg)->rank() != a.rank || (*pg)->size() != a.world)
    return Fail("group reports wrong rank/size/memory/backend");
  int rc = 1;
  if (a.mode == "healthy") rc = RunHealthy(a, **pg, stream);
  else if (a.mode == "killed") rc = RunKilled(a, **pg, stream, false);
  else if (a.mode == "killed-graph") rc = RunKilled(a, **pg, stream, true);
  else if (a.mode == "abort") rc = RunAbort(a, **pg, stream);
  else rc = Fail("unknown --mode " + a.mode);
  pg->reset();
  cudaStreamDestroy(stream);
  return rc;
}

std::vector<std::string> RankArgs(const Args& a, const std::string& mode, int r,
                                  const std::string& dir) {
  return {"--mode", mode, "--rank", std::to_string(r), "--world", std::to_string(a.world),
          "--dir", dir, "--timeout_ms", std::to_string(a.timeout_ms)};
}

// One phase: `world` ranks of `mode`; returns "" or what failed.
std::string RunPhase(const Args& a, const std::string& mode) {
  TempDir dir;
  RankLauncher ranks;
  for (int r = 0; r < a.world; ++r)
    if (!ranks.Start(a.self, RankArgs(a, mode, r, dir.path()))) return "spawn failed";
  const auto limit = std::chrono::milliseconds(6 * a.timeout_ms + 60000);
  if (mode == "killed" || mode == "killed-graph") {
    if (!WaitForFile(dir.path() + "/victim_ready", Clock::now() + limit, &ranks))
      return "a rank exited (or hung) before the victim got ready";
    ranks.Kill(a.world - 1, SIGKILL);
    const auto killed_at = Clock::now();
    std::vector<int> survivors;
    for (int r = 0; r + 1 < a.world; ++r) survivors.push_back(r);
    const bool done =
        ranks.Wait(Clock::now() + std::chrono::milliseconds(a.timeout_ms + 20000), survivors);
    const long long waited_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - killed_at).count();
    ranks.Wait(Clock::now() + std::chrono::seconds(2), {a.world - 1});
    if (!done) return "a survivor hung after its peer was killed";
    for (int r : survivors) {
      // A graph replay whose NCCL kernel does not observe ncclCommAbort ends
      // by the fail-stop timer (NcclOptions::stuck_exit_after): a bounded,
      // logged process exit, which the supervisor turns into a restart.
      if (mode == "killed-graph" && ranks.status(r) == kStuckCollectiveExitCode) {
        std::printf("  %s: survivor %d was blocked in the replayed graph; fail-stop ended it "
                    "(exit %d) %lld ms after the kill\n",
                    mode.c_str(), r, kStuckCollectiveExitCode, waited_ms);
        if (waited_ms > a.timeout_ms + 10000)
          return absl::StrCat("survivor ", r, " took ", waited_ms, " ms to fail-stop");
        continue;
      }
      if (ranks.status(r) != 0) return absl::StrCat("survivor ", r, " exit ", ranks.status(r));
      RankResult res = ReadResult(dir.path(), r);
      if (!res.present) return absl::StrCat("survivor ", r, " recorded no error");
      std::printf("  %s: survivor %d got %s after %lld ms: %s\n", mode.c_str(), r,
                  res.code.c_str(),
                  res.elapsed_ms, res.message.c_str());
      if (res.elapsed_ms > a.timeout_ms + 10000)
        return absl::StrCat("survivor ", r, " took ", res.elapsed_ms, " ms");
    }
    return "";
  }
  if (mode == "abort") {
    if (!ranks.Wait(Clock::now() + limit)) return "a rank hung";
    if (ranks.status(0) != 0) return absl::StrCat("rank 0 exit ", ranks.status(0));
    RankResult res = ReadResult(dir.path(), 0);
    std::printf("  abort: rank 0 got %s after %lld ms\n", res.code.c_str(), res.elapsed_ms);
    return "";
  }
  if (!ranks.Wait(Clock::now() + limit)) return "a rank hung";
  for (int r = 0; r < a.world; ++r)
    if (ranks.status(r) != 0) return absl::StrCat("rank ", r, " exit ", ranks.status(r));
  return "";
}

int LauncherMain(Args a) {
  if (a.world == 0) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    a.world = n;
  }
  if (a.world < 2) {
    std::printf("nccl_comm_test: FAIL (needs >= 2 GPUs, world=%d)\n", a.world);
    return 1;
  }
  int failed = 0;
  std::string summary;
  for (const char* mode : {"healthy", "abort", "killed", "killed-graph"}) {
    const auto start = Clock::now();
    const std::string bad = RunPhase(a, mode);
    const double s = std::chrono::duration<double>(Clock::now() - start).count();
    std::printf("nccl_comm_test: %-8s %s (%.1f s)%s%s\n", mode, bad.empty() ? "ok" : "FAILED",
                s, bad.empty() ? "" : ": ", bad.c_str());
    std::fflush(stdout);
    summary += absl::StrCat(" ", mode, "=", bad.empty() ? "ok" : "FAILED");
    if (!bad.empty()) ++failed;
  }
  std::printf("nccl_comm_test: %s (world=%d, timeout=%d ms):%s\n", failed ? "FAIL" : "PASS",
              a.world, a.timeout_ms, summary.c_str());
  return failed ? 1 : 0;
}

int Main(int argc, char** argv) {
  Args a;
  a.self = argv[0];
  FlagSet flags("nccl_comm_test", "NCCL process-group checks, one GPU per rank");
  flags.String("mode", &a.mode, "(rank) healthy | killed | killed-graph | abort");
  flags.Int("rank", &a.rank, "(rank) this rank; absent: launch all ranks");
  flags.Int("world", &a.world, "number of ranks/GPUs (0: all GPUs)");
  flags.String("dir", &a.dir, "(rank) FileStore folder");
  flags.Int("timeout_ms", &a.timeout_ms, "group timeout");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  if (a.rank < 0) {
    char exe[4096];
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) a.self.assign(exe, static_cast<size_t>(n));
    return LauncherMain(a);
  }
  return RankMain(a);
}

}  // namespace
}  // namespace dn::comm::testing

int main(int argc, char** argv) { return dn::comm::testing::Main(argc, argv); }
