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

// Blocks per batch item for `n` units of work (grid-stride beyond that).
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

template <bool kVec>
__global__ void AmaxKernel(const __nv_bfloat16* __restrict__ x, int64_t batch_stride,
                           int64_t elems, float* __restrict__ slot) {
  const __nv_bfloat16* base = x + blockIdx.y * batch_stride;
  float m = 0.0f;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (kVec) {
    const int64_t words = elems / 8;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         i < words; i += step) {
      union { uint4 raw; __nv_bfloat16 e[8]; } w;
      w.raw = reinterpret_cast<const uint4*>(base)[i];
#pragma unroll
      for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(__bfloat162float(w.e[j])));
    }
  } else {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         i < elems; i += step)
      m = fmaxf(m, fabsf(__bfloat162float(base[i])));
  }
  // Warp, then block reduction.
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  __shared__ float warp_max[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) b = fmaxf(b, warp_max[w]);
    AtomicMaxNonNegative(slot, b);
  }
}

__global__ void ScalesKernel(float* slots, bool o_fp8) {
  auto at = [&](Fp8Slots::Slot s) -> float& { return slots[int{s} * Fp8Slots::kStride]; };
  const Fp8Slots::Slot amax[3] = {Fp8Slots::kAmaxQ, Fp8Slots::kAmaxK, Fp8Slots::kAmaxV};
  const Fp8Slots::Slot scale[3] = {Fp8Slots::kScaleQ, Fp8Slots::kScaleK, Fp8Slots::kScaleV};
  const Fp8Slots::Slot descale[3] = {Fp8Slots::kDescaleQ, Fp8Slots::kDescaleK,
                                     Fp8Slots::kDescaleV};
  for (int i = 0; i < 3; ++i) {
    const float s = ScaleForAmax(at(amax[i]));
    at(scale[i]) = s;
    at(descale[i]) = 1.0f / s;
  }
  at(Fp8Slots::kScaleS) = kE4m3MaxDevice;
  at(Fp8Slots::kDescaleS) = 1.0f / kE4m3MaxDevice;
  const float so = o_fp8 ? at(Fp8Slots::kScaleV) : 1.0f;
  at(Fp8Slots::kScaleO) = so;
  at(Fp8Slots::kDescaleO) = 1.0f / so;
}

template <bool kVec>
__global__ void QuantizeKernel(const __nv_bfloat16* __restrict__ x, int64_t batch_stride,
                               int64_t elems, const float* __restrict__ scale_slot,
                               uint8_t* __restrict__ out) {
  const __nv_bfloat16* src = x + blockIdx.y * batch_stride;
  uint8_t* dst = out + blockIdx.y * batch_stride;
  const float scale = *scale_slot;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (kVec) {
    const int64_t words = elems / 8;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         i < words; i += step) {
      union { uint4 raw; __nv_bfloat16 e[8]; } w;
      w.raw = reinterpret_cast<const uint4*>(src)[i];
      union { uint2 raw; uint8_t b[8]; } q;
#pragma unroll
      for (int j = 0; j < 8; ++j) q.b[j] = ToE4m3(__bfloat162float(w.e[j]) * scale);
      reinterpret_cast<uint2*>(dst)[i] = q.raw;
    }
  } else {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         i < elems; i += step)
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

absl::Status CheckLayout(const RowsLayout& l, const char* op) {
  if (l.batch < 1 || l.batch > 65535 || l.elems < 0 || l.batch_stride < l.elems)
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": bad layout batch=", l.batch, " batch_stride=", l.batch_stride,
        " elems=", l.elems));
  return absl::OkStatus();
}

}  // namespace

absl::Status InvokeFp8Amax(const __nv_bfloat16* x, const RowsLayout& l, float* slots,
                           Fp8Slots::Slot amax_slot, cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckLayout(l, "InvokeFp8Amax"));
  float* slot = Fp8Slots::At(slots, amax_slot);
  DN_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(slot, 0, sizeof(float), stream));
  if (l.elems == 0) return absl::OkStatus();
  const bool vec = l.elems % 8 == 0 && l.batch_stride % 8 == 0 && Aligned16(x);
  const dim3 grid(BlocksFor(vec ? l.elems / 8 : l.elems), static_cast<unsigned>(l.batch));
  if (vec) {
    AmaxKernel<true><<<grid, kThreads, 0, stream>>>(x, l.batch_stride, l.elems, slot);
  } else {
    AmaxKernel<false><<<grid, kThreads, 0, stream>>>(x, l.batch_stride, l.elems, slot);
  }
  DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status InvokeFp8Scales(float* slots, bool o_fp8, cudaStream_t stream) {
  ScalesKernel<<<1, 1, 0, stream>>>(slots, o_fp8);
  DN_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status InvokeQuantizeE4m3(const __nv_bfloat16* x, const RowsLayout& l,
                                const float* slots, Fp8Slots::Slot scale_slot,
                                uint8_t* out, cudaStream_t stream) {
  DN_RETURN_IF_ERROR(CheckLayout(l, "InvokeQuantizeE4m3"));
  if (l.elems == 0) return absl::OkStatus();
  const float* scale = slots + int{scale_slot} * Fp8Slots::kStride;
  const bool vec = l.elems % 8 == 0 && l.batch_stride % 8 == 0 && Aligned16(x) &&
                   (reinterpret_cast<uintptr_t>(out) & 7u) == 0;
  const dim3 grid(BlocksFor(vec ? l.elems / 8 : l.elems), static_cast<unsigned>(l.batch));
  if (vec) {
    QuantizeKernel<true><<<grid, kThreads, 0, stream>>>(x, l.batch_stride, l.elems,
                                                        scale, out);
  } else {
    QuantizeKernel<false><<<grid, kThreads, 0, stream>>>(x, l.batch_stride, l.elems,
                                                         scale, out);
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
