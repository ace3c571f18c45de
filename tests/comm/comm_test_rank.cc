// comm_test_rank: one rank of a multi-process comm test. comm_test (gtest)
// starts N of these with a FileStore folder; each forms a real Gloo group
// over loopback, runs the checks of --mode and exits 0 when they pass. It
// also writes "<dir>/result.<rank>" (status code name and message of the
// last collective) for checks that span ranks.
//
//   comm_test_rank --mode alltoall --rank 0 --world 4 --dir /tmp/x
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/flags.h"
#include "base/log.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "comm/ulysses.h"
#include "tests/comm/comm_test_util.h"

namespace dn::comm::testing {
namespace {

using Clock = std::chrono::steady_clock;

struct Args {
  std::string mode;
  int rank = 0;
  int world = 1;
  std::string dir;
  int timeout_ms = 3000;
  int victim_iters = 3;
};

int Fail(const std::string& what) {
  std::fprintf(stderr, "comm_test_rank: FAIL: %s\n", what.c_str());
  return 1;
}

void WriteResult(const Args& a, const absl::Status& st, int64_t elapsed_ms) {
  std::ofstream out(absl::StrCat(a.dir, "/result.", a.rank));
  out << absl::StatusCodeToString(st.code()) << "\n"
      << elapsed_ms << "\n"
      << st.message() << "\n";
}

// Every element of an all-to-all for several block sizes (odd ones too),
// repeated so that tags and slots advance.
int RunAllToAll(const Args& a, ProcessGroup& pg) {
  const size_t sizes[] = {1, 7, 64, 4096, 65536 + 3, 1 << 20};
  uint64_t salt = 0;
  for (size_t bytes : sizes) {
    std::vector<uint8_t> send(bytes * a.world), recv(bytes * a.world);
    for (int iter = 0; iter < 2; ++iter, ++salt) {
      FillA2aSend(a.rank, a.world, bytes, salt, send.data());
      std::fill(recv.begin(), recv.end(), 0xEE);
      absl::Status st = pg.AllToAll(send.data(), recv.data(), bytes);
      if (!st.ok()) return Fail(st.ToString());
      std::string bad = CheckA2aRecv(a.rank, a.world, bytes, salt, recv.data());
      if (!bad.empty())
        return Fail(absl::StrCat("all-to-all of ", bytes, " bytes: ", bad));
    }
  }
  // Zero bytes is a valid no-op.
  if (absl::Status st = pg.AllToAll(nullptr, nullptr, 0); !st.ok())
    return Fail(st.ToString());
  if (absl::Status st = pg.Barrier(); !st.ok()) return Fail(st.ToString());
  return 0;
}

int RunCollectives(const Args& a, ProcessGroup& pg) {
  const int P = a.world, r = a.rank;
  // AllGather: block p from rank p.
  {
    const size_t bytes = 1000 + 3;
    std::vector<uint8_t> send(bytes), recv(bytes * P, 0);
    for (size_t i = 0; i < bytes; ++i) send[i] = A2aByte(r, 255, i, 77);
    if (absl::Status st = pg.AllGather(send.data(), recv.data(), bytes); !st.ok())
      return Fail(st.ToString());
    for (int p = 0; p < P; ++p)
      for (size_t i = 0; i < bytes; ++i)
        if (recv[p * bytes + i] != A2aByte(p, 255, i, 77))
          return Fail(absl::StrCat("all-gather: byte ", i, " of rank ", p,
                                   "'s block is wrong on rank ", r));
  }
  // Broadcast from every root.
  for (int root = 0; root < P; ++root) {
    const size_t bytes = 5000 + root;
    std::vector<uint8_t> buf(bytes);
    for (size_t i = 0; i < bytes; ++i)
      buf[i] = r == root ? A2aByte(root, 0, i, 91) : 0;
    if (absl::Status st = pg.Broadcast(buf.data(), bytes, root); !st.ok())
      return Fail(st.ToString());
    for (size_t i = 0; i < bytes; ++i)
      if (buf[i] != A2aByte(root, 0, i, 91))
        return Fail(absl::StrCat("broadcast from root ", root, ": byte ", i,
                                 " wrong on rank ", r));
  }
  if (pg.Broadcast(nullptr, 0, P).code() != absl::StatusCode::kInvalidArgument)
    return Fail("broadcast with root == size was accepted");
  // AllReduce sum and max, three types. Values are exact in every type.
  {
    const size_t n = 1000;
    std::vector<float> f(n);
    std::vector<double> d(n);
    std::vector<int64_t> i64(n);
    for (auto op : {ReduceOp::kSum, ReduceOp::kMax}) {
      for (size_t i = 0; i < n; ++i) {
        f[i] = static_cast<float>((r + 1) * static_cast<int>(i % 17) - 3 * r);
        d[i] = 0.5 * (r + 1) * static_cast<double>(i) - r;
        i64[i] = (static_cast<int64_t>(r) << 33) * ((i % 2) ? 1 : -1) +
                 static_cast<int64_t>(i);
      }
      if (absl::Status st = pg.AllReduce(f.data(), n, ReduceType::kF32, op); !st.ok())
        return Fail(st.ToString());
      if (absl::Status st = pg.AllReduce(d.data(), n, ReduceType::kF64, op); !st.ok())
        return Fail(st.ToString());
      if (absl::Status st = pg.AllReduce(i64.data(), n, ReduceType::kI64, op); !st.ok())
        return Fail(st.ToString());
      for (size_t i = 0; i < n; ++i) {
        float wf = op == ReduceOp::kSum ? 0.f : -1e30f;
        double wd = op == ReduceOp::kSum ? 0.0 : -1e300;
        int64_t wi = op == ReduceOp::kSum ? 0 : INT64_MIN;
        for (int p = 0; p < P; ++p) {
          const float vf = static_cast<float>((p + 1) * static_cast<int>(i % 17) - 3 * p);
          const double vd = 0.5 * (p + 1) * static_cast<double>(i) - p;
          const int64_t vi = (static_cast<int64_t>(p) << 33) * ((i % 2) ? 1 : -1) +
                             static_cast<int64_t>(i);
          if (op == ReduceOp::kSum) {
            wf += vf; wd += vd; wi += vi;
          } else {
            wf = std::max(wf, vf); wd = std::max(wd, vd); wi = std::max(wi, vi);
          }
        }
        if (f[i] != wf || d[i] != wd || i64[i] != wi)
          return Fail(absl::StrCat("all-reduce ", op == ReduceOp::kSum ? "sum" : "max",
                                   " element ", i, " on rank ", r, ": got ", f[i], "/",
                                   d[i], "/", i64[i], " want ", wf, "/", wd, "/", wi));
      }
    }
  }
  if (absl::Status st = pg.Barrier(); !st.ok()) return Fail(st.ToString());
  return 0;
}

// One tensor through its own all-to-all, written element by element (the
// independent reference for the packed QKV exchange).
absl::Status ReferenceSeqToHead(ProcessGroup& pg, const UlyssesLayout& l,
                                const std::vector<uint8_t>& x,
                                std::vector<uint8_t>* y) {
  const int64_t P = l.world, B = l.batch, S = l.shard(), H = l.heads,
                h = l.heads_per_rank(), d = l.head_dim;
  const size_t es = l.elem_size;
  std::vector<uint8_t> send(static_cast<size_t>(P * B * S * h * d) * es);
  std::vector<uint8_t> recv(send.size());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t j = 0; j < h; ++j)
          for (int64_t e = 0; e < d; ++e) {
            const size_t to = ((((p * B + b) * S + s) * h + j) * d + e) * es;
            const size_t from = (((b * S + s) * H + p * h + j) * d + e) * es;
            std::memcpy(&send[to], &x[from], es);
          }
  const size_t block = static_cast<size_t>(B * S * h * d) * es;
  if (absl::Status st = pg.AllToAll(send.data(), recv.data(), block); !st.ok())
    return st;
  y->assign(static_cast<size_t>(B * P * S * h * d) * es, 0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t j = 0; j < h; ++j)
          for (int64_t e = 0; e < d; ++e) {
            const size_t from = ((((p * B + b) * S + s) * h + j) * d + e) * es;
            const size_t to = ((((b * P + p) * S + s) * h + j) * d + e) * es;
            std::memcpy(&(*y)[to], &recv[from], es);
          }
  return absl::OkStatus();
}

int RunUlysses(const Args& a, ProcessGroup& pg) {
  const int P = a.world, r = a.rank;
  struct Case {
    int64_t batch, seq;
    int heads_per_rank, head_dim;
    size_t elem_size;
  };
  // Even and uneven sequence lengths (L % P != 0, and L < P so that some
  // ranks hold only padding), 2- and 4-byte elements, batch > 1.
  const Case cases[] = {
      {1, 8L * P, 2, 8, 4},  {2, 8L * P + 3, 1, 5, 2}, {1, P - 1 > 0 ? P - 1 : 1, 3, 4, 4},
      {2, 37, 2, 16, 2},
  };
  for (const Case& c : cases) {
    UlyssesLayout l;
    l.batch = c.batch;
    l.seq_total = c.seq;
    l.world = P;
    l.heads = c.heads_per_rank * P;
    l.head_dim = c.head_dim;
    l.elem_size = c.elem_size;
    const std::string name = absl::StrCat("[B=", l.batch, " L=", l.seq_total, " H=",
                                          l.heads, " d=", l.head_dim, " es=",
                                          l.elem_size, "]");
    auto ex = UlyssesExchange::Create(pg, l);
    if (!ex.ok()) return Fail(ex.status().ToString());
    std::vector<uint8_t> q = MakeSeqSharded(l, r, 0), k = MakeSeqSharded(l, r, 1),
                         v = MakeSeqSharded(l, r, 2);
    const size_t head_bytes = static_cast<size_t>(l.head_sharded_elems()) * l.elem_size;
    std::vector<uint8_t> qo(head_bytes), ko(head_bytes), vo(head_bytes);
    if (absl::Status st = (*ex)->SeqToHead(q.data(), k.data(), v.data(), qo.data(),
                                           ko.data(), vo.data());
        !st.ok())
      return Fail(st.ToString());
    // Head-sharded = the global tensor's heads of this rank, every position.
    for (int t = 0; t < 3; ++t) {
      const std::vector<uint8_t>& y = t == 0 ? qo : t == 1 ? ko : vo;
      std::string bad = CheckHeadSharded(l, r, t, y.data());
      if (!bad.empty()) return Fail(absl::StrCat(name, " SeqToHead: ", bad));
    }
    // Packed QKV = three separate single-tensor exchanges.
    for (int t = 0; t < 3; ++t) {
      std::vector<uint8_t> ref;
      const std::vector<uint8_t>& x = t == 0 ? q : t == 1 ? k : v;
      const std::vector<uint8_t>& y = t == 0 ? qo : t == 1 ? ko : vo;
      if (absl::Status st = ReferenceSeqToHead(pg, l, x, &ref); !st.ok())
        return Fail(st.ToString());
      if (ref != y)
        return Fail(absl::StrCat(name, " packed QKV differs from the separate "
                                       "exchange of tensor ", t));
    }
    // Round trip: HeadToSeq(SeqToHead(x)) == x, padding rows included.
    for (int t = 0; t < 3; ++t) {
      const std::vector<uint8_t>& x = t == 0 ? q : t == 1 ? k : v;
      const std::vector<uint8_t>& y = t == 0 ? qo : t == 1 ? ko : vo;
      std::vector<uint8_t> back(x.size(), 0xCD);
      if (absl::Status st = (*ex)->HeadToSeq(y.data(), back.data()); !st.ok())
        return Fail(st.ToString());
      if (back != x)
        return Fail(absl::StrCat(name, " round trip of tensor ", t,
                                 " is not the identity on rank ", r));
    }
  }
  if (P > 1) {
    UlyssesLayout bad;
    bad.seq_total = 16;
    bad.world = P;
    bad.heads = P + 1;
    auto ex = UlyssesExchange::Create(pg, bad);
    if (ex.ok() || ex.status().code() != absl::StatusCode::kFailedPrecondition)
      return Fail("heads % world != 0 was not FAILED_PRECONDITION");
  }
  if (absl::Status st = pg.Barrier(); !st.ok()) return Fail(st.ToString());
  return 0;
}

// Peer failure: the victim (last rank) takes part in a few all-to-alls, then
// writes "<dir>/victim_ready" and either stops taking part and sleeps (the
// test then kills it with SIGKILL, or in "stuck" mode just lets it sleep) or,
// in "killed_busy" mode, keeps running all-to-alls until the test kills it
// in the middle of one. Survivors keep calling AllToAll and must get an
// error, which they record.
enum class Victim { kSleeps, kStuck, kBusy };

int RunPeerFailure(const Args& a, ProcessGroup& pg, Victim how) {
  const bool victim = a.rank == a.world - 1;
  const size_t bytes = 256 * 1024;
  std::vector<uint8_t> send(bytes * a.world), recv(bytes * a.world);
  for (int iter = 0;; ++iter) {
    if (victim && iter == a.victim_iters) {
      std::ofstream(absl::StrCat(a.dir, "/victim_ready")) << "ready\n";
      if (how != Victim::kBusy) {
        std::this_thread::sleep_for(std::chrono::milliseconds(
            how == Victim::kStuck ? 3 * a.timeout_ms : 60000));
        return 0;
      }
    }
    FillA2aSend(a.rank, a.world, bytes, iter, send.data());
    const auto start = Clock::now();
    absl::Status st = pg.AllToAll(send.data(), recv.data(), bytes);
    const int64_t ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                           Clock::now() - start)
                           .count();
    if (!st.ok()) {
      if (victim) return Fail("the victim saw an error: " + st.ToString());
      WriteResult(a, st, ms);
      std::fprintf(stderr, "rank %d: collective %d failed after %lld ms: %s\n",
                   a.rank, iter, static_cast<long long>(ms), st.ToString().c_str());
      if (iter < a.victim_iters)
        return Fail("a collective failed before the victim stopped");
      // The group is unusable afterwards.
      absl::Status again = pg.AllToAll(send.data(), recv.data(), bytes);
      if (again.code() != absl::StatusCode::kAborted)
        return Fail(absl::StrCat("call after the failure gave ", again.ToString(),
                                 ", want ABORTED"));
      return 0;
    }
    std::string bad = CheckA2aRecv(a.rank, a.world, bytes, iter, recv.data());
    if (!bad.empty()) return Fail(bad);
    if (iter > 100000) return Fail("no error after 100000 collectives");
  }
}

// Abort from another thread while rank 0 waits in a collective that cannot
// complete (the other ranks are asleep). The group timeout is long, so only
// Abort() can end the wait early. The sleepers then find their group broken.
int RunAbort(const Args& a, ProcessGroup& pg) {
  const size_t bytes = 4096;
  std::vector<uint8_t> send(bytes * a.world), recv(bytes * a.world);
  FillA2aSend(a.rank, a.world, bytes, 0, send.data());
  if (a.rank == 0) {
    std::thread aborter([&pg] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      pg.Abort();
    });
    const auto start = Clock::now();
    absl::Status st = pg.AllToAll(send.data(), recv.data(), bytes);
    const int64_t ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                           Clock::now() - start)
                           .count();
    aborter.join();
    WriteResult(a, st, ms);
    if (st.code() != absl::StatusCode::kAborted)
      return Fail(absl::StrCat("aborted call returned ", st.ToString()));
    if (pg.Barrier().code() != absl::StatusCode::kAborted)
      return Fail("call after Abort() was not ABORTED");
    return 0;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  const auto start = Clock::now();
  absl::Status st = pg.AllToAll(send.data(), recv.data(), bytes);
  const int64_t ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  WriteResult(a, st, ms);
  if (st.ok()) return Fail("collective with an aborted peer succeeded");
  return 0;
}

// Abort while this rank is in the middle of writing to a peer that stopped
// reading: rank 0 broadcasts a large buffer; the peers write
// "<dir>/entering.<rank>", enter the broadcast (posting their receive at
// once) and the test SIGSTOPs them a moment later, then writes
// "<dir>/stopped". Rank 0 calls Abort() from another thread 200 ms later;
// its pending call must end with ABORTED long before the timeout.
int RunAbortStopped(const Args& a, ProcessGroup& pg) {
  const size_t bytes = 128u << 20;
  std::vector<uint8_t> buf(bytes, 1);
  if (a.rank != 0) {
    std::ofstream(absl::StrCat(a.dir, "/entering.", a.rank)) << "1\n";
    absl::Status st = pg.Broadcast(buf.data(), bytes, 0);
    (void)st;  // the test kills this rank
    return 0;
  }
  std::thread aborter([&] {
    const std::string stopped = absl::StrCat(a.dir, "/stopped");
    for (int i = 0; i < 60000 && !std::ifstream(stopped); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    pg.Abort();
  });
  const auto start = Clock::now();
  absl::Status st = pg.Broadcast(buf.data(), bytes, 0);
  const int64_t ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  aborter.join();
  WriteResult(a, st, ms);
  if (st.code() != absl::StatusCode::kAborted)
    return Fail(absl::StrCat("aborted call returned ", st.ToString()));
  return 0;
}

int Main(int argc, char** argv) {
  Args a;
  FlagSet flags("comm_test_rank", "one rank of a multi-process comm test");
  flags.String("mode", &a.mode,
               "alltoall | collectives | ulysses | killed | killed_busy | stuck | "
               "abort | abort_stopped");
  flags.Int("rank", &a.rank, "this rank");
  flags.Int("world", &a.world, "number of ranks");
  flags.String("dir", &a.dir, "FileStore folder shared by the ranks");
  flags.Int("timeout_ms", &a.timeout_ms, "group timeout");
  flags.Int("victim_iters", &a.victim_iters,
            "killed/stuck: collectives before the victim stops");
  if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
  SetLogTag(absl::StrCat("rank", a.rank));

  auto store = MakeFileStore(a.dir);
  if (!store.ok()) return Fail(store.status().ToString());
  GlooOptions opts;
  opts.rank = a.rank;
  opts.size = a.world;
  opts.timeout = std::chrono::milliseconds(a.timeout_ms);
  opts.prefix = absl::StrCat("test-", a.mode);
  auto pg = MakeGlooProcessGroup(**store, opts);
  if (!pg.ok()) return Fail(pg.status().ToString());
  if ((*pg)->rank() != a.rank || (*pg)->size() != a.world ||
      (*pg)->memory() != MemoryKind::kHost || (*pg)->backend_name() != "gloo")
    return Fail("group reports the wrong rank/size/memory/backend");

  if (a.mode == "alltoall") return RunAllToAll(a, **pg);
  if (a.mode == "collectives") return RunCollectives(a, **pg);
  if (a.mode == "ulysses") return RunUlysses(a, **pg);
  if (a.mode == "killed") return RunPeerFailure(a, **pg, Victim::kSleeps);
  if (a.mode == "killed_busy") return RunPeerFailure(a, **pg, Victim::kBusy);
  if (a.mode == "stuck") return RunPeerFailure(a, **pg, Victim::kStuck);
  if (a.mode == "abort") return RunAbort(a, **pg);
  if (a.mode == "abort_stopped") return RunAbortStopped(a, **pg);
  return Fail(absl::StrCat("unknown --mode ", a.mode));
}

}  // namespace
}  // namespace dn::comm::testing

int main(int argc, char** argv) { return dn::comm::testing::Main(argc, argv); }
