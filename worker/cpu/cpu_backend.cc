#include "worker/cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "comm/ulysses.h"
#include "worker/cpu/e4m3.h"
#include "worker/noise.h"

namespace dn::worker {

// A fixed pool of worker threads; Run(tasks, fn) runs fn(0..tasks-1) on the
// workers and the calling thread and returns when all are done.
class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i)
      threads_.emplace_back([this] { WorkerLoop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  int workers() const { return static_cast<int>(threads_.size()); }

  void Run(int tasks, const std::function<void(int)>& fn) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Workers still inside an earlier generation must leave it first.
      idle_cv_.wait(lock, [&] { return active_ == 0; });
      fn_ = &fn;
      tasks_ = tasks;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    cv_.notify_all();
    int finished = 0;
    for (int i; (i = next_.fetch_add(1)) < tasks;) {
      fn(i);
      ++finished;
    }
    std::unique_lock<std::mutex> lock(mu_);
    done_ += finished;
    idle_cv_.wait(lock, [&] { return done_ == tasks_ && active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void WorkerLoop() {
    uint64_t seen = 0;
    while (true) {
      const std::function<void(int)>* fn;
      int tasks;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        fn = fn_;
        tasks = tasks_;
        ++active_;
      }
      int finished = 0;
      if (fn != nullptr) {
        for (int i; (i = next_.fetch_add(1)) < tasks;) {
          (*fn)(i);
          ++finished;
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_ += finished;
        --active_;
      }
      idle_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  const std::function<void(int)>* fn_ = nullptr;
  int tasks_ = 0;
  std::atomic<int> next_{0};
  int done_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

namespace {

inline float GeluTanhScalar(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

// Mean and 1/sqrt(var + eps) of n floats, accumulated in double.
inline void MeanRstd(const float* x, int64_t n, double eps, double* mean,
                     double* rstd) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const double m = sum / static_cast<double>(n);
  double var = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double c = x[i] - m;
    var += c * c;
  }
  var /= static_cast<double>(n);
  *mean = m;
  *rstd = 1.0 / std::sqrt(var + eps);
}

inline double RmsInv(const float* x, int64_t n, double eps) {
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sq += static_cast<double>(x[i]) * x[i];
  return 1.0 / std::sqrt(sq / static_cast<double>(n) + eps);
}

class CpuMarker : public Marker {
 public:
  explicit CpuMarker(std::chrono::steady_clock::time_point t) : time(t) {}
  std::chrono::steady_clock::time_point time;
};

class CpuGraph : public Graph {
 public:
  explicit CpuGraph(std::function<absl::Status()> body)
      : body_(std::move(body)) {}
  absl::Status Replay() override { return body_(); }

 private:
  std::function<absl::Status()> body_;
};

// Layout of a Ulysses relayout from a sequence-sharded [B,S,H,d] tensor.
// The Ulysses layout of a sequence-sharded [B, S, H, d] f32 tensor (its
// shape already checked by the op contract).
comm::UlyssesLayout LayoutOf(const Tensor& seq_sharded, int world) {
  comm::UlyssesLayout l;
  l.batch = seq_sharded.dim(0);
  l.world = world;
  l.seq_total = seq_sharded.dim(1) * world;  // shard() == S
  l.heads = static_cast<int>(seq_sharded.dim(2));
  l.head_dim = static_cast<int>(seq_sharded.dim(3));
  l.elem_size = 4;
  return l;
}

// The same for a head-sharded [B, P*S, h, d] tensor: that of [B, S, h*P, d].
comm::UlyssesLayout HeadShardedLayoutOf(const Tensor& head_sharded, int world) {
  return LayoutOf(head_sharded.View({head_sharded.dim(0), head_sharded.dim(1) / world,
                                     head_sharded.dim(2) * world, head_sharded.dim(3)}),
                  world);
}

}  // namespace

CpuBackend::CpuBackend(int threads)
    : threads_(threads > 0 ? threads
                           : std::max(1u, std::thread::hardware_concurrency())),
      memory_(std::make_shared<MemoryCounter>()) {
  // Each GEMM call is single-threaded; the pool runs row tiles in parallel.
  openblas_set_num_threads(1);
  pool_ = std::make_unique<ThreadPool>(threads_ - 1);
}

CpuBackend::~CpuBackend() = default;

std::string CpuBackend::device_description() const {
  return absl::StrCat("CPU (fp32, ", threads_, " threads, OpenBLAS)");
}

void CpuBackend::ParallelFor(int64_t n, int64_t cost_per_item,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  constexpr int64_t kMinWorkPerTask = 1 << 15;
  const int64_t total = n * std::max<int64_t>(1, cost_per_item);
  int64_t tasks = std::min<int64_t>(
      {n, static_cast<int64_t>(threads_) * 4, total / kMinWorkPerTask});
  if (tasks <= 1 || pool_->workers() == 0) {
    fn(0, n);
    return;
  }
  const int64_t chunk = (n + tasks - 1) / tasks;
  tasks = (n + chunk - 1) / chunk;
  pool_->Run(static_cast<int>(tasks), [&](int t) {
    const int64_t begin = t * chunk;
    fn(begin, std::min(n, begin + chunk));
  });
}

// --- memory ------------------------------------------------------------------

absl::StatusOr<Tensor> CpuBackend::Empty(const Shape& shape, DType dtype) {
  for (int64_t d : shape)
    if (d < 0)
      return absl::InvalidArgumentError(
          absl::StrCat("cpu Empty: negative dimension in ", ShapeString(shape)));
  const size_t bytes =
      static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  const size_t rounded = std::max<size_t>(64, ((bytes + 63) / 64) * 64);
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr)
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu Empty: cannot allocate ", bytes, " bytes for ",
                     ShapeString(shape)));
  std::memset(p, 0, rounded);
  const int64_t now = memory_->current.fetch_add(static_cast<int64_t>(rounded)) +
                      static_cast<int64_t>(rounded);
  int64_t peak = memory_->peak.load();
  while (now > peak && !memory_->peak.compare_exchange_weak(peak, now)) {
  }
  std::shared_ptr<MemoryCounter> counter = memory_;
  std::shared_ptr<void> storage(p, [counter, rounded](void* q) {
    std::free(q);
    counter->current.fetch_sub(static_cast<int64_t>(rounded));
  });
  return Tensor(std::move(storage), 0, Device::kCpu, dtype, shape);
}

int64_t CpuBackend::peak_memory_bytes() const { return memory_->peak.load(); }

absl::Status CpuBackend::CopyFromHost(const float* src, Tensor* dst) {
  DN_RETURN_IF_ERROR(contract_.Resident(*dst, "CopyFromHost", "dst"));
  const int64_t n = dst->numel();
  switch (dst->dtype()) {
    case DType::kF32:
      if (n > 0) std::memcpy(dst->data(), src, static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16: {
      uint16_t* d = dst->data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToBF16(src[i]);
      break;
    }
    case DType::kF16: {
      uint16_t* d = dst->data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
      break;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyToHost(const Tensor& src, float* dst) {
  DN_RETURN_IF_ERROR(contract_.Resident(src, "CopyToHost", "src"));
  const int64_t n = src.numel();
  switch (src.dtype()) {
    case DType::kF32:
      if (n > 0) std::memcpy(dst, src.data(), static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16: {
      const uint16_t* s = src.data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = BF16ToF32(s[i]);
      break;
    }
    case DType::kF16: {
      const uint16_t* s = src.data_as<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      break;
    }
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::Copy(const Tensor& src, Tensor* dst) {
  DN_RETURN_IF_ERROR(contract_.Copy(src, *dst));
  if (src.dtype() == dst->dtype()) {
    if (src.nbytes() > 0) std::memmove(dst->data(), src.data(), src.nbytes());
    return absl::OkStatus();
  }
  if (src.dtype() == DType::kF32)
    return CopyFromHost(src.data_as<float>(), dst);
  if (dst->dtype() == DType::kF32) return CopyToHost(src, dst->data_as<float>());
  std::vector<float> tmp(static_cast<size_t>(src.numel()));
  DN_RETURN_IF_ERROR(CopyToHost(src, tmp.data()));
  return CopyFromHost(tmp.data(), dst);
}

absl::Status CpuBackend::FillNormal(Tensor* dst, uint64_t seed,
                                    uint64_t stream, float mean, float std) {
  DN_RETURN_IF_ERROR(contract_.Resident(*dst, "FillNormal", "dst"));
  const int64_t n = dst->numel();
  const DType dtype = dst->dtype();
  void* data = dst->data();
  ParallelFor(n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v =
          mean + std * NormalAt(seed, stream, static_cast<uint64_t>(i));
      switch (dtype) {
        case DType::kF32: static_cast<float*>(data)[i] = v; break;
        case DType::kBF16: static_cast<uint16_t*>(data)[i] = F32ToBF16(v); break;
        case DType::kF16: static_cast<uint16_t*>(data)[i] = F32ToF16(v); break;
      }
    }
  });
  return absl::OkStatus();
}

// --- dense ops -----------------------------------------------------------------

absl::Status CpuBackend::Linear(const Tensor& x, const Tensor& w,
                                const Tensor* bias, Activation act,
                                Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.Linear(x, w, bias, *y));
  const int64_t n = w.dim(0), k = w.dim(1);
  const int64_t m = k > 0 ? x.numel() / k : 0;
  if (m == 0 || n == 0) return absl::OkStatus();
  float* out = y->data_as<float>();
  if (k == 0) {
    std::memset(out, 0, static_cast<size_t>(m * n) * 4);
  } else {
    // Row tiles of kRowTile rows from row 0 (docs/ENGINE.md, rank invariance).
    const float* xp = x.data_as<float>();
    const float* wp = w.data_as<float>();
    const int64_t tiles = (m + kRowTile - 1) / kRowTile;
    auto tile = [&](int64_t t) {
      const int64_t r0 = t * kRowTile, rows = std::min(kRowTile, m - r0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                  static_cast<int>(n), static_cast<int>(k), 1.0f, xp + r0 * k,
                  static_cast<int>(k), wp, static_cast<int>(k), 0.0f,
                  out + r0 * n, static_cast<int>(n));
    };
    if (tiles == 1 || pool_->workers() == 0) {
      for (int64_t t = 0; t < tiles; ++t) tile(t);
    } else {
      pool_->Run(static_cast<int>(tiles), [&](int t) { tile(t); });
    }
  }
  if (bias == nullptr && act == Activation::kNone) return absl::OkStatus();
  const float* b = bias != nullptr ? bias->data_as<float>() : nullptr;
  ParallelFor(m, n * (act == Activation::kNone ? 1 : 16),
              [&](int64_t begin, int64_t end) {
                for (int64_t r = begin; r < end; ++r) {
                  float* row = out + r * n;
                  if (b != nullptr)
                    for (int64_t j = 0; j < n; ++j) row[j] += b[j];
                  if (act == Activation::kGeluTanh)
                    for (int64_t j = 0; j < n; ++j) row[j] = GeluTanhScalar(row[j]);
                }
              });
  return absl::OkStatus();
}

absl::Status CpuBackend::GeluTanh(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.GeluTanh(x, *y));
  const float* in = x.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(x.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = GeluTanhScalar(in[i]);
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::GeluErf(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.GeluErf(x, *y));
  const float* in = x.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(x.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double v = in[i];
      out[i] = static_cast<float>(0.5 * v * (1.0 + std::erf(v * 0.70710678118654752440)));
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::Silu(const Tensor& x, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.Silu(x, *y));
  const float* in = x.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(x.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = in[i] / (1.0f + std::exp(-in[i]));
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::AddModulation(const Tensor& table, const Tensor& proj,
                                       Tensor* out) {
  DN_RETURN_IF_ERROR(contract_.AddModulation(table, proj, *out));
  const int64_t b = out->dim(0), k = out->dim(1), d = out->dim(2);
  const bool broadcast = proj.numel() == b * d && k != 1;
  const float* t = table.data_as<float>();
  const float* p = proj.data_as<float>();
  float* o = out->data_as<float>();
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t ki = 0; ki < k; ++ki)
      for (int64_t j = 0; j < d; ++j) {
        const float pv = broadcast ? p[bi * d + j] : p[(bi * k + ki) * d + j];
        o[(bi * k + ki) * d + j] = t[ki * d + j] + pv;
      }
  return absl::OkStatus();
}

absl::Status CpuBackend::LayerNormModulate(const Tensor& x, const Tensor& mod,
                                           int shift_index, int scale_index,
                                           float eps, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.LayerNormModulate(x, mod, shift_index, scale_index, *y));
  const int64_t b = x.dim(0), s = x.dim(1), d = x.dim(2), k = mod.dim(1);
  const float* in = x.data_as<float>();
  const float* m = mod.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(b * s, d * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bi = r / s;
      const float* row = in + r * d;
      const float* shift = m + (bi * k + shift_index) * d;
      const float* scale = m + (bi * k + scale_index) * d;
      double mean, rstd;
      MeanRstd(row, d, eps, &mean, &rstd);
      float* o = out + r * d;
      for (int64_t j = 0; j < d; ++j) {
        const float norm = static_cast<float>((row[j] - mean) * rstd);
        o[j] = norm * (1.0f + scale[j]) + shift[j];
      }
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::LayerNormAffine(const Tensor& x, const Tensor& weight,
                                         const Tensor& bias, float eps,
                                         Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.LayerNormAffine(x, weight, bias, *y));
  const int64_t d = x.shape().back();
  const float* in = x.data_as<float>();
  const float* g = weight.data_as<float>();
  const float* bb = bias.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(d ? x.numel() / d : 0, d * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * d;
      double mean, rstd;
      MeanRstd(row, d, eps, &mean, &rstd);
      float* o = out + r * d;
      for (int64_t j = 0; j < d; ++j)
        o[j] = static_cast<float>((row[j] - mean) * rstd) * g[j] + bb[j];
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const Tensor& x, const Tensor& weight,
                                 float eps, Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.RmsNorm(x, weight, *y));
  const int64_t d = x.shape().back();
  const float* in = x.data_as<float>();
  const float* g = weight.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(d ? x.numel() / d : 0, d * 2, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * d;
      const double inv = RmsInv(row, d, eps);
      float* o = out + r * d;
      for (int64_t j = 0; j < d; ++j)
        o[j] = static_cast<float>(row[j] * inv) * g[j];
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNormRope(const Tensor& x, const Tensor& weight,
                                     const Tensor& rope, int heads, float eps,
                                     Tensor* y) {
  DN_RETURN_IF_ERROR(contract_.RmsNormRope(x, weight, rope, heads, *y));
  const int64_t b = x.dim(0), s = x.dim(1), d_model = x.dim(2);
  const int64_t hd = d_model / heads, pairs = hd / 2;
  const float* in = x.data_as<float>();
  const float* g = weight.data_as<float>();
  const float* cs = rope.data_as<float>();
  float* out = y->data_as<float>();
  ParallelFor(b * s, d_model * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t si = r % s;
      const float* row = in + r * d_model;
      const double inv = RmsInv(row, d_model, eps);
      float* o = out + r * d_model;
      const float* angle = cs + si * pairs * 2;
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t base = h * hd;
        for (int64_t p = 0; p < pairs; ++p) {
          const int64_t c0 = base + 2 * p, c1 = c0 + 1;
          const float x0 = static_cast<float>(row[c0] * inv) * g[c0];
          const float x1 = static_cast<float>(row[c1] * inv) * g[c1];
          const float cosv = angle[2 * p], sinv = angle[2 * p + 1];
          o[c0] = x0 * cosv - x1 * sinv;
          o[c1] = x0 * sinv + x1 * cosv;
        }
      }
    }
  });
  return absl::OkStatus();
}

// The reference semantics, literally: the two RmsNormRope calls into host
// temporaries, then PackQkv.
absl::Status CpuBackend::RmsNormRopePackQkv(const Tensor& q, const Tensor& k,
                                            const Tensor& v,
                                            const Tensor& q_weight,
                                            const Tensor& k_weight,
                                            const Tensor& rope, int heads,
                                            float eps, int world,
                                            Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.RmsNormRopePackQkv(q, k, v, q_weight, k_weight, rope,
                                                 heads, world, *send));
  const int64_t d_model = q.dim(2);
  Tensor qr = Tensor::Host(q.shape());
  Tensor kr = Tensor::Host(q.shape());
  DN_RETURN_IF_ERROR(RmsNormRope(q, q_weight, rope, heads, eps, &qr));
  DN_RETURN_IF_ERROR(RmsNormRope(k, k_weight, rope, heads, eps, &kr));
  const Shape seq4 = {q.dim(0), q.dim(1), heads, d_model / heads};
  return PackQkv(qr.View(seq4), kr.View(seq4), v.View(seq4), world, send);
}

absl::Status CpuBackend::Attention(const Tensor& q, const Tensor& k,
                                   const Tensor& v, int64_t kv_len,
                                   float scale, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.Attention(q, k, v, kv_len, *o));
  const int64_t b = q.dim(0), sq = q.dim(1), h = q.dim(2), d = q.dim(3);
  const int64_t skv = k.dim(1);
  if (sq == 0 || b == 0 || h == 0) return absl::OkStatus();
  // Query rows in tiles of kRowTile from row 0 (row index = global token
  // position for self-attention; a multiple-of-tile shard start for
  // cross-attention), one (batch, head) per task, each task single-threaded
  // with its own score block.
  const int ld = static_cast<int>(h * d);
  const int64_t rows = kRowTile;
  auto task = [&](int64_t bh) {
    const int64_t bi = bh / h, hi = bh % h;
    thread_local std::vector<float> block;
    if (static_cast<int64_t>(block.size()) < rows * kv_len)
      block.resize(static_cast<size_t>(rows * kv_len));
    float* scores = block.data();
    const float* kp = k.data_as<float>() + (bi * skv * h + hi) * d;
    const float* vp = v.data_as<float>() + (bi * skv * h + hi) * d;
    for (int64_t r0 = 0; r0 < sq; r0 += rows) {
      const int64_t m = std::min(rows, sq - r0);
      const float* qp = q.data_as<float>() + ((bi * sq + r0) * h + hi) * d;
      float* op = o->data_as<float>() + ((bi * sq + r0) * h + hi) * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(kv_len), static_cast<int>(d), scale, qp, ld,
                  kp, ld, 0.0f, scores, static_cast<int>(kv_len));
      for (int64_t r = 0; r < m; ++r) {
        float* row = scores + r * kv_len;
        float mx = row[0];
        for (int64_t j = 1; j < kv_len; ++j) mx = std::max(mx, row[j]);
        double sum = 0.0;
        for (int64_t j = 0; j < kv_len; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j < kv_len; ++j) row[j] *= inv;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m),
                  static_cast<int>(d), static_cast<int>(kv_len), 1.0f, scores,
                  static_cast<int>(kv_len), vp, ld, 0.0f, op, ld);
    }
  };
  const int64_t tasks = b * h;
  if (tasks == 1 || pool_->workers() == 0) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    pool_->Run(static_cast<int>(tasks), [&](int t) { task(t); });
  }
  return absl::OkStatus();
}

namespace {

// Largest |x| over the first `rows` token rows of each batch item of a
// [B, S, H, d] tensor (the rows attention reads).
float AmaxRows(const float* x, int64_t b, int64_t s, int64_t rows,
               int64_t row_len) {
  float amax = 0.0f;
  for (int64_t bi = 0; bi < b; ++bi) {
    const float* p = x + bi * s * row_len;
    for (int64_t i = 0; i < rows * row_len; ++i)
      amax = std::max(amax, std::fabs(p[i]));
  }
  return amax;
}

// dst = RoundE4m3(src * scale) over the same rows (other rows are zero).
void QuantizeRows(const float* src, int64_t b, int64_t s, int64_t rows,
                  int64_t row_len, float scale, float* dst) {
  for (int64_t bi = 0; bi < b; ++bi) {
    const float* p = src + bi * s * row_len;
    float* q = dst + bi * s * row_len;
    for (int64_t i = 0; i < rows * row_len; ++i) q[i] = RoundE4m3(p[i] * scale);
  }
}

}  // namespace

absl::Status CpuBackend::AttentionFp8(const Tensor& q, const Tensor& k,
                                      const Tensor& v, int64_t kv_len,
                                      float scale, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.Attention(q, k, v, kv_len, *o));
  const int64_t b = q.dim(0), sq = q.dim(1), h = q.dim(2), d = q.dim(3);
  const int64_t skv = k.dim(1);
  if (sq == 0 || b == 0 || h == 0) return absl::OkStatus();
  const int64_t ld = h * d;
  // Per-tensor scales from the data (docs/CUDA.md, "fp8 attention": cuDNN's
  // fp8 SDPA takes one descale per tensor, so the CUDA path does the same).
  const float scale_q = E4m3ScaleForAmax(AmaxRows(q.data_as<float>(), b, sq, sq, ld));
  const float scale_k =
      E4m3ScaleForAmax(AmaxRows(k.data_as<float>(), b, skv, kv_len, ld));
  const float scale_v =
      E4m3ScaleForAmax(AmaxRows(v.data_as<float>(), b, skv, kv_len, ld));
  std::vector<float> q8(static_cast<size_t>(q.numel()));
  std::vector<float> k8(static_cast<size_t>(k.numel()), 0.0f);
  std::vector<float> v8(static_cast<size_t>(v.numel()), 0.0f);
  QuantizeRows(q.data_as<float>(), b, sq, sq, ld, scale_q, q8.data());
  QuantizeRows(k.data_as<float>(), b, skv, kv_len, ld, scale_k, k8.data());
  QuantizeRows(v.data_as<float>(), b, skv, kv_len, ld, scale_v, v8.data());
  // S = (q8 k8^T) * descale_q * descale_k * scale, in fp32.
  const float s_alpha = scale * (1.0f / scale_q) * (1.0f / scale_k);
  // P: exp(S - rowmax) in (0, 1] (a flash kernel's unnormalized tile, whose
  // row maximum is 1), quantized with the fixed scale 448 (descale 1/448);
  // the row sum comes from the unquantized fp32 values.
  const float scale_p = kE4m3Max;
  const float o_alpha = (1.0f / scale_p) * (1.0f / scale_v);
  const int64_t rows = kRowTile;
  auto task = [&](int64_t bh) {
    const int64_t bi = bh / h, hi = bh % h;
    thread_local std::vector<float> block;
    thread_local std::vector<double> sums;
    if (static_cast<int64_t>(block.size()) < rows * kv_len)
      block.resize(static_cast<size_t>(rows * kv_len));
    if (static_cast<int64_t>(sums.size()) < rows) sums.resize(rows);
    float* scores = block.data();
    const float* kp = k8.data() + (bi * skv * h + hi) * d;
    const float* vp = v8.data() + (bi * skv * h + hi) * d;
    for (int64_t r0 = 0; r0 < sq; r0 += rows) {
      const int64_t m = std::min(rows, sq - r0);
      const float* qp = q8.data() + ((bi * sq + r0) * h + hi) * d;
      float* op = o->data_as<float>() + ((bi * sq + r0) * h + hi) * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(kv_len), static_cast<int>(d), s_alpha, qp,
                  static_cast<int>(ld), kp, static_cast<int>(ld), 0.0f, scores,
                  static_cast<int>(kv_len));
      for (int64_t r = 0; r < m; ++r) {
        float* row = scores + r * kv_len;
        float mx = row[0];
        for (int64_t j = 1; j < kv_len; ++j) mx = std::max(mx, row[j]);
        double sum = 0.0;
        for (int64_t j = 0; j < kv_len; ++j) {
          const float e = std::exp(row[j] - mx);
          sum += e;
          row[j] = RoundE4m3(e * scale_p);
        }
        sums[r] = sum;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(m),
                  static_cast<int>(d), static_cast<int>(kv_len), o_alpha, scores,
                  static_cast<int>(kv_len), vp, static_cast<int>(ld), 0.0f, op,
                  static_cast<int>(ld));
      for (int64_t r = 0; r < m; ++r) {
        const float inv = static_cast<float>(1.0 / sums[r]);
        for (int64_t c = 0; c < d; ++c) op[r * ld + c] *= inv;
      }
    }
  };
  const int64_t tasks = b * h;
  if (tasks == 1 || pool_->workers() == 0) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
  } else {
    pool_->Run(static_cast<int>(tasks), [&](int t) { task(t); });
  }
  return absl::OkStatus();
}

absl::Status CpuBackend::GatedResidual(Tensor* x, const Tensor& y,
                                       const Tensor& mod, int gate_index) {
  DN_RETURN_IF_ERROR(contract_.GatedResidual(*x, y, mod, gate_index));
  const int64_t b = x->dim(0), s = x->dim(1), d = x->dim(2), k = mod.dim(1);
  float* xp = x->data_as<float>();
  const float* yp = y.data_as<float>();
  const float* m = mod.data_as<float>();
  ParallelFor(b * s, d, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = m + ((r / s) * k + gate_index) * d;
      float* xr = xp + r * d;
      const float* yr = yp + r * d;
      for (int64_t j = 0; j < d; ++j) xr[j] += yr[j] * gate[j];
    }
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::AddInPlace(Tensor* x, const Tensor& y) {
  DN_RETURN_IF_ERROR(contract_.AddInPlace(*x, y));
  float* xp = x->data_as<float>();
  const float* yp = y.data_as<float>();
  ParallelFor(x->numel(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) xp[i] += yp[i];
  });
  return absl::OkStatus();
}

absl::Status CpuBackend::TileAbsDiffSums(const Tensor& cur, const Tensor& prev,
                                         int64_t tile, int64_t valid_rows,
                                         double* sums) {
  DN_RETURN_IF_ERROR(contract_.TileAbsDiffSums(cur, prev, tile, valid_rows));
  const int64_t batch = cur.dim(0), s = cur.dim(1), d = cur.dim(2);
  const int64_t tiles = s / tile;
  const float* c = cur.data_as<float>();
  const float* p = prev.data_as<float>();
  // One task per (batch row, tile); inside a tile, rows then channels in
  // order: the sums do not depend on the thread count.
  ParallelFor(batch * tiles, tile * d, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / tiles, t = bt % tiles;
      double num = 0, den = 0;
      const int64_t row_end = std::min((t + 1) * tile, valid_rows);
      for (int64_t row = t * tile; row < row_end; ++row) {
        const size_t off = static_cast<size_t>((b * s + row) * d);
        for (int64_t k = 0; k < d; ++k) {
          num += std::fabs(static_cast<double>(c[off + k]) - static_cast<double>(p[off + k]));
          den += std::fabs(static_cast<double>(p[off + k]));
        }
      }
      sums[2 * bt] = num;
      sums[2 * bt + 1] = den;
    }
  });
  return absl::OkStatus();
}

// --- Ulysses relayouts ----------------------------------------------------------

absl::Status CpuBackend::PackQkv(const Tensor& q, const Tensor& k,
                                 const Tensor& v, int world, Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.PackQkv(q, k, v, world, *send));
  comm::PackQkvHost(LayoutOf(q, world), q.data(), k.data(), v.data(), send->data());
  return absl::OkStatus();
}

absl::Status CpuBackend::UnpackQkv(const Tensor& recv, int world, Tensor* q,
                                   Tensor* k, Tensor* v) {
  DN_RETURN_IF_ERROR(contract_.UnpackQkv(recv, world, *q, *k, *v));
  comm::UnpackQkvHost(HeadShardedLayoutOf(*q, world), recv.data(), q->data(), k->data(),
                      v->data());
  return absl::OkStatus();
}

absl::Status CpuBackend::PackOut(const Tensor& o, int world, Tensor* send) {
  DN_RETURN_IF_ERROR(contract_.PackOut(o, world, *send));
  comm::PackOutHost(HeadShardedLayoutOf(o, world), o.data(), send->data());
  return absl::OkStatus();
}

absl::Status CpuBackend::UnpackOut(const Tensor& recv, int world, Tensor* o) {
  DN_RETURN_IF_ERROR(contract_.UnpackOut(recv, world, *o));
  comm::UnpackOutHost(LayoutOf(*o, world), recv.data(), o->data());
  return absl::OkStatus();
}

// --- timing and graphs ----------------------------------------------------------

absl::StatusOr<std::unique_ptr<Marker>> CpuBackend::Mark() {
  return std::unique_ptr<Marker>(
      std::make_unique<CpuMarker>(std::chrono::steady_clock::now()));
}

absl::StatusOr<double> CpuBackend::ElapsedSeconds(const Marker& a,
                                                  const Marker& b) {
  const auto* ma = dynamic_cast<const CpuMarker*>(&a);
  const auto* mb = dynamic_cast<const CpuMarker*>(&b);
  if (ma == nullptr || mb == nullptr)
    return absl::InvalidArgumentError(
        "cpu ElapsedSeconds: markers do not come from a CPU backend");
  return std::chrono::duration<double>(mb->time - ma->time).count();
}

absl::StatusOr<std::unique_ptr<Graph>> CpuBackend::Capture(
    const std::function<absl::Status()>& body) {
  DN_RETURN_IF_ERROR(body());
  return std::unique_ptr<Graph>(std::make_unique<CpuGraph>(body));
}

}  // namespace dn::worker
