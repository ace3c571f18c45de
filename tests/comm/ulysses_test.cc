// Ulysses layout maths and host relayouts, checked without a network: the
// all-to-all between P simulated ranks is a block transpose done here.
#include "comm/ulysses.h"

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

#include "tests/comm/comm_test_util.h"

namespace dn::comm {
namespace {

using testing::CheckHeadSharded;
using testing::MakeSeqSharded;
using testing::TensorByte;

UlyssesLayout Layout(int64_t batch, int64_t seq, int world, int heads,
                     int head_dim, size_t elem_size) {
  UlyssesLayout l;
  l.batch = batch;
  l.seq_total = seq;
  l.world = world;
  l.heads = heads;
  l.head_dim = head_dim;
  l.elem_size = elem_size;
  return l;
}

// recv of rank r, block p = send of rank p, block r.
std::vector<std::vector<uint8_t>> SimulateAllToAll(
    const std::vector<std::vector<uint8_t>>& send, size_t block) {
  const size_t P = send.size();
  std::vector<std::vector<uint8_t>> recv(P, std::vector<uint8_t>(P * block));
  for (size_t r = 0; r < P; ++r)
    for (size_t p = 0; p < P; ++p)
      std::memcpy(&recv[r][p * block], &send[p][r * block], block);
  return recv;
}

TEST(UlyssesLayoutTest, ShardsAndSizes) {
  // L = 10, P = 4: S = 3, shards 3,3,3,1; padding rows 10, 11 at the end.
  UlyssesLayout l = Layout(2, 10, 4, 8, 16, 2);
  ASSERT_TRUE(l.Validate().ok());
  EXPECT_EQ(l.shard(), 3);
  EXPECT_EQ(l.heads_per_rank(), 2);
  const int64_t begin[] = {0, 3, 6, 9}, len[] = {3, 3, 3, 1};
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(l.shard_begin(r), begin[r]) << r;
    EXPECT_EQ(l.shard_len(r), len[r]) << r;
  }
  EXPECT_EQ(l.out_block_bytes(), size_t{2 * 3 * 2 * 16 * 2});
  EXPECT_EQ(l.qkv_block_bytes(), 3 * l.out_block_bytes());
  EXPECT_EQ(l.seq_sharded_elems(), 2 * 3 * 8 * 16);
  EXPECT_EQ(l.head_sharded_elems(), 2 * 12 * 2 * 16);
  // L = 5, P = 4: S = 2, shards 2,2,1,0 (the last rank holds only padding).
  UlyssesLayout m = Layout(1, 5, 4, 4, 1, 4);
  const int64_t mbegin[] = {0, 2, 4, 5}, mlen[] = {2, 2, 1, 0};
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(m.shard_begin(r), mbegin[r]) << r;
    EXPECT_EQ(m.shard_len(r), mlen[r]) << r;
  }
}

TEST(UlyssesLayoutTest, ValidateNamesHeadsAndWorld) {
  absl::Status st = Layout(1, 16, 4, 6, 8, 4).Validate();
  ASSERT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("heads (6)"), std::string::npos) << st;
  EXPECT_NE(st.message().find("world size (4)"), std::string::npos) << st;
  EXPECT_EQ(Layout(0, 16, 2, 4, 8, 4).Validate().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Layout(1, 0, 2, 4, 8, 4).Validate().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Layout(1, 16, 2, 4, 0, 4).Validate().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Layout(1, 16, 2, 4, 8, 0).Validate().code(),
            absl::StatusCode::kInvalidArgument);
}

// Every byte of the packed QKV send buffer [P,3,B,S,h,d] against the layout
// formula: send[p][t][b][s][j] = x_t[b][s][p*h + j].
TEST(UlyssesRelayoutTest, PackQkvIndexMaths) {
  const UlyssesLayout l = Layout(2, 7, 2, 6, 3, 2);  // S = 4, h = 3, uneven
  const int r = 1;
  auto q = MakeSeqSharded(l, r, 0), k = MakeSeqSharded(l, r, 1),
       v = MakeSeqSharded(l, r, 2);
  std::vector<uint8_t> send(l.qkv_block_bytes() * l.world, 0);
  PackQkvHost(l, q.data(), k.data(), v.data(), send.data());
  const int64_t S = l.shard(), h = l.heads_per_rank();
  size_t pos = 0;
  for (int p = 0; p < l.world; ++p)
    for (int t = 0; t < 3; ++t)
      for (int64_t b = 0; b < l.batch; ++b)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t j = 0; j < h; ++j)
            for (int64_t e = 0; e < l.head_dim; ++e)
              for (size_t y = 0; y < l.elem_size; ++y, ++pos)
                ASSERT_EQ(send[pos], TensorByte(t, b, r * S + s, p * h + j, e, y))
                    << "p=" << p << " t=" << t << " b=" << b << " s=" << s
                    << " j=" << j << " e=" << e;
  EXPECT_EQ(pos, send.size());
}

// Output pack/unpack: PackOut places [B,P*S,h,d] rows [p*S,(p+1)*S) in block
// p; UnpackOut puts block p's heads at [p*h, (p+1)*h).
TEST(UlyssesRelayoutTest, OutIndexMaths) {
  const UlyssesLayout l = Layout(2, 5, 3, 6, 2, 4);  // S = 2, h = 2
  const int64_t S = l.shard(), h = l.heads_per_rank(), P = l.world;
  std::vector<uint8_t> o(static_cast<size_t>(l.head_sharded_elems()) * l.elem_size);
  for (size_t i = 0; i < o.size(); ++i) o[i] = static_cast<uint8_t>(i * 13 + 1);
  std::vector<uint8_t> send(l.out_block_bytes() * P);
  PackOutHost(l, o.data(), send.data());
  const size_t es = l.elem_size;
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < l.batch; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t j = 0; j < h; ++j)
          for (int64_t e = 0; e < l.head_dim; ++e) {
            const size_t at = ((((p * l.batch + b) * S + s) * h + j) * l.head_dim + e) * es;
            const size_t from = (((b * P * S + p * S + s) * h + j) * l.head_dim + e) * es;
            ASSERT_EQ(std::memcmp(&send[at], &o[from], es), 0)
                << "p=" << p << " b=" << b << " s=" << s << " j=" << j;
          }
  std::vector<uint8_t> out(static_cast<size_t>(l.seq_sharded_elems()) * es);
  UnpackOutHost(l, send.data(), out.data());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t b = 0; b < l.batch; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t j = 0; j < h; ++j)
          for (int64_t e = 0; e < l.head_dim; ++e) {
            const size_t from = ((((p * l.batch + b) * S + s) * h + j) * l.head_dim + e) * es;
            const size_t at = (((b * S + s) * l.heads + p * h + j) * l.head_dim + e) * es;
            ASSERT_EQ(std::memcmp(&out[at], &send[from], es), 0)
                << "p=" << p << " b=" << b << " s=" << s << " j=" << j;
          }
}

struct ExchangeCase {
  int64_t batch, seq;
  int world, heads, head_dim;
  size_t elem_size;
};

class UlyssesSimulatedTest : public ::testing::TestWithParam<ExchangeCase> {};

// Full exchange between P simulated ranks: head-sharded result = the global
// tensor's heads of each rank at every global position; the output exchange
// brings everything back (identity, padding rows included).
TEST_P(UlyssesSimulatedTest, SeqToHeadMatchesGlobalAndRoundTrips) {
  const ExchangeCase c = GetParam();
  const UlyssesLayout l =
      Layout(c.batch, c.seq, c.world, c.heads, c.head_dim, c.elem_size);
  ASSERT_TRUE(l.Validate().ok());
  const int P = l.world;
  std::vector<std::vector<uint8_t>> x[3], send(P);
  for (int t = 0; t < 3; ++t)
    for (int r = 0; r < P; ++r) x[t].push_back(MakeSeqSharded(l, r, t));
  for (int r = 0; r < P; ++r) {
    send[r].assign(l.qkv_block_bytes() * P, 0);
    PackQkvHost(l, x[0][r].data(), x[1][r].data(), x[2][r].data(), send[r].data());
  }
  auto recv = SimulateAllToAll(send, l.qkv_block_bytes());
  const size_t head_bytes = static_cast<size_t>(l.head_sharded_elems()) * l.elem_size;
  std::vector<std::vector<uint8_t>> y[3];
  for (int r = 0; r < P; ++r) {
    std::vector<uint8_t> a(head_bytes), b(head_bytes), v(head_bytes);
    UnpackQkvHost(l, recv[r].data(), a.data(), b.data(), v.data());
    y[0].push_back(a);
    y[1].push_back(b);
    y[2].push_back(v);
    for (int t = 0; t < 3; ++t)
      ASSERT_EQ(CheckHeadSharded(l, r, t, y[t][r].data()), "");
  }
  // Back: each tensor through the output exchange.
  for (int t = 0; t < 3; ++t) {
    std::vector<std::vector<uint8_t>> osend(P);
    for (int r = 0; r < P; ++r) {
      osend[r].assign(l.out_block_bytes() * P, 0);
      PackOutHost(l, y[t][r].data(), osend[r].data());
    }
    auto orecv = SimulateAllToAll(osend, l.out_block_bytes());
    for (int r = 0; r < P; ++r) {
      std::vector<uint8_t> back(x[t][r].size(), 0xAB);
      UnpackOutHost(l, orecv[r].data(), back.data());
      ASSERT_EQ(back, x[t][r]) << "tensor " << t << " rank " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, UlyssesSimulatedTest,
    ::testing::Values(ExchangeCase{1, 16, 1, 4, 8, 4},   // one rank
                      ExchangeCase{1, 16, 2, 4, 8, 4},   // even
                      ExchangeCase{2, 10, 4, 8, 3, 2},   // uneven, bf16-sized
                      ExchangeCase{1, 5, 4, 4, 2, 4},    // last rank all padding
                      ExchangeCase{3, 33, 3, 6, 5, 1},   // odd everything
                      ExchangeCase{1, 2, 8, 8, 4, 2}),   // L < P
    [](const ::testing::TestParamInfo<ExchangeCase>& info) {
      const ExchangeCase& c = info.param;
      return absl::StrCat("B", c.batch, "_L", c.seq, "_P", c.world, "_H",
                          c.heads, "_d", c.head_dim, "_es", c.elem_size);
    });

}  // namespace
}  // namespace dn::comm
