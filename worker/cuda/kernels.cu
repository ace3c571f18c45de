// Kernels of the CUDA backend; see kernels.h for the contract of each.
#include "worker/cuda/kernels.h"

#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"
#include "worker/noise.h"

namespace dn::worker::cuda {
namespace {

// ---------------------------------------------------------------------------
// Element helpers
// ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ float ToFloat<bf16>(bf16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float ToFloat<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 FromFloat<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) { return __float2half_rn(v); }

// Loads N consecutive elements as floats. When N elements fill whole 16-byte
// words, `p` must be 16-byte aligned and the load is vectorized (LDG.128).
template <int N, typename T>
__device__ __forceinline__ void LoadF(const T* __restrict__ p, float (&out)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
    union Word {
      uint4 raw;
      T e[kPer];
    };
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      Word w;
      w.raw = reinterpret_cast<const uint4*>(p)[c];
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[c * kPer + i] = ToFloat(w.e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = ToFloat(p[i]);
  }
}

// Stores N floats rounded to T; vectorized as LoadF.
template <int N, typename T>
__device__ __forceinline__ void StoreF(T* __restrict__ p, const float (&in)[N]) {
  if constexpr ((N * sizeof(T)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
    union Word {
      uint4 raw;
      T e[kPer];
    };
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      Word w;
#pragma unroll
      for (int i = 0; i < kPer; ++i) w.e[i] = FromFloat<T>(in[c * kPer + i]);
      reinterpret_cast<uint4*>(p)[c] = w.raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = FromFloat<T>(in[i]);
  }
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. Safe to call repeatedly.
__device__ float BlockSum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  v = WarpSum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers of `total` are done
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    float t = lane < warps ? partial[lane] : 0.0f;
    t = WarpSum(t);
    if (lane == 0) total = t;
  }
  __syncthreads();
  return total;
}

bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Threads for a one-block-per-row kernel: one vector per thread if possible.
int RowThreads(int64_t dim, int vec) {
  const int64_t vectors = (dim + vec - 1) / vec;
  const int64_t t = (vectors + 31) / 32 * 32;
  return static_cast<int>(std::clamp<int64_t>(t, 32, 1024));
}

// Blocks for a grid-stride loop over n items with 256 threads.
unsigned GridFor(int64_t n, int threads = 256) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 1 << 16));
}

absl::Status CheckRows(const char* op, int64_t rows, int64_t dim) {
  if (dim <= 0 || dim > kMaxRowDim)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda ", op, ": row length D = ", dim,
                     " is outside [1, ", kMaxRowDim, "]"));
  if (rows < 0 || rows > std::numeric_limits<int32_t>::max())
    return absl::InvalidArgumentError(
        absl::StrCat("cuda ", op, ": ", rows, " rows is outside [0, 2^31)"));
  return absl::OkStatus();
}

#define DN_LAUNCH_CHECK() DN_CUDA_RETURN_IF_ERROR(cudaGetLastError())

// ---------------------------------------------------------------------------
// Row kernels: one block per row, the row cached in shared memory as fp32.
// Each thread visits the same vector indices in every pass, so the cache
// needs no barrier between passes (BlockSum has its own).
// ---------------------------------------------------------------------------

// Loads row into smem and returns (mean, rstd) of LayerNorm.
template <int kVec>
__device__ __forceinline__ float2 LoadRowMeanRstd(const bf16* __restrict__ xr,
                                                  float* row, int dim,
                                                  float eps) {
  float sum = 0.0f;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float v[kVec];
    LoadF<kVec>(xr + i, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      row[i + j] = v[j];
      sum += v[j];
    }
  }
  const float mean = BlockSum(sum) / static_cast<float>(dim);
  float sq = 0.0f;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float d = row[i + j] - mean;
      sq += d * d;
    }
  }
  const float var = BlockSum(sq) / static_cast<float>(dim);
  return make_float2(mean, rsqrtf(var + eps));
}

// Loads row into smem and returns 1 / sqrt(mean(x^2) + eps).
template <int kVec>
__device__ __forceinline__ float LoadRowRmsInv(const bf16* __restrict__ xr,
                                               float* row, int dim, float eps) {
  float sq = 0.0f;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float v[kVec];
    LoadF<kVec>(xr + i, v);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      row[i + j] = v[j];
      sq += v[j] * v[j];
    }
  }
  return rsqrtf(BlockSum(sq) / static_cast<float>(dim) + eps);
}

template <int kVec>
__global__ void LayerNormModulateKernel(const bf16* __restrict__ x,
                                        const float* __restrict__ mod,
                                        bf16* __restrict__ y, int64_t seq,
                                        int dim, int64_t mod_rows,
                                        int shift_index, int scale_index,
                                        float eps) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const int64_t b = r / seq;
  const float2 stats = LoadRowMeanRstd<kVec>(x + r * dim, row, dim, eps);
  const float* shift = mod + (b * mod_rows + shift_index) * dim;
  const float* scale = mod + (b * mod_rows + scale_index) * dim;
  bf16* yr = y + r * dim;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float sh[kVec], sc[kVec], out[kVec];
    LoadF<kVec>(shift + i, sh);
    LoadF<kVec>(scale + i, sc);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      out[j] = (row[i + j] - stats.x) * stats.y * (1.0f + sc[j]) + sh[j];
    StoreF<kVec>(yr + i, out);
  }
}

template <int kVec>
__global__ void LayerNormAffineKernel(const bf16* __restrict__ x,
                                      const float* __restrict__ weight,
                                      const float* __restrict__ bias,
                                      bf16* __restrict__ y, int dim,
                                      float eps) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const float2 stats = LoadRowMeanRstd<kVec>(x + r * dim, row, dim, eps);
  bf16* yr = y + r * dim;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float w[kVec], bb[kVec], out[kVec];
    LoadF<kVec>(weight + i, w);
    LoadF<kVec>(bias + i, bb);
#pragma unroll
    for (int j = 0; j < kVec; ++j)
      out[j] = (row[i + j] - stats.x) * stats.y * w[j] + bb[j];
    StoreF<kVec>(yr + i, out);
  }
}

template <int kVec>
__global__ void RmsNormKernel(const bf16* __restrict__ x,
                              const float* __restrict__ weight,
                              bf16* __restrict__ y, int dim, float eps) {
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const float inv = LoadRowRmsInv<kVec>(x + r * dim, row, dim, eps);
  bf16* yr = y + r * dim;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float w[kVec], out[kVec];
    LoadF<kVec>(weight + i, w);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = row[i + j] * inv * w[j];
    StoreF<kVec>(yr + i, out);
  }
}

// Channels [i, i + kVec) of a row already in shared memory (`row`, with
// 1/rms `inv`): scaled by `weight`, each (even, odd) pair rotated by its RoPE
// angle (`angles`: cos, sin per pair of the row's position).
template <int kVec>
__device__ __forceinline__ void NormRopeVec(const float* row, float inv,
                                            const float* weight,
                                            const float* angles,
                                            int i, int head_dim, float* out) {
  float w[kVec];
  LoadF<kVec>(weight + i, w);
#pragma unroll
  for (int j = 0; j < kVec; j += 2) {
    const float x0 = row[i + j] * inv * w[j];
    const float x1 = row[i + j + 1] * inv * w[j + 1];
    const int pair = ((i + j) % head_dim) / 2;
    const float c = angles[2 * pair];
    const float sn = angles[2 * pair + 1];
    out[j] = x0 * c - x1 * sn;
    out[j + 1] = x0 * sn + x1 * c;
  }
}

// kVec is even, so a vector holds whole (even, odd) pairs; head_dim is even,
// so a pair never straddles two heads.
template <int kVec>
__global__ void RmsNormRopeKernel(const bf16* __restrict__ x,
                                  const float* __restrict__ weight,
                                  const float* __restrict__ rope,
                                  bf16* __restrict__ y, int64_t seq, int dim,
                                  int head_dim, float eps) {
  static_assert(kVec % 2 == 0, "RoPE vectors hold whole pairs");
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const int64_t s = r % seq;
  const int half = head_dim / 2;
  const float inv = LoadRowRmsInv<kVec>(x + r * dim, row, dim, eps);
  const float* angles = rope + s * half * 2;
  bf16* yr = y + r * dim;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float out[kVec];
    NormRopeVec<kVec>(row, inv, weight, angles, i, head_dim, out);
    StoreF<kVec>(yr + i, out);
  }
}

// RmsNormRopeKernel's maths for q (blockIdx.y 0) and k (1), a plain copy for
// v (2), each stored straight into the destination-major send buffer
// [P, 3, rows, chunk] (chunk = dim / P channels per destination). kVec
// divides chunk, so a vector never straddles two destinations.
template <int kVec>
__global__ void RmsNormRopePackQkvKernel(
    const bf16* __restrict__ q, const bf16* __restrict__ k,
    const bf16* __restrict__ v, const float* __restrict__ q_weight,
    const float* __restrict__ k_weight, const float* __restrict__ rope,
    bf16* __restrict__ send, int64_t rows, int64_t seq, int dim, int head_dim,
    int chunk, float eps) {
  static_assert(kVec % 2 == 0, "RoPE vectors hold whole pairs");
  extern __shared__ float row[];
  const int64_t r = blockIdx.x;
  const int t = static_cast<int>(blockIdx.y);
  auto dst = [&](int i) {
    const int p = i / chunk;
    return send + ((static_cast<int64_t>(p) * 3 + t) * rows + r) * chunk +
           (i - p * chunk);
  };
  if (t == 2) {  // uniform per block: no barrier is skipped by part of it
    const bf16* vr = v + r * dim;
    for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
      float val[kVec];
      LoadF<kVec>(vr + i, val);
      StoreF<kVec>(dst(i), val);
    }
    return;
  }
  const bf16* x = (t == 0 ? q : k) + r * dim;
  const float* weight = t == 0 ? q_weight : k_weight;
  const int64_t s = r % seq;
  const int half = head_dim / 2;
  const float inv = LoadRowRmsInv<kVec>(x, row, dim, eps);
  const float* angles = rope + s * half * 2;
  for (int i = threadIdx.x * kVec; i < dim; i += blockDim.x * kVec) {
    float out[kVec];
    NormRopeVec<kVec>(row, inv, weight, angles, i, head_dim, out);
    StoreF<kVec>(dst(i), out);
  }
}

// ---------------------------------------------------------------------------
// Elementwise kernels (grid-stride over vectors of kVec elements).
// ---------------------------------------------------------------------------

template <int kVec>
__global__ void SiluKernel(const bf16* __restrict__ x, bf16* __restrict__ y,
                           int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    float in[kVec], out[kVec];
    LoadF<kVec>(x + v * kVec, in);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = in[j] / (1.0f + expf(-in[j]));
    StoreF<kVec>(y + v * kVec, out);
  }
}

template <int kVec>
__global__ void GeluTanhKernel(const bf16* x, bf16* y, int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    float in[kVec], out[kVec];
    LoadF<kVec>(x + v * kVec, in);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float u = 0.7978845608028654f * (in[j] + 0.044715f * in[j] * in[j] * in[j]);
      out[j] = 0.5f * in[j] * (1.0f + tanhf(u));
    }
    StoreF<kVec>(y + v * kVec, out);
  }
}

template <int kVec>
__global__ void GeluErfKernel(const bf16* x, bf16* y, int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    float in[kVec], out[kVec];
    LoadF<kVec>(x + v * kVec, in);
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = 0.5f * in[j] * (1.0f + erff(in[j] * 0.70710678f));
    StoreF<kVec>(y + v * kVec, out);
  }
}

template <int kVec>
__global__ void AddInPlaceKernel(bf16* __restrict__ x,
                                 const bf16* __restrict__ y, int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    float a[kVec], b[kVec];
    LoadF<kVec>(x + v * kVec, a);
    LoadF<kVec>(y + v * kVec, b);
#pragma unroll
    for (int j = 0; j < kVec; ++j) a[j] += b[j];
    StoreF<kVec>(x + v * kVec, a);
  }
}

// One block per (batch row, tile, chunk of kTileSumRows rows): the chunk's
// sum of |cur - prev| and |prev| in double, each thread over a fixed set of
// elements, then a fixed tree over the block, so the result depends only on
// the chunk's data. Rows at or past valid_rows add nothing.
constexpr int kTileSumRows = 16;
constexpr int kTileSumThreads = 256;

template <int kVec>
__global__ void TileAbsDiffSumsKernel(const bf16* __restrict__ cur,
                                      const bf16* __restrict__ prev,
                                      double* __restrict__ partials,
                                      int64_t seq, int64_t dim, int64_t tile,
                                      int64_t chunks_per_tile, int64_t tiles,
                                      int64_t valid_rows) {
  const int64_t blk = blockIdx.x;
  const int64_t c = blk % chunks_per_tile;
  const int64_t t = (blk / chunks_per_tile) % tiles;
  const int64_t b = blk / (chunks_per_tile * tiles);
  const int64_t row0 = t * tile + c * kTileSumRows;
  const int64_t row1 = min(min(row0 + kTileSumRows, (t + 1) * tile), valid_rows);
  double num = 0, den = 0;
  if (row1 > row0) {
    const int64_t base = (b * seq + row0) * dim;
    const int64_t vectors = (row1 - row0) * dim / kVec;
    for (int64_t v = threadIdx.x; v < vectors; v += kTileSumThreads) {
      float a[kVec], p[kVec];
      LoadF<kVec>(cur + base + v * kVec, a);
      LoadF<kVec>(prev + base + v * kVec, p);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        num += fabs(static_cast<double>(a[j]) - static_cast<double>(p[j]));
        den += fabs(static_cast<double>(p[j]));
      }
    }
  }
  __shared__ double s_num[kTileSumThreads], s_den[kTileSumThreads];
  s_num[threadIdx.x] = num;
  s_den[threadIdx.x] = den;
  __syncthreads();
  for (int half = kTileSumThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      s_num[threadIdx.x] += s_num[threadIdx.x + half];
      s_den[threadIdx.x] += s_den[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partials[2 * blk] = s_num[0];
    partials[2 * blk + 1] = s_den[0];
  }
}

// dim % kVec == 0, so a vector never straddles two rows.
template <int kVec>
__global__ void GatedResidualKernel(bf16* __restrict__ x,
                                    const bf16* __restrict__ y,
                                    const float* __restrict__ mod,
                                    int64_t batch_elems, int64_t dim,
                                    int64_t mod_rows, int gate_index,
                                    int64_t vectors) {
  for (int64_t v = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; v < vectors;
       v += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = v * kVec;
    const int64_t b = e / batch_elems;
    const int64_t j = e % dim;
    float a[kVec], d[kVec], g[kVec];
    LoadF<kVec>(x + e, a);
    LoadF<kVec>(y + e, d);
    LoadF<kVec>(mod + (b * mod_rows + gate_index) * dim + j, g);
#pragma unroll
    for (int i = 0; i < kVec; ++i) a[i] += d[i] * g[i];
    StoreF<kVec>(x + e, a);
  }
}

__global__ void AddModulationKernel(const float* __restrict__ table,
                                    const bf16* __restrict__ proj,
                                    float* __restrict__ out, int64_t rows,
                                    int64_t dim, bool broadcast, int64_t n) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t j = e % dim;
    const int64_t k = (e / dim) % rows;
    const int64_t b = e / (dim * rows);
    const float p = ToFloat(broadcast ? proj[b * dim + j] : proj[e]);
    out[e] = table[k * dim + j] + p;
  }
}

template <typename Src, typename Dst>
__global__ void ConvertKernel(const Src* __restrict__ src, Dst* __restrict__ dst,
                              int64_t n) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x)
    dst[e] = FromFloat<Dst>(ToFloat(src[e]));
}

template <typename Dst>
__global__ void FillNormalKernel(Dst* __restrict__ dst, int64_t n,
                                 uint64_t seed, uint64_t stream_id, float mean,
                                 float std) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const float z = NormalAt(seed, stream_id, static_cast<uint64_t>(e));
    // Explicit roundings: no fused multiply-add, the same as the host code.
    dst[e] = FromFloat<Dst>(__fadd_rn(mean, __fmul_rn(std, z)));
  }
}

// ---------------------------------------------------------------------------
// Ulysses relayouts: copies of rows of `row_bytes` bytes. The row map gives
// the source and destination of row r; rows are copied in units of VecT.
// ---------------------------------------------------------------------------

struct QkvPackMap {  // rows over [P,3,B,S]; send rows are contiguous
  const char* q;
  const char* k;
  const char* v;
  char* send;
  int64_t batch, shard, world, row_bytes;
  __device__ void operator()(int64_t r, const char** src, char** dst) const {
    const int64_t s = r % shard;
    const int64_t b = (r / shard) % batch;
    const int64_t t = (r / (shard * batch)) % 3;
    const int64_t p = r / (shard * batch * 3);
    const char* base = t == 0 ? q : (t == 1 ? k : v);
    *src = base + ((b * shard + s) * world + p) * row_bytes;
    *dst = send + r * row_bytes;
  }
};

struct QkvUnpackMap {  // rows over [P,3,B,S]; recv rows are contiguous
  const char* recv;
  char* q;
  char* k;
  char* v;
  int64_t batch, shard, world, row_bytes;
  __device__ void operator()(int64_t r, const char** src, char** dst) const {
    const int64_t s = r % shard;
    const int64_t b = (r / shard) % batch;
    const int64_t t = (r / (shard * batch)) % 3;
    const int64_t p = r / (shard * batch * 3);
    char* base = t == 0 ? q : (t == 1 ? k : v);
    *src = recv + r * row_bytes;
    *dst = base + (b * world * shard + p * shard + s) * row_bytes;
  }
};

struct OutPackMap {  // rows over [P,B,S]; send rows are contiguous
  const char* o;
  char* send;
  int64_t batch, shard, world, row_bytes;
  __device__ void operator()(int64_t r, const char** src, char** dst) const {
    const int64_t s = r % shard;
    const int64_t b = (r / shard) % batch;
    const int64_t p = r / (shard * batch);
    *src = o + (b * world * shard + p * shard + s) * row_bytes;
    *dst = send + r * row_bytes;
  }
};

struct OutUnpackMap {  // rows over [P,B,S]; recv rows are contiguous
  const char* recv;
  char* o;
  int64_t batch, shard, world, row_bytes;
  __device__ void operator()(int64_t r, const char** src, char** dst) const {
    const int64_t s = r % shard;
    const int64_t b = (r / shard) % batch;
    const int64_t p = r / (shard * batch);
    *src = recv + r * row_bytes;
    *dst = o + ((b * shard + s) * world + p) * row_bytes;
  }
};

template <typename VecT, typename Map>
__global__ void CopyRowsKernel(Map map, int64_t rows, int64_t row_vecs) {
  const int64_t total = rows * row_vecs;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = e / row_vecs;
    const int64_t c = e % row_vecs;
    const char* src;
    char* dst;
    map(r, &src, &dst);
    reinterpret_cast<VecT*>(dst)[c] = reinterpret_cast<const VecT*>(src)[c];
  }
}

template <typename Map>
absl::Status LaunchCopyRows(const Map& map, int64_t rows, int64_t row_bytes,
                            uintptr_t pointer_bits, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return absl::OkStatus();
  // The widest access every row start allows.
  const uintptr_t bits = pointer_bits | static_cast<uintptr_t>(row_bytes);
  const int width = (bits & 15u) == 0 ? 16
                    : (bits & 7u) == 0 ? 8
                    : (bits & 3u) == 0 ? 4
                    : (bits & 1u) == 0 ? 2
                                       : 1;
  const int64_t row_vecs = row_bytes / width;
  const unsigned grid = GridFor(rows * row_vecs);
  switch (width) {
    case 16: CopyRowsKernel<uint4><<<grid, 256, 0, stream>>>(map, rows, row_vecs); break;
    case 8: CopyRowsKernel<uint2><<<grid, 256, 0, stream>>>(map, rows, row_vecs); break;
    case 4: CopyRowsKernel<uint32_t><<<grid, 256, 0, stream>>>(map, rows, row_vecs); break;
    case 2: CopyRowsKernel<uint16_t><<<grid, 256, 0, stream>>>(map, rows, row_vecs); break;
    default: CopyRowsKernel<uint8_t><<<grid, 256, 0, stream>>>(map, rows, row_vecs); break;
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status CheckRelayout(const char* op, const RelayoutDims& d) {
  if (d.batch < 0 || d.shard < 0 || d.heads <= 0 || d.head_dim <= 0 ||
      d.world <= 0 || d.elem_size == 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda ", op, ": bad sizes B=", d.batch, " S=", d.shard, " H=", d.heads,
        " d=", d.head_dim, " P=", d.world, " elem=", d.elem_size));
  if (d.heads % d.world != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda ", op, ": heads ", d.heads,
                     " are not divisible by world ", d.world));
  return absl::OkStatus();
}

uintptr_t Bits(const void* p) { return reinterpret_cast<uintptr_t>(p); }

}  // namespace

// ---------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------

absl::Status InvokeLayerNormModulate(const bf16* x, const float* mod, bf16* y,
                                     int64_t batch, int64_t seq, int64_t dim,
                                     int64_t mod_rows, int shift_index,
                                     int scale_index, float eps,
                                     cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRows("LayerNormModulate", batch * seq, dim));
  if (shift_index < 0 || shift_index >= mod_rows || scale_index < 0 ||
      scale_index >= mod_rows)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda LayerNormModulate: shift_index ", shift_index, " / scale_index ",
        scale_index, " outside the ", mod_rows, " rows of mod"));
  const int64_t rows = batch * seq;
  if (rows == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(dim) * sizeof(float);
  const int d = static_cast<int>(dim);
  if (dim % 8 == 0 && Aligned16(x) && Aligned16(y) && Aligned16(mod)) {
    LayerNormModulateKernel<8><<<static_cast<unsigned>(rows), RowThreads(dim, 8), smem, stream>>>(
        x, mod, y, seq, d, mod_rows, shift_index, scale_index, eps);
  } else {
    LayerNormModulateKernel<1><<<static_cast<unsigned>(rows), RowThreads(dim, 1), smem, stream>>>(
        x, mod, y, seq, d, mod_rows, shift_index, scale_index, eps);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeLayerNormAffine(const bf16* x, const float* weight,
                                   const float* bias, bf16* y, int64_t rows,
                                   int64_t dim, float eps,
                                   cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRows("LayerNormAffine", rows, dim));
  if (rows == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(dim) * sizeof(float);
  const int d = static_cast<int>(dim);
  if (dim % 8 == 0 && Aligned16(x) && Aligned16(y) && Aligned16(weight) &&
      Aligned16(bias)) {
    LayerNormAffineKernel<8><<<static_cast<unsigned>(rows), RowThreads(dim, 8), smem, stream>>>(
        x, weight, bias, y, d, eps);
  } else {
    LayerNormAffineKernel<1><<<static_cast<unsigned>(rows), RowThreads(dim, 1), smem, stream>>>(
        x, weight, bias, y, d, eps);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeRmsNorm(const bf16* x, const float* weight, bf16* y,
                           int64_t rows, int64_t dim, float eps,
                           cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRows("RmsNorm", rows, dim));
  if (rows == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(dim) * sizeof(float);
  const int d = static_cast<int>(dim);
  if (dim % 8 == 0 && Aligned16(x) && Aligned16(y) && Aligned16(weight)) {
    RmsNormKernel<8><<<static_cast<unsigned>(rows), RowThreads(dim, 8), smem, stream>>>(
        x, weight, y, d, eps);
  } else {
    RmsNormKernel<1><<<static_cast<unsigned>(rows), RowThreads(dim, 1), smem, stream>>>(
        x, weight, y, d, eps);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeRmsNormRope(const bf16* x, const float* weight,
                               const float* rope, bf16* y, int64_t batch,
                               int64_t seq, int64_t dim, int64_t heads,
                               float eps, cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRows("RmsNormRope", batch * seq, dim));
  if (heads <= 0 || dim % heads != 0 || (dim / heads) % 2 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda RmsNormRope: heads ", heads, " must divide D ", dim,
                     " into even head dims"));
  const int64_t rows = batch * seq;
  if (rows == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(dim) * sizeof(float);
  const int d = static_cast<int>(dim);
  const int head_dim = static_cast<int>(dim / heads);
  if (dim % 8 == 0 && Aligned16(x) && Aligned16(y) && Aligned16(weight)) {
    RmsNormRopeKernel<8><<<static_cast<unsigned>(rows), RowThreads(dim, 8), smem, stream>>>(
        x, weight, rope, y, seq, d, head_dim, eps);
  } else {
    RmsNormRopeKernel<2><<<static_cast<unsigned>(rows), RowThreads(dim, 2), smem, stream>>>(
        x, weight, rope, y, seq, d, head_dim, eps);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeRmsNormRopePackQkv(const bf16* q, const bf16* k,
                                      const bf16* v, const float* q_weight,
                                      const float* k_weight, const float* rope,
                                      bf16* send, int64_t batch, int64_t seq,
                                      int64_t dim, int64_t heads, int64_t world,
                                      float eps, cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRows("RmsNormRopePackQkv", batch * seq, dim));
  if (heads <= 0 || dim % heads != 0 || (dim / heads) % 2 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda RmsNormRopePackQkv: heads ", heads,
                     " must divide D ", dim, " into even head dims"));
  if (world <= 0 || heads % world != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda RmsNormRopePackQkv: heads ", heads,
                     " are not divisible by world ", world));
  const int64_t rows = batch * seq;
  if (rows == 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(dim) * sizeof(float);
  const int d = static_cast<int>(dim);
  const int head_dim = static_cast<int>(dim / heads);
  const int chunk = static_cast<int>(dim / world);
  const dim3 grid(static_cast<unsigned>(rows), 3);
  if (dim % 8 == 0 && chunk % 8 == 0 && Aligned16(q) && Aligned16(k) &&
      Aligned16(v) && Aligned16(send) && Aligned16(q_weight) &&
      Aligned16(k_weight)) {
    RmsNormRopePackQkvKernel<8><<<grid, RowThreads(dim, 8), smem, stream>>>(
        q, k, v, q_weight, k_weight, rope, send, rows, seq, d, head_dim, chunk,
        eps);
  } else {
    RmsNormRopePackQkvKernel<2><<<grid, RowThreads(dim, 2), smem, stream>>>(
        q, k, v, q_weight, k_weight, rope, send, rows, seq, d, head_dim, chunk,
        eps);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeSilu(const bf16* x, bf16* y, int64_t n,
                        cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda Silu: negative size");
  if (n == 0) return absl::OkStatus();
  if (n % 8 == 0 && Aligned16(x) && Aligned16(y)) {
    SiluKernel<8><<<GridFor(n / 8), 256, 0, stream>>>(x, y, n / 8);
  } else {
    SiluKernel<1><<<GridFor(n), 256, 0, stream>>>(x, y, n);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeGeluTanh(const bf16* x, bf16* y, int64_t n,
                            cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda GeluTanh: negative size");
  if (n == 0) return absl::OkStatus();
  if (n % 8 == 0 && Aligned16(x) && Aligned16(y)) {
    GeluTanhKernel<8><<<GridFor(n / 8), 256, 0, stream>>>(x, y, n / 8);
  } else {
    GeluTanhKernel<1><<<GridFor(n), 256, 0, stream>>>(x, y, n);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeGeluErf(const bf16* x, bf16* y, int64_t n,
                           cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda GeluErf: negative size");
  if (n == 0) return absl::OkStatus();
  if (n % 8 == 0 && Aligned16(x) && Aligned16(y)) {
    GeluErfKernel<8><<<GridFor(n / 8), 256, 0, stream>>>(x, y, n / 8);
  } else {
    GeluErfKernel<1><<<GridFor(n), 256, 0, stream>>>(x, y, n);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeAddModulation(const float* table, const bf16* proj,
                                 float* out, int64_t batch, int64_t rows,
                                 int64_t dim, bool broadcast,
                                 cudaStream_t stream) {
  if (batch < 0 || rows <= 0 || dim <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda AddModulation: bad sizes B=", batch, " k=", rows,
                     " D=", dim));
  const int64_t n = batch * rows * dim;
  if (n == 0) return absl::OkStatus();
  AddModulationKernel<<<GridFor(n), 256, 0, stream>>>(table, proj, out, rows,
                                                      dim, broadcast, n);
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeGatedResidual(bf16* x, const bf16* y, const float* mod,
                                 int64_t batch, int64_t seq, int64_t dim,
                                 int64_t mod_rows, int gate_index,
                                 cudaStream_t stream) {
  if (batch < 0 || seq < 0 || dim <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda GatedResidual: bad sizes B=", batch, " S=", seq,
                     " D=", dim));
  if (gate_index < 0 || gate_index >= mod_rows)
    return absl::InvalidArgumentError(
        absl::StrCat("cuda GatedResidual: gate_index ", gate_index,
                     " outside the ", mod_rows, " rows of mod"));
  const int64_t n = batch * seq * dim;
  if (n == 0) return absl::OkStatus();
  const int64_t batch_elems = seq * dim;
  if (dim % 8 == 0 && Aligned16(x) && Aligned16(y) && Aligned16(mod)) {
    GatedResidualKernel<8><<<GridFor(n / 8), 256, 0, stream>>>(
        x, y, mod, batch_elems, dim, mod_rows, gate_index, n / 8);
  } else {
    GatedResidualKernel<1><<<GridFor(n), 256, 0, stream>>>(
        x, y, mod, batch_elems, dim, mod_rows, gate_index, n);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokeAddInPlace(bf16* x, const bf16* y, int64_t n,
                              cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda AddInPlace: negative size");
  if (n == 0) return absl::OkStatus();
  if (n % 8 == 0 && Aligned16(x) && Aligned16(y)) {
    AddInPlaceKernel<8><<<GridFor(n / 8), 256, 0, stream>>>(x, y, n / 8);
  } else {
    AddInPlaceKernel<1><<<GridFor(n), 256, 0, stream>>>(x, y, n);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

int64_t TileAbsDiffChunks(int64_t tile) {
  return (tile + kTileSumRows - 1) / kTileSumRows;
}

absl::Status InvokeTileAbsDiffSums(const bf16* cur, const bf16* prev,
                                   double* partials, int64_t batch, int64_t seq,
                                   int64_t dim, int64_t tile, int64_t valid_rows,
                                   cudaStream_t stream) {
  if (batch < 0 || seq < 0 || dim < 1 || tile < 1 || seq % tile != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda TileAbsDiffSums: bad shape B=", batch, " S=", seq, " D=", dim,
        " tile=", tile));
  const int64_t tiles = seq / tile, chunks = TileAbsDiffChunks(tile);
  const int64_t blocks = batch * tiles * chunks;
  if (blocks == 0) return absl::OkStatus();
  if (blocks > std::numeric_limits<int32_t>::max())
    return absl::InvalidArgumentError(
        absl::StrCat("cuda TileAbsDiffSums: ", blocks, " blocks is outside [0, 2^31)"));
  // A chunk starts at a row boundary, so 8-wide loads stay inside it when
  // D % 8 == 0 and the rows are 16-byte aligned.
  if (dim % 8 == 0 && Aligned16(cur) && Aligned16(prev)) {
    TileAbsDiffSumsKernel<8><<<static_cast<unsigned>(blocks), kTileSumThreads, 0, stream>>>(
        cur, prev, partials, seq, dim, tile, chunks, tiles, valid_rows);
  } else {
    TileAbsDiffSumsKernel<1><<<static_cast<unsigned>(blocks), kTileSumThreads, 0, stream>>>(
        cur, prev, partials, seq, dim, tile, chunks, tiles, valid_rows);
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status InvokePackQkv(const void* q, const void* k, const void* v,
                           void* send, const RelayoutDims& d,
                           cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRelayout("PackQkv", d));
  const int64_t row_bytes =
      d.heads / d.world * d.head_dim * static_cast<int64_t>(d.elem_size);
  const QkvPackMap map{static_cast<const char*>(q), static_cast<const char*>(k),
                       static_cast<const char*>(v), static_cast<char*>(send),
                       d.batch, d.shard, d.world, row_bytes};
  return LaunchCopyRows(map, d.world * 3 * d.batch * d.shard, row_bytes,
                        Bits(q) | Bits(k) | Bits(v) | Bits(send), stream);
}

absl::Status InvokeUnpackQkv(const void* recv, void* q, void* k, void* v,
                             const RelayoutDims& d, cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRelayout("UnpackQkv", d));
  const int64_t row_bytes =
      d.heads / d.world * d.head_dim * static_cast<int64_t>(d.elem_size);
  const QkvUnpackMap map{static_cast<const char*>(recv), static_cast<char*>(q),
                         static_cast<char*>(k), static_cast<char*>(v),
                         d.batch, d.shard, d.world, row_bytes};
  return LaunchCopyRows(map, d.world * 3 * d.batch * d.shard, row_bytes,
                        Bits(recv) | Bits(q) | Bits(k) | Bits(v), stream);
}

absl::Status InvokePackOut(const void* o, void* send, const RelayoutDims& d,
                           cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRelayout("PackOut", d));
  const int64_t row_bytes =
      d.heads / d.world * d.head_dim * static_cast<int64_t>(d.elem_size);
  const OutPackMap map{static_cast<const char*>(o), static_cast<char*>(send),
                       d.batch, d.shard, d.world, row_bytes};
  return LaunchCopyRows(map, d.world * d.batch * d.shard, row_bytes,
                        Bits(o) | Bits(send), stream);
}

absl::Status InvokeUnpackOut(const void* recv, void* o, const RelayoutDims& d,
                             cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckRelayout("UnpackOut", d));
  const int64_t row_bytes =
      d.heads / d.world * d.head_dim * static_cast<int64_t>(d.elem_size);
  const OutUnpackMap map{static_cast<const char*>(recv), static_cast<char*>(o),
                         d.batch, d.shard, d.world, row_bytes};
  return LaunchCopyRows(map, d.world * d.batch * d.shard, row_bytes,
                        Bits(recv) | Bits(o), stream);
}

namespace {
template <typename Src>
absl::Status LaunchConvertFrom(const Src* src, void* dst, DType dst_dtype,
                               int64_t n, cudaStream_t stream) {
  const unsigned grid = GridFor(n);
  switch (dst_dtype) {
    case DType::kF32:
      ConvertKernel<<<grid, 256, 0, stream>>>(src, static_cast<float*>(dst), n);
      break;
    case DType::kBF16:
      ConvertKernel<<<grid, 256, 0, stream>>>(src, static_cast<bf16*>(dst), n);
      break;
    case DType::kF16:
      ConvertKernel<<<grid, 256, 0, stream>>>(src, static_cast<__half*>(dst), n);
      break;
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}
}  // namespace

absl::Status InvokeConvert(const void* src, DType src_dtype, void* dst,
                           DType dst_dtype, int64_t n, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda Convert: negative size");
  if (n == 0) return absl::OkStatus();
  switch (src_dtype) {
    case DType::kF32:
      return LaunchConvertFrom(static_cast<const float*>(src), dst, dst_dtype, n, stream);
    case DType::kBF16:
      return LaunchConvertFrom(static_cast<const bf16*>(src), dst, dst_dtype, n, stream);
    case DType::kF16:
      return LaunchConvertFrom(static_cast<const __half*>(src), dst, dst_dtype, n, stream);
  }
  return absl::InvalidArgumentError("cuda Convert: unknown source dtype");
}

absl::Status InvokeFillNormal(void* dst, DType dst_dtype, int64_t n,
                              uint64_t seed, uint64_t stream_id, float mean,
                              float std, cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("cuda FillNormal: negative size");
  if (n == 0) return absl::OkStatus();
  const unsigned grid = GridFor(n);
  switch (dst_dtype) {
    case DType::kF32:
      FillNormalKernel<<<grid, 256, 0, stream>>>(static_cast<float*>(dst), n,
                                                 seed, stream_id, mean, std);
      break;
    case DType::kBF16:
      FillNormalKernel<<<grid, 256, 0, stream>>>(static_cast<bf16*>(dst), n,
                                                 seed, stream_id, mean, std);
      break;
    case DType::kF16:
      FillNormalKernel<<<grid, 256, 0, stream>>>(static_cast<__half*>(dst), n,
                                                 seed, stream_id, mean, std);
      break;
  }
  DN_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace dn::worker::cuda
