// File: tests/comm/comm_test_util.h
//
// Data patterns shared by the comm tests (gtest, comm_test_rank, and the
// NCCL test): every element encodes where it came from, so a check names the
// exact element that went wrong.
#ifndef DN_TESTS_COMM_COMM_TEST_UTIL_H_
#define DN_TESTS_COMM_COMM_TEST_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/ulysses.h"

namespace dn::comm::testing {

inline uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// Byte `i` of the all-to-all block that rank `src` sends to rank `dst`.
inline uint8_t A2aByte(int src, int dst, uint64_t i, uint64_t salt = 0) {
  return static_cast<uint8_t>(
      Mix((static_cast<uint64_t>(src) << 56) ^ (static_cast<uint64_t>(dst) << 48) ^
          (salt << 40) ^ i) >>
      (8 * (i % 7)));
}

// Fills rank `rank`'s all-to-all send buffer (size() blocks of `bytes`).
inline void FillA2aSend(int rank, int world, size_t bytes, uint64_t salt,
                        uint8_t* send) {
  for (int dst = 0; dst < world; ++dst)
    for (size_t i = 0; i < bytes; ++i)
      send[static_cast<size_t>(dst) * bytes + i] = A2aByte(rank, dst, i, salt);
}

// Checks every byte of rank `rank`'s receive buffer; returns "" or a
// description of the first wrong byte (and the count of wrong bytes).
inline std::string CheckA2aRecv(int rank, int world, size_t bytes,
                                uint64_t salt, const uint8_t* recv,
                                size_t* wrong_out = nullptr) {
  size_t wrong = 0;
  std::string first;
  for (int src = 0; src < world; ++src)
    for (size_t i = 0; i < bytes; ++i) {
      const uint8_t want = A2aByte(src, rank, i, salt);
      const uint8_t got = recv[static_cast<size_t>(src) * bytes + i];
      if (got != want) {
        if (wrong == 0)
          first = absl::StrCat("rank ", rank, ": byte ", i, " of the block from rank ",
                               src, " is ", static_cast<int>(got), ", want ",
                               static_cast<int>(want));
        ++wrong;
      }
    }
  if (wrong_out) *wrong_out = wrong;
  if (wrong == 0) return "";
  return absl::StrCat(first, " (", wrong, " wrong bytes)");
}

// Byte `byte` of element (t, b, g, head, e) of the global tensor t (0=q,
// 1=k, 2=v, 3=o) at global sequence position g (padding rows g >= L get
// values too, so they can be traced through the exchange).
inline uint8_t TensorByte(int t, int64_t b, int64_t g, int64_t head, int64_t e,
                          size_t byte) {
  const uint64_t key = (static_cast<uint64_t>(t) << 60) ^
                       (static_cast<uint64_t>(b) << 50) ^
                       (static_cast<uint64_t>(g) << 30) ^
                       (static_cast<uint64_t>(head) << 20) ^
                       static_cast<uint64_t>(e);
  return static_cast<uint8_t>(Mix(key) >> (8 * (byte % 8)));
}

// Rank r's sequence-sharded tensor t: [B, S, H, d].
inline std::vector<uint8_t> MakeSeqSharded(const UlyssesLayout& l, int r,
                                           int t) {
  const int64_t S = l.shard();
  std::vector<uint8_t> x(static_cast<size_t>(l.seq_sharded_elems()) *
                         l.elem_size);
  size_t pos = 0;
  for (int64_t b = 0; b < l.batch; ++b)
    for (int64_t s = 0; s < S; ++s)
      for (int64_t hh = 0; hh < l.heads; ++hh)
        for (int64_t e = 0; e < l.head_dim; ++e)
          for (size_t y = 0; y < l.elem_size; ++y)
            x[pos++] = TensorByte(t, b, r * S + s, hh, e, y);
  return x;
}

// Checks rank r's head-sharded tensor t: [B, P*S, h, d], rank r holding
// heads [r*h, (r+1)*h).
inline std::string CheckHeadSharded(const UlyssesLayout& l, int r, int t,
                                    const uint8_t* y) {
  const int64_t S = l.shard(), h = l.heads_per_rank();
  size_t pos = 0;
  for (int64_t b = 0; b < l.batch; ++b)
    for (int64_t g = 0; g < l.world * S; ++g)
      for (int64_t j = 0; j < h; ++j)
        for (int64_t e = 0; e < l.head_dim; ++e)
          for (size_t byte = 0; byte < l.elem_size; ++byte, ++pos) {
            const uint8_t want = TensorByte(t, b, g, r * h + j, e, byte);
            if (y[pos] != want)
              return absl::StrCat("rank ", r, " tensor ", t, ": element [b=", b,
                                  ", seq=", g, ", head=", j, ", e=", e,
                                  "] byte ", byte, " is ",
                                  static_cast<int>(y[pos]), ", want ",
                                  static_cast<int>(want));
          }
  return "";
}

}  // namespace dn::comm::testing

#endif  // DN_TESTS_COMM_COMM_TEST_UTIL_H_
