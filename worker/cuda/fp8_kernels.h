// File: worker/cuda/fp8_kernels.h
//
// The kernels around the fp8 attention (sdpa_fp8.h), as raw-pointer
// launchers on a stream (kernels.h conventions): per-tensor amax on the
// device, the scales derived from it on the device (so a captured CUDA graph
// recomputes them from each replay's data), bf16 -> e4m3 quantization into
// preallocated buffers and e4m3 -> bf16 dequantization. The e4m3 conversion
// is __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3): round to nearest
// even, saturating at +-448, exactly worker/cpu/e4m3.h's EncodeE4m3.
//
// "Rows" layouts: a [B, S, H, d] tensor of which the first `rows` tokens of
// each batch item are used (attention's kv_len): `batch` items of
// `elems` = rows * H * d elements, item b starting at b * `batch_stride`.
#ifndef DN_WORKER_CUDA_FP8_KERNELS_H_
#define DN_WORKER_CUDA_FP8_KERNELS_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace dn::worker::cuda {

struct RowsLayout {
  int64_t batch = 1;
  int64_t batch_stride = 0;  // elements between batch items
  int64_t elems = 0;         // used elements per batch item
};

// The device scalars of one fp8 attention call, each in its own 16-byte slot
// (cuDNN tensors are declared 16-byte aligned). Offsets in floats.
struct Fp8Slots {
  static constexpr int kStride = 4;  // floats per slot
  enum Slot : int {
    kAmaxQ = 0, kAmaxK, kAmaxV,         // max |x| of the used rows
    kScaleQ, kScaleK, kScaleV,          // 448 / amax (1 if amax is 0)
    kDescaleQ, kDescaleK, kDescaleV,    // 1 / scale
    kScaleS, kDescaleS,                 // P's scale 448 and 1/448
    kScaleO, kDescaleO,                 // O's (fp8 O: V's scale; bf16 O: 1)
    kAmaxS, kAmaxO,                     // written by cuDNN (diagnostics)
    kCount
  };
  static constexpr int64_t kBytes = int64_t{kCount} * kStride * 4;
  static float* At(float* base, Slot s) { return base + int{s} * kStride; }
};

// q, k and v of one call: their bf16 data, the used rows, and the e4m3
// buffers they are quantized into (same layout, one byte per element).
// batch must be the same for the three.
struct Fp8Qkv {
  const __nv_bfloat16* x[3] = {nullptr, nullptr, nullptr};
  RowsLayout rows[3];
  uint8_t* out[3] = {nullptr, nullptr, nullptr};
};

// slots[kAmaxQ/K/V] = max |x| over the used elements of q, k, v (NaN
// ignored); zeroes the three slots first. One memset and one launch.
absl::Status InvokeFp8Amax(const Fp8Qkv& qkv, float* slots, cudaStream_t stream);

// From the amax slots: every block derives its tensor's scale 448 / amax
// (1 for 0) and converts out = e4m3(x * scale); the first block of each
// tensor also stores scale and descale, and the first of q P's scale 448 /
// descale 1/448 and O's scale (o_fp8: V's scale, as |O| <= max |V|; else 1)
// and descale. One launch.
absl::Status InvokeFp8Quantize(const Fp8Qkv& qkv, float* slots, bool o_fp8,
                               cudaStream_t stream);

// out[i] = bf16(decode(in[i]) * slots[descale_slot]) for i < n.
absl::Status InvokeDequantizeE4m3(const uint8_t* in, int64_t n,
                                  const float* slots, Fp8Slots::Slot descale_slot,
                                  __nv_bfloat16* out, cudaStream_t stream);

}  // namespace dn::worker::cuda

#endif  // DN_WORKER_CUDA_FP8_KERNELS_H_
