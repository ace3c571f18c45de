// Kernels of the fp8 attention; see fp8_kernels.h.
#include "worker/cuda/fp8_kernels.h"

#include <cuda_fp8.h>

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "base/cuda_check.h"
#include "base/status_macros.h"

namespace dn::worker::cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kE4m3MaxDevice = 448.0f;

// Blocks per (batch item, tensor) for `n` units of work (grid-stride beyond).
unsigned BlocksFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 1024));
}

bool Aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// The same rule as worker/cpu/e4m3.h's E4m3ScaleForAmax (IEEE division: the
// build does not use fast math).
__device__ float ScaleForAmax(float amax) {
  if (!(amax > 0.0f) || !isfinite(amax)) return 1.0f;
  const float scale = kE4m3MaxDevice / amax;
  return isfinite(scale) ? scale : 1.0f;
}

__device__ __forceinline__ uint8_t ToE4m3(float x) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
}

// Non-negative floats order like their bit patterns as unsigned ints.
__device__ __forceinline__ void AtomicMaxNonNegative(float* slot, float v) {
  atomicMax(reinterpret_cast<unsigned int*>(slot), __float_as_uint(v));
}

__device__ __forceinline__ float& SlotRef(float* slots, int s) {
  return slots[s * Fp8Slots::kStride];
}

// Kernel arguments for the three tensors (by value).
struct QkvArgs {
  const __nv_bfloat16* x[3];
  int64_t batch_stride[3];
  int64_t elems[3];
  uint8_t* out[3];
};

// grid: (blocks, batch, 3 tensors).
template <bool kVec>
__global__ void AmaxKernel(QkvArgs a, float* __restrict__ slots) {
  const int t = blockIdx.z;
  const __nv_bfloat16* base = a.x[t] + blockIdx.y * a.batch_stride[t];
  const int64_t elems = a.elems[t];
  float m = 0.0f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if constexpr (kVec) {
    for (int64_t i = first; i < elems / 8; i += step) {
      union { uint4 raw; __nv_bfloat16 e[8]; } w;
      w.raw = reinterpret_cast<const uint4*>(base)[i];
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(__bfloat162float(w.e[j])));
    }
  } else {
    for (int64_t i = first; i < elems; i += step)
      m = fmaxf(m, fabsf(__bfloat162float(base[i])));
  }
  // Warp, then block reduction (fmaxf drops NaN).
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  __shared__ float warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) b = fmaxf(b, warp_max[w]);
    if (b > 0.0f) AtomicMaxNonNegative(&SlotRef(slots, Fp8Slots::kAmaxQ + t), b);
  }
}

// grid: (blocks, batch, 3 tensors).
template <bool kVec>
__global__ void QuantizeKernel(QkvArgs a, float* __restrict__ slots, bool o_fp8) {
  const int t = blockIdx.z;
  const float scale = ScaleForAmax(SlotRef(slots, Fp8Slots::kAmaxQ + t));
  if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    // Only this kernel writes these slots and nothing in it reads them.
    SlotRef(slots, Fp8Slots::kScaleQ + t) = scale;
    SlotRef(slots, Fp8Slots::kDescaleQ + t) = 1.0f / scale;
    if (t == 0) {
      SlotRef(slots, Fp8Slots::kScaleS) = kE4m3MaxDevice;
      SlotRef(slots, Fp8Slots::kDescaleS) = 1.0f / kE4m3MaxDevice;
    }
    if (t == 2) {
      const float so = o_fp8 ? scale : 1.0f;
      SlotRef(slots, Fp8Slots::kScaleO) = so;
      SlotRef(slots, Fp8Slots::kDescaleO) = 1.0f / so;
    }
  }
  const __nv_bfloat16* src = a.x[t] + blockIdx.y * a.batch_stride[t];
  uint8_t* dst = a.out[t] + blockIdx.y * a.batch_stride[t];
  const int64_t elems = a.elems[t];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if constexpr (kVec) {
    for (int64_t i = first; i < elems / 8; i += step) {
      union { uint4 raw; __nv_bfloat16 e[8]; } w;
      w.raw = reinterpret_cast<const uint4*>(src)[i];
      union { uint2 raw; uint8_t b[8]; } q;
#pragma unroll
      for (int j = 0; j < 8; ++j) q.b[j] = ToE4m3(__bfloat162float(w.e[j]) * scale);
      reinterpret_cast<uint2*>(dst)[i] = q.raw;
    }
  } else {
    for (int64_t i = first; i < elems; i += step)
      dst[i] = ToE4m3(__bfloat162float(src[i]) * scale);
  }
}

__global__ void DequantizeKernel(const uint8_t* __restrict__ in, int64_t n,
                                 const float* __restrict__ descale_slot,
                                 __nv_bfloat16* __restrict__ out) {
  const float descale = *descale_slot;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += step) {
    __nv_fp8_e4m3 v;
    v.__x = static_cast<__nv_fp8_storage_t>(in[i]);
    out[i] = __float2bfloat16_rn(static_cast<float>(v) * descale);
  }
}

// Checks the three layouts and fills the kernel arguments; *vec says whether
// every tensor takes the 16-byte path; *max_elems is the longest.
absl::Status Prepare(const Fp8Qkv& qkv, bool with_out, const char* op, QkvArgs* a,
                     bool* vec, int64_t* max_elems) {
  *vec = true;
  *max_elems = 0;
  for (int t = 0; t < 3; ++t) {
    const RowsLayout& l = qkv.rows[t];
    if (l.batch != qkv.rows[0].batch || l.batch < 1 || l.batch > 65535 || l.elems < 0 ||
        l.batch_stride < l.elems || qkv.x[t] == nullptr ||
        (with_out && qkv.out[t] == nullptr))
      return absl::InvalidArgumentError(absl::StrCat(
          op, ": bad layout of tensor ", t, " (batch=", l.batch, " batch_stride=",
          l.batch_stride, " elems=", l.elems, ")"));
    a->x[t] = qkv.x[t];
    a->batch_stride[t] = l.batch_stride;
    a->elems[t] = l.elems;
    a->out[t] = qkv.out[t];
    *vec = *vec && l.elems % 8 == 0 && l.batch_stride % 8 == 0 && Aligned16(qkv.x[t]) &&
           (!with_out || (reinterpret_cast<uintptr_t>(qkv.out[t]) & 7u) == 0);
    *max_elems = std::max(*max_elems, l.elems);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status InvokeFp8Amax(const Fp8Qkv& qkv, float* slots, cudaStream_t stream) {
  QkvArgs a{};
  bool vec = false;
  int64_t max_elems = 0;
  DN_RETURN_IF_ERROR(Prepare(qkv, /*with_out=*/false, "InvokeFp8Amax", &a, &vec, &max_elems));
  // kAmaxQ, kAmaxK, kAmaxV are the first three slots.
  static_assert(Fp8Slots::kAmaxQ == 0 && Fp8Slots::kAmaxK == 1 && Fp8Slots::kAmaxV == 2);
  DN_CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(slots, 0, sizeof(float) * 3 * Fp8Slots::kStride, stream));
  if (max_elems == 0) return absl::OkStatus();
  const dim3 grid(BlocksFor(vec ? max_elems / 8 : max_elems),
                  static_cast<unsigned>(qkv.rows[0].batch), 3);
  if (vec) {
    AmaxKernel<true><<<grid, kThreads, 0, stream>>>(a, slots);
  } else {
    AmaxKernel<false><<<grid, kThreads, 0, stream>>>(a, slots);
  }
  DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status InvokeFp8Quantize(const Fp8Qkv& qkv, float* slots, bool o_fp8,
                               cudaStream_t stream) {
  QkvArgs a{};
  bool vec = false;
  int64_t max_elems = 0;
  DN_RETURN_IF_ERROR(Prepare(qkv, /*with_out=*/true, "InvokeFp8Quantize", &a, &vec,
                             &max_elems));
  static_assert(Fp8Slots::kScaleK == Fp8Slots::kScaleQ + 1 &&
                Fp8Slots::kScaleV == Fp8Slots::kScaleQ + 2 &&
                Fp8Slots::kDescaleK == Fp8Slots::kDescaleQ + 1 &&
                Fp8Slots::kDescaleV == Fp8Slots::kDescaleQ + 2);
  // BlocksFor gives at least one block per tensor: the scale slots are
  // always written.
  const dim3 grid(BlocksFor(vec ? max_elems / 8 : max_elems),
                  static_cast<unsigned>(qkv.rows[0].batch), 3);
  if (vec) {
    QuantizeKernel<true><<<grid, kThreads, 0, stream>>>(a, slots, o_fp8);
  } else {
    QuantizeKernel<false><<<grid, kThreads, 0, stream>>>(a, slots, o_fp8);
  }
  DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status InvokeDequantizeE4m3(const uint8_t* in, int64_t n, const float* slots,
                                  Fp8Slots::Slot descale_slot, __nv_bfloat16* out,
                                  cudaStream_t stream) {
  if (n < 0) return absl::InvalidArgumentError("InvokeDequantizeE4m3: n < 0");
  if (n == 0) return absl::OkStatus();
  const float* descale = slots + int{descale_slot} * Fp8Slots::kStride;
  DequantizeKernel<<<BlocksFor(n), kThreads, 0, stream>>>(in, n, descale, out);
  DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace dn::worker::cuda
