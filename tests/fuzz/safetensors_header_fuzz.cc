// File: tests/fuzz/safetensors_header_fuzz.cc
//
// libFuzzer target: worker::ParseSafetensorsHeader on arbitrary bytes (a
// whole "file"). A header that parses must describe tensors that lie inside
// the data section, tile it in order and have byte sizes that match their
// shapes; anything else is a bug in the validator.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "worker/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<dn::worker::SafetensorsHeader> h =
      dn::worker::ParseSafetensorsHeader(data, size);
  if (!h.ok()) return 0;
  if (h->data_offset > size || h->data_size != size - h->data_offset) abort();
  uint64_t next = 0;
  for (const dn::worker::SafetensorsEntry& e : h->tensors) {
    if (e.begin != next || e.end < e.begin || e.end > h->data_size) abort();
    uint64_t numel = 1;
    for (int64_t d : e.shape) {
      if (d < 0) abort();
      numel *= static_cast<uint64_t>(d);
    }
    const uint64_t elem = e.dtype == dn::worker::DType::kF32 ? 4 : 2;
    if (numel * elem != e.nbytes()) abort();
    next = e.end;
  }
  if (next != h->data_size) abort();
  return 0;
}
