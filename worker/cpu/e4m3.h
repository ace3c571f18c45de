// File: worker/cpu/e4m3.h
//
// The fp8 e4m3 format of the fast tier's attention (OCP "E4M3FN", the one
// Hopper's tensor cores and cuDNN's fp8 SDPA take): 1 sign bit, 4 exponent
// bits (bias 7), 3 mantissa bits, no infinities, one NaN pattern per sign
// (S.1111.111), largest finite value 448 = 1.75 * 2^8, smallest normal 2^-6,
// smallest subnormal 2^-9.
//
// The conversion is the one CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE,
// __NV_E4M3) performs: round to nearest, ties to even, and saturate to +-448
// (infinities too); NaN stays NaN. The CPU backend's AttentionFp8 emulation
// uses it, so its numbers are the CUDA path's up to accumulation order.
#ifndef DN_WORKER_CPU_E4M3_H_
#define DN_WORKER_CPU_E4M3_H_

#include <cstdint>

namespace dn::worker {

inline constexpr float kE4m3Max = 448.0f;

// The e4m3 code nearest to x (ties to even, saturating at +-448).
uint8_t EncodeE4m3(float x);
// The value of an e4m3 code (NaN for 0x7F and 0xFF).
float DecodeE4m3(uint8_t code);
// DecodeE4m3(EncodeE4m3(x)): x rounded to the nearest e4m3 value.
float RoundE4m3(float x);

// The per-tensor scale that maps a tensor whose largest magnitude is `amax`
// onto e4m3's full range (448 / amax), and 1 for an all-zero or non-finite
// amax (or one so small that 448 / amax overflows). The descale is its reciprocal. Shared by the CPU emulation and
// documented as the CUDA kernels' rule (worker/cuda/kernels.cu).
float E4m3ScaleForAmax(float amax);

}  // namespace dn::worker

#endif  // DN_WORKER_CPU_E4M3_H_
