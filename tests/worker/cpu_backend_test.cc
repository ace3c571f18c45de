// CpuBackend ops against naive loops written here (double accumulation), and
// the Ulysses relayouts against an explicit index map with a simulated
// all-to-all between P in-process "ranks".
#include "worker/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "worker/noise.h"

namespace dn::worker {
namespace {

constexpr double kTol = 2e-5;  // fp32 op vs double loop, relative to 1 + |ref|

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

class CpuBackendTest : public ::testing::Test {
 protected:
  CpuBackendTest() : backend_(1) {}

  Tensor Make(const Shape& shape, const std::vector<float>& values) {
    Tensor t = backend_.Empty(shape, DType::kF32).value();
    EXPECT_EQ(static_cast<size_t>(t.numel()), values.size());
    EXPECT_TRUE(backend_.CopyFromHost(values.data(), &t).ok());
    return t;
  }
  Tensor Zeros(const Shape& shape) {
    return backend_.Empty(shape, DType::kF32).value();
  }
  std::vector<float> Host(const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    EXPECT_TRUE(backend_.CopyToHost(t, v.data()).ok());
    return v;
  }
  static void ExpectNear(const std::vector<float>& got,
                         const std::vector<double>& want) {
    ASSERT_EQ(got.size(), want.size());
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double err = std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i]));
      worst = std::max(worst, err);
      ASSERT_LE(err, kTol) << "element " << i << ": got " << got[i]
                           << " want " << want[i];
    }
  }

  CpuBackend backend_;
};

double GeluTanhRef(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST_F(CpuBackendTest, LinearGeluMatchesLoops) {
  const int m = 7, n = 13, k = 33;
  auto x = Random(m * k, 1), w = Random(n * k, 2, 0.2f), b = Random(n, 3);
  Tensor tx = Make({m, k}, x), tw = Make({n, k}, w), tb = Make({n}, b);
  Tensor y = Zeros({m, n});
  ASSERT_TRUE(backend_.Linear(tx, tw, &tb, Activation::kGeluTanh, &y).ok());
  std::vector<double> want(m * n);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = b[j];
      for (int q = 0; q < k; ++q) acc += static_cast<double>(x[i * k + q]) * w[j * k + q];
      want[i * n + j] = GeluTanhRef(acc);
    }
  ExpectNear(Host(y), want);

  // No bias, no activation, 3-D input.
  Tensor x3 = tx.View({1, m, k});
  Tensor y3 = Zeros({1, m, n});
  ASSERT_TRUE(backend_.Linear(x3, tw, nullptr, Activation::kNone, &y3).ok());
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double acc = 0;
      for (int q = 0; q < k; ++q) acc += static_cast<double>(x[i * k + q]) * w[j * k + q];
      want[i * n + j] = acc;
    }
  ExpectNear(Host(y3), want);

  Tensor bad = Zeros({m, n + 1});
  EXPECT_FALSE(backend_.Linear(tx, tw, &tb, Activation::kNone, &bad).ok());
}

TEST_F(CpuBackendTest, SiluAndAdds) {
  auto x = Random(50, 4, 3.0f), y = Random(50, 5);
  Tensor tx = Make({5, 10}, x), ty = Make({5, 10}, y), out = Zeros({5, 10});
  ASSERT_TRUE(backend_.Silu(tx, &out).ok());
  std::vector<double> want(50);
  for (int i = 0; i < 50; ++i) want[i] = x[i] / (1.0 + std::exp(-static_cast<double>(x[i])));
  ExpectNear(Host(out), want);
  ASSERT_TRUE(backend_.AddInPlace(&tx, ty).ok());
  for (int i = 0; i < 50; ++i) want[i] = static_cast<double>(x[i]) + y[i];
  ExpectNear(Host(tx), want);
}

TEST_F(CpuBackendTest, AddModulationBothForms) {
  const int b = 2, k = 6, d = 5;
  auto table = Random(k * d, 6), proj = Random(b * k * d, 7), temb = Random(b * d, 8);
  Tensor tt = Make({1, k, d}, table), tp = Make({b, k * d}, proj);
  Tensor out = Zeros({b, k, d});
  ASSERT_TRUE(backend_.AddModulation(tt, tp, &out).ok());
  std::vector<double> want(b * k * d);
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < k; ++j)
      for (int c = 0; c < d; ++c)
        want[(i * k + j) * d + c] =
            static_cast<double>(table[j * d + c]) + proj[(i * k + j) * d + c];
  ExpectNear(Host(out), want);
  // [B, D] broadcast over k (the output head's temb).
  Tensor t2 = Make({1, 2, d}, std::vector<float>(table.begin(), table.begin() + 2 * d));
  Tensor te = Make({b, d}, temb);
  Tensor out2 = Zeros({b, 2, d});
  ASSERT_TRUE(backend_.AddModulation(t2, te, &out2).ok());
  std::vector<double> want2(b * 2 * d);
  for (int i = 0; i < b; ++i)
    for (int j = 0; j < 2; ++j)
      for (int c = 0; c < d; ++c)
        want2[(i * 2 + j) * d + c] = static_cast<double>(table[j * d + c]) + temb[i * d + c];
  ExpectNear(Host(out2), want2);
}

TEST_F(CpuBackendTest, LayerNormModulateMatchesLoops) {
  const int b = 2, s = 3, d = 24, k = 6;
  auto x = Random(b * s * d, 9, 2.0f);
  for (float& v : x) v += 5.0f;  // a mean far from 0 exercises the centring
  auto mod = Random(b * k * d, 10, 0.5f);
  Tensor tx = Make({b, s, d}, x), tm = Make({b, k, d}, mod), y = Zeros({b, s, d});
  const double eps = 1e-6;
  ASSERT_TRUE(backend_.LayerNormModulate(tx, tm, 3, 4, static_cast<float>(eps), &y).ok());
  std::vector<double> want(b * s * d);
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s; ++t) {
      const float* row = &x[(i * s + t) * d];
      double mean = 0, var = 0;
      for (int c = 0; c < d; ++c) mean += row[c];
      mean /= d;
      for (int c = 0; c < d; ++c) var += (row[c] - mean) * (row[c] - mean);
      var /= d;
      for (int c = 0; c < d; ++c) {
        const double shift = mod[(i * k + 3) * d + c], scale = mod[(i * k + 4) * d + c];
        want[(i * s + t) * d + c] =
            (row[c] - mean) / std::sqrt(var + eps) * (1 + scale) + shift;
      }
    }
  ExpectNear(Host(y), want);
  EXPECT_FALSE(backend_.LayerNormModulate(tx, tm, 3, 6, 1e-6f, &y).ok());
}

TEST_F(CpuBackendTest, LayerNormAffineAndRmsNorm) {
  const int m = 5, d = 32;
  auto x = Random(m * d, 11, 3.0f), g = Random(d, 12), bias = Random(d, 13);
  Tensor tx = Make({m, d}, x), tg = Make({d}, g), tb = Make({d}, bias);
  Tensor y = Zeros({m, d});
  const double eps = 1e-6;
  ASSERT_TRUE(backend_.LayerNormAffine(tx, tg, tb, static_cast<float>(eps), &y).ok());
  std::vector<double> want(m * d);
  for (int i = 0; i < m; ++i) {
    double mean = 0, var = 0;
    for (int c = 0; c < d; ++c) mean += x[i * d + c];
    mean /= d;
    for (int c = 0; c < d; ++c) var += (x[i * d + c] - mean) * (x[i * d + c] - mean);
    var /= d;
    for (int c = 0; c < d; ++c)
      want[i * d + c] = (x[i * d + c] - mean) / std::sqrt(var + eps) * g[c] + bias[c];
  }
  ExpectNear(Host(y), want);

  ASSERT_TRUE(backend_.RmsNorm(tx, tg, static_cast<float>(eps), &y).ok());
  for (int i = 0; i < m; ++i) {
    double sq = 0;
    for (int c = 0; c < d; ++c) sq += static_cast<double>(x[i * d + c]) * x[i * d + c];
    const double inv = 1.0 / std::sqrt(sq / d + eps);
    for (int c = 0; c < d; ++c) want[i * d + c] = x[i * d + c] * inv * g[c];
  }
  ExpectNear(Host(y), want);
}

TEST_F(CpuBackendTest, RmsNormRopeMatchesLoops) {
  const int b = 2, s = 4, heads = 3, hd = 8, d = heads * hd, pairs = hd / 2;
  auto x = Random(b * s * d, 14, 2.0f), g = Random(d, 15);
  auto angles = Random(s * pairs, 16, 3.0f);
  std::vector<float> rope(s * pairs * 2);
  for (int i = 0; i < s * pairs; ++i) {
    rope[2 * i] = std::cos(angles[i]);
    rope[2 * i + 1] = std::sin(angles[i]);
  }
  Tensor tx = Make({b, s, d}, x), tg = Make({d}, g), tr = Make({s, pairs, 2}, rope);
  Tensor y = Zeros({b, s, d});
  const double eps = 1e-6;
  ASSERT_TRUE(backend_.RmsNormRope(tx, tg, tr, heads, static_cast<float>(eps), &y).ok());
  std::vector<double> want(b * s * d);
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s; ++t) {
      const float* row = &x[(i * s + t) * d];
      double sq = 0;
      for (int c = 0; c < d; ++c) sq += static_cast<double>(row[c]) * row[c];
      const double inv = 1.0 / std::sqrt(sq / d + eps);  // over ALL heads
      for (int h = 0; h < heads; ++h)
        for (int p = 0; p < pairs; ++p) {
          const int c0 = h * hd + 2 * p, c1 = c0 + 1;
          const double x0 = row[c0] * inv * g[c0], x1 = row[c1] * inv * g[c1];
          const double phi = angles[t * pairs + p];
          want[(i * s + t) * d + c0] = x0 * std::cos(phi) - x1 * std::sin(phi);
          want[(i * s + t) * d + c1] = x0 * std::sin(phi) + x1 * std::cos(phi);
        }
    }
  ExpectNear(Host(y), want);
  Tensor bad_rope = Zeros({s + 1, pairs, 2});
  EXPECT_FALSE(backend_.RmsNormRope(tx, tg, bad_rope, heads, 1e-6f, &y).ok());
}

TEST_F(CpuBackendTest, AttentionIgnoresKeysPastKvLen) {
  const int b = 2, sq = 5, skv = 9, kv_len = 6, h = 3, d = 4;
  auto q = Random(b * sq * h * d, 17), k = Random(b * skv * h * d, 18),
       v = Random(b * skv * h * d, 19);
  // Rows past kv_len are padding: poison them.
  for (int i = 0; i < b; ++i)
    for (int t = kv_len; t < skv; ++t)
      for (int c = 0; c < h * d; ++c) {
        k[(i * skv + t) * h * d + c] = std::numeric_limits<float>::quiet_NaN();
        v[(i * skv + t) * h * d + c] = 1e30f;
      }
  Tensor tq = Make({b, sq, h, d}, q), tk = Make({b, skv, h, d}, k),
         tv = Make({b, skv, h, d}, v), o = Zeros({b, sq, h, d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  ASSERT_TRUE(backend_.Attention(tq, tk, tv, kv_len, static_cast<float>(scale), &o).ok());
  std::vector<double> want(b * sq * h * d);
  for (int i = 0; i < b; ++i)
    for (int hh = 0; hh < h; ++hh)
      for (int t = 0; t < sq; ++t) {
        std::vector<double> sc(kv_len);
        double mx = -1e300;
        for (int j = 0; j < kv_len; ++j) {
          double acc = 0;
          for (int c = 0; c < d; ++c)
            acc += static_cast<double>(q[((i * sq + t) * h + hh) * d + c]) *
                   k[((i * skv + j) * h + hh) * d + c];
          sc[j] = acc * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (double& x : sc) sum += (x = std::exp(x - mx));
        for (int c = 0; c < d; ++c) {
          double acc = 0;
          for (int j = 0; j < kv_len; ++j)
            acc += sc[j] / sum * v[((i * skv + j) * h + hh) * d + c];
          want[((i * sq + t) * h + hh) * d + c] = acc;
        }
      }
  ExpectNear(Host(o), want);
  EXPECT_FALSE(backend_.Attention(tq, tk, tv, skv + 1, 1.0f, &o).ok());
}

TEST_F(CpuBackendTest, AttentionIsStableForLargeScores) {
  // Scores around 1e3 overflow a naive exp; the max-subtracted softmax must not.
  const int sq = 2, skv = 3, d = 2;
  std::vector<float> q = {100, 0, 0, 100}, k = {10, 0, 9, 0, 0, 10},
                     v = {1, 2, 3, 4, 5, 6};
  Tensor tq = Make({1, sq, 1, d}, q), tk = Make({1, skv, 1, d}, k),
         tv = Make({1, skv, 1, d}, v), o = Zeros({1, sq, 1, d});
  ASSERT_TRUE(backend_.Attention(tq, tk, tv, skv, 1.0f, &o).ok());
  const auto got = Host(o);
  for (float x : got) EXPECT_TRUE(std::isfinite(x));
  EXPECT_NEAR(got[0], 1.0, 1e-5);  // query 0 -> key 0 dominates (1000 vs 900)
  EXPECT_NEAR(got[3], 6.0, 1e-5);  // query 1 -> key 2
}

TEST_F(CpuBackendTest, GatedResidualMatchesLoops) {
  const int b = 2, s = 3, d = 7, k = 6;
  auto x = Random(b * s * d, 20), y = Random(b * s * d, 21), mod = Random(b * k * d, 22);
  Tensor tx = Make({b, s, d}, x), ty = Make({b, s, d}, y), tm = Make({b, k, d}, mod);
  ASSERT_TRUE(backend_.GatedResidual(&tx, ty, tm, 5).ok());
  std::vector<double> want(b * s * d);
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s; ++t)
      for (int c = 0; c < d; ++c) {
        const int e = (i * s + t) * d + c;
        want[e] = x[e] + static_cast<double>(y[e]) * mod[(i * k + 5) * d + c];
      }
  ExpectNear(Host(tx), want);
}

// The step cache's tile sums: naive loops over the real rows; each tile's
// sums are the same whether it is computed among the full sequence or alone
// (a shard of fewer rows), and the thread count does not change a bit.
TEST_F(CpuBackendTest, TileAbsDiffSumsMatchLoopsAndAreTileLocal) {
  const int b = 2, s = 12, d = 5, tile = 4, valid = 10;
  auto cur = Random(b * s * d, 40), prev = Random(b * s * d, 41);
  Tensor tc = Make({b, s, d}, cur), tp = Make({b, s, d}, prev);
  std::vector<double> sums(2 * b * (s / tile), -1.0);
  ASSERT_TRUE(backend_.TileAbsDiffSums(tc, tp, tile, valid, sums.data()).ok());
  for (int i = 0; i < b; ++i)
    for (int t = 0; t < s / tile; ++t) {
      double num = 0, den = 0;
      for (int r = t * tile; r < std::min((t + 1) * tile, valid); ++r)
        for (int c = 0; c < d; ++c) {
          const int e = (i * s + r) * d + c;
          num += std::fabs(static_cast<double>(cur[e]) - prev[e]);
          den += std::fabs(static_cast<double>(prev[e]));
        }
      const size_t o = 2 * static_cast<size_t>(i * (s / tile) + t);
      EXPECT_NEAR(sums[o], num, 1e-12 * (1 + num)) << "b " << i << " tile " << t;
      EXPECT_NEAR(sums[o + 1], den, 1e-12 * (1 + den)) << "b " << i << " tile " << t;
    }
  // Tile 1 of batch row 0 alone (rows 4..7 as a 4-row shard) gives the same bits.
  std::vector<float> c1(cur.begin() + 4 * d, cur.begin() + 8 * d);
  std::vector<float> p1(prev.begin() + 4 * d, prev.begin() + 8 * d);
  Tensor tc1 = Make({1, tile, d}, c1), tp1 = Make({1, tile, d}, p1);
  double one[2];
  ASSERT_TRUE(backend_.TileAbsDiffSums(tc1, tp1, tile, tile, one).ok());
  EXPECT_EQ(one[0], sums[2]);
  EXPECT_EQ(one[1], sums[3]);
  // No valid rows: zeros.
  ASSERT_TRUE(backend_.TileAbsDiffSums(tc, tp, tile, 0, sums.data()).ok());
  for (double v : sums) EXPECT_EQ(v, 0.0);
  // Threads: the same bits.
  CpuBackend four(4);
  Tensor c4 = four.Empty({b, s, d}, DType::kF32).value();
  Tensor p4 = four.Empty({b, s, d}, DType::kF32).value();
  ASSERT_TRUE(four.CopyFromHost(cur.data(), &c4).ok());
  ASSERT_TRUE(four.CopyFromHost(prev.data(), &p4).ok());
  std::vector<double> s1(2 * b * (s / tile)), s4(s1.size());
  ASSERT_TRUE(backend_.TileAbsDiffSums(tc, tp, tile, valid, s1.data()).ok());
  ASSERT_TRUE(four.TileAbsDiffSums(c4, p4, tile, valid, s4.data()).ok());
  EXPECT_EQ(s1, s4);
}

TEST_F(CpuBackendTest, TileAbsDiffSumsRejectsBadArguments) {
  Tensor a = Zeros({1, 6, 3}), b = Zeros({1, 6, 3}), c = Zeros({1, 5, 3});
  double sums[12];
  auto msg = [](const absl::Status& st) { return std::string(st.message()); };
  absl::Status st = backend_.TileAbsDiffSums(a, b, 4, 6, sums);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(st).find("tile 4 does not divide S = 6"), std::string::npos) << st;
  st = backend_.TileAbsDiffSums(a, b, 3, 7, sums);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(st).find("valid_rows 7"), std::string::npos) << st;
  st = backend_.TileAbsDiffSums(a, c, 3, 6, sums);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(msg(st).find("'prev'"), std::string::npos) << st;
}

// the inverse path must restore each rank's original sequence shard.
TEST_F(CpuBackendTest, UlyssesPackUnpackRoundTrip) {
  for (int p : {1, 2, 4}) {
    const int b = 2, s = 3, h = 4, d = 2, hp = h / p;
    std::vector<std::vector<float>> q(p), k(p), v(p);
    std::vector<Tensor> send(p);
    for (int r = 0; r < p; ++r) {
      q[r] = Random(b * s * h * d, 100 + r);
      k[r] = Random(b * s * h * d, 200 + r);
      v[r] = Random(b * s * h * d, 300 + r);
      send[r] = Zeros({p, 3, b, s, hp, d});
      ASSERT_TRUE(backend_.PackQkv(Make({b, s, h, d}, q[r]), Make({b, s, h, d}, k[r]),
                                   Make({b, s, h, d}, v[r]), p, &send[r]).ok());
    }
    const size_t block = static_cast<size_t>(3 * b * s * hp * d);
    for (int r = 0; r < p; ++r) {
      std::vector<float> recv(block * p);
      for (int src = 0; src < p; ++src) {
        const auto sent = Host(send[src]);
        std::copy(sent.begin() + r * block, sent.begin() + (r + 1) * block,
                  recv.begin() + src * block);
      }
      Tensor qh = Zeros({b, p * s, hp, d}), kh = Zeros({b, p * s, hp, d}),
             vh = Zeros({b, p * s, hp, d});
      ASSERT_TRUE(backend_.UnpackQkv(Make({p, 3, b, s, hp, d}, recv), p, &qh, &kh, &vh).ok());
      const auto gq = Host(qh), gk = Host(kh), gv = Host(vh);
      // Head-sharded row (batch i, token src*S+t, local head j) = rank src's
      // row (i, t, head r*hp+j).
      for (int i = 0; i < b; ++i)
        for (int src = 0; src < p; ++src)
          for (int t = 0; t < s; ++t)
            for (int j = 0; j < hp; ++j)
              for (int c = 0; c < d; ++c) {
                const size_t got = ((static_cast<size_t>(i) * p * s + src * s + t) * hp + j) * d + c;
                const size_t want = ((static_cast<size_t>(i) * s + t) * h + r * hp + j) * d + c;
                ASSERT_EQ(gq[got], q[src][want]) << "p=" << p;
                ASSERT_EQ(gk[got], k[src][want]) << "p=" << p;
                ASSERT_EQ(gv[got], v[src][want]) << "p=" << p;
              }
    }
    // Output path: head-sharded o on every rank -> back to sequence shards.
    std::vector<std::vector<float>> oh(p);
    std::vector<Tensor> osend(p);
    for (int r = 0; r < p; ++r) {
      oh[r] = Random(b * p * s * hp * d, 400 + r);
      osend[r] = Zeros({p, b, s, hp, d});
      ASSERT_TRUE(backend_.PackOut(Make({b, p * s, hp, d}, oh[r]), p, &osend[r]).ok());
    }
    const size_t oblock = static_cast<size_t>(b * s * hp * d);
    for (int r = 0; r < p; ++r) {
      std::vector<float> recv(oblock * p);
      for (int src = 0; src < p; ++src) {
        const auto sent = Host(osend[src]);
        std::copy(sent.begin() + r * oblock, sent.begin() + (r + 1) * oblock,
                  recv.begin() + src * oblock);
      }
      Tensor o = Zeros({b, s, h, d});
      ASSERT_TRUE(backend_.UnpackOut(Make({p, b, s, hp, d}, recv), p, &o).ok());
      const auto go = Host(o);
      // Rank r's token t, head src*hp+j = rank src's head-sharded row
      // (i, r*S+t, j).
      for (int i = 0; i < b; ++i)
        for (int t = 0; t < s; ++t)
          for (int src = 0; src < p; ++src)
            for (int j = 0; j < hp; ++j)
              for (int c = 0; c < d; ++c) {
                const size_t got = ((static_cast<size_t>(i) * s + t) * h + src * hp + j) * d + c;
                const size_t want = ((static_cast<size_t>(i) * p * s + r * s + t) * hp + j) * d + c;
                ASSERT_EQ(go[got], oh[src][want]) << "p=" << p;
              }
    }
  }
  Tensor q = Zeros({1, 2, 3, 2}), send = Zeros({2, 3, 1, 2, 1, 2});
  EXPECT_FALSE(backend_.PackQkv(q, q, q, 2, &send).ok());  // 3 heads on 2 ranks
}

// The fused op is defined as RmsNormRope on q and k followed by PackQkv:
// bit-identical results, for 1, 2 and 4 destinations (world 1 = the stacked
// q', k', v that attention reads), and the shape errors name the op.
TEST_F(CpuBackendTest, RmsNormRopePackQkvEqualsRmsNormRopeThenPackQkv) {
  const int b = 2, s = 5, heads = 4, hd = 6, d = heads * hd, pairs = hd / 2;
  const auto q = Random(b * s * d, 40, 2.0f), k = Random(b * s * d, 41, 2.0f),
             v = Random(b * s * d, 42);
  const auto gq = Random(d, 43), gk = Random(d, 44);
  std::vector<float> rope(static_cast<size_t>(s * pairs * 2));
  const auto angles = Random(s * pairs, 45, 3.0f);
  for (size_t i = 0; i < angles.size(); ++i) {
    rope[2 * i] = std::cos(angles[i]);
    rope[2 * i + 1] = std::sin(angles[i]);
  }
  const Tensor tq = Make({b, s, d}, q), tk = Make({b, s, d}, k),
               tv = Make({b, s, d}, v), tgq = Make({d}, gq), tgk = Make({d}, gk),
               tr = Make({s, pairs, 2}, rope);
  const float eps = 1e-6f;
  for (int p : {1, 2, 4}) {
    Tensor qr = Zeros({b, s, d}), kr = Zeros({b, s, d});
    ASSERT_TRUE(backend_.RmsNormRope(tq, tgq, tr, heads, eps, &qr).ok());
    ASSERT_TRUE(backend_.RmsNormRope(tk, tgk, tr, heads, eps, &kr).ok());
    const Shape seq4 = {b, s, heads, hd};
    Tensor want = Zeros({p, 3, b, s, heads / p, hd});
    ASSERT_TRUE(backend_.PackQkv(qr.View(seq4), kr.View(seq4), tv.View(seq4), p,
                                 &want).ok());
    Tensor got = Zeros({p, 3, b, s, heads / p, hd});
    ASSERT_TRUE(backend_.RmsNormRopePackQkv(tq, tk, tv, tgq, tgk, tr, heads, eps,
                                            p, &got).ok());
    const auto w = Host(want), g = Host(got);
    ASSERT_EQ(w.size(), g.size());
    for (size_t i = 0; i < w.size(); ++i)
      ASSERT_EQ(g[i], w[i]) << "world " << p << " element " << i;
    if (p == 1) {  // q' and k' really are normalized and rotated
      const auto h = Host(qr);
      bool differs = false;
      for (size_t i = 0; i < h.size(); ++i) differs |= h[i] != q[i];
      EXPECT_TRUE(differs);
    }
  }
  Tensor send = Zeros({3, 3, b, s, 1, hd});
  absl::Status st =
      backend_.RmsNormRopePackQkv(tq, tk, tv, tgq, tgk, tr, heads, eps, 3, &send);
  EXPECT_FALSE(st.ok());  // 4 heads on 3 ranks
  Tensor small = Zeros({2, 3, b, s, 2, hd - 2});
  st = backend_.RmsNormRopePackQkv(tq, tk, tv, tgq, tgk, tr, heads, eps, 2, &small);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("send"), std::string::npos) << st;
}

TEST_F(CpuBackendTest, MemoryFillAndConversions) {
  const int64_t before = backend_.peak_memory_bytes();
  Tensor t = backend_.Empty({1000}, DType::kF32).value();
  EXPECT_GE(backend_.peak_memory_bytes(), before + 4000);
  ASSERT_TRUE(backend_.FillNormal(&t, 7, 9, 0.5f, 2.0f).ok());
  const auto got = Host(t);
  for (int i = 0; i < 1000; ++i)
    ASSERT_EQ(got[i], 0.5f + 2.0f * NormalAt(7, 9, static_cast<uint64_t>(i)));
  // f32 -> bf16 -> f32 through Copy rounds like F32ToBF16.
  Tensor bf = backend_.Empty({1000}, DType::kBF16).value();
  ASSERT_TRUE(backend_.Copy(t, &bf).ok());
  const auto back = Host(bf);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(back[i], BF16ToF32(F32ToBF16(got[i])));
  Tensor f16 = backend_.Empty({1000}, DType::kF16).value();
  ASSERT_TRUE(backend_.Copy(bf, &f16).ok());
  const auto half = Host(f16);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(half[i], F16ToF32(F32ToF16(back[i])));
}

TEST_F(CpuBackendTest, MarkersAndGraphs) {
  auto a = backend_.Mark().value();
  auto b = backend_.Mark().value();
  EXPECT_GE(backend_.ElapsedSeconds(*a, *b).value(), 0.0);
  int runs = 0;
  auto graph = backend_.Capture([&] {
    ++runs;
    return absl::OkStatus();
  });
  ASSERT_TRUE(graph.ok());
  EXPECT_EQ(runs, 1);
  ASSERT_TRUE((*graph)->Replay().ok());
  EXPECT_EQ(runs, 2);
}

TEST(CpuBackendThreadsTest, ThreadedOpsMatchSingleThreaded) {
  // The pool splits rows; results must not depend on the split.
  CpuBackend one(1), four(4);
  const int b = 2, s = 300, d = 128;
  auto x = Random(b * s * d, 30, 2.0f), mod = Random(b * 6 * d, 31);
  auto run = [&](CpuBackend& be) {
    Tensor tx = be.Empty({b, s, d}, DType::kF32).value();
    Tensor tm = be.Empty({b, 6, d}, DType::kF32).value();
    Tensor y = be.Empty({b, s, d}, DType::kF32).value();
    EXPECT_TRUE(be.CopyFromHost(x.data(), &tx).ok());
    EXPECT_TRUE(be.CopyFromHost(mod.data(), &tm).ok());
    EXPECT_TRUE(be.LayerNormModulate(tx, tm, 0, 1, 1e-6f, &y).ok());
    Tensor o = be.Empty({b, s, 4, 32}, DType::kF32).value();
    EXPECT_TRUE(be.Attention(y.View({b, s, 4, 32}), y.View({b, s, 4, 32}),
                             y.View({b, s, 4, 32}), s, 0.2f, &o).ok());
    std::vector<float> out(static_cast<size_t>(o.numel()));
    EXPECT_TRUE(be.CopyToHost(o, out.data()).ok());
    return out;
  };
  const auto r1 = run(one);
  const auto r4 = run(four);
  ASSERT_EQ(r1.size(), r4.size());
  double worst = 0;
  for (size_t i = 0; i < r1.size(); ++i)
    worst = std::max(worst, static_cast<double>(std::abs(r1[i] - r4[i])));
  EXPECT_LE(worst, 1e-5);
}

}  // namespace
}  // namespace dn::worker
