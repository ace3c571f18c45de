// The Wan2.1 DiT on the CPU backend against a naive double-precision
// re-implementation of ../shared/docs/wan-spec.md §3 written here from the
// spec (patchify, sinusoid, time/text embedders, blocks with RMS-across-heads
// + 3-axis interleaved RoPE, cross-attention, FFN, head, unpatchify), and the
// engine loop (one Euler step with CFG, on a real 1-rank Gloo group) against
// the same reference. Also: validation messages, stop flags, I2V refusal.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "comm/process_group.h"
#include "comm/store.h"
#include "gtest/gtest.h"
#include "worker/cpu/cpu_backend.h"
#include "worker/engine.h"
#include "worker/lora.h"
#include "worker/safetensors.h"
#include "worker/sampler.h"
#include "worker/wan_model.h"

namespace dn::worker {
namespace {

using Vec = std::vector<double>;

WanConfig SmallConfig() {
  WanConfig c;
  c.patch_size = {1, 2, 2};
  c.num_attention_heads = 2;
  c.attention_head_dim = 12;  // RoPE split 4 / 4 / 4 channels
  c.in_channels = 4;
  c.out_channels = 4;
  c.text_dim = 8;
  c.freq_dim = 16;
  c.ffn_dim = 20;
  c.num_layers = 2;
  c.eps = 1e-6;
  c.vae_stride = {4, 8, 8};
  return c;
}

// Every tensor of spec §2 with random values: an in-memory weight source.
class MapWeights : public WeightSource {
 public:
  explicit MapWeights(const WanConfig& c) : config_(c) {
    const int64_t d = c.inner_dim(), fd = c.ffn_dim;
    const int64_t pin = c.in_channels * 4, pout = c.out_channels * 4;
    std::mt19937 gen(1234);
    auto add = [&](const std::string& name, int64_t n, double mean, double std) {
      std::normal_distribution<double> dist(mean, std);
      std::vector<float>& v = tensors_[name];
      v.resize(static_cast<size_t>(n));
      for (float& x : v) x = static_cast<float>(dist(gen));
    };
    auto lin = [&](const std::string& name, int64_t out, int64_t in) {
      add(name + ".weight", out * in, 0.0, 1.0 / std::sqrt(static_cast<double>(in)));
      add(name + ".bias", out, 0.0, 0.1);
    };
    lin("patch_embedding", d, pin);
    lin("condition_embedder.time_embedder.linear_1", d, c.freq_dim);
    lin("condition_embedder.time_embedder.linear_2", d, d);
    lin("condition_embedder.time_proj", 6 * d, d);
    lin("condition_embedder.text_embedder.linear_1", d, c.text_dim);
    lin("condition_embedder.text_embedder.linear_2", d, d);
    add("scale_shift_table", 2 * d, 0.0, 0.3);
    lin("proj_out", pout, d);
    for (int i = 0; i < c.num_layers; ++i) {
      const std::string b = absl::StrCat("blocks.", i, ".");
      add(b + "scale_shift_table", 6 * d, 0.0, 0.3);
      for (const char* a : {"attn1", "attn2"}) {
        for (const char* p : {"to_q", "to_k", "to_v", "to_out.0"})
          lin(b + a + "." + p, d, d);
        add(b + a + ".norm_q.weight", d, 1.0, 0.2);
        add(b + a + ".norm_k.weight", d, 1.0, 0.2);
      }
      add(b + "norm2.weight", d, 1.0, 0.2);
      add(b + "norm2.bias", d, 0.0, 0.2);
      lin(b + "ffn.net.0.proj", fd, d);
      lin(b + "ffn.net.2", d, fd);
    }
  }
  const WanConfig& config() const override { return config_; }
  std::string description() const override { return "test weights"; }
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end()) return absl::NotFoundError(name);
    std::copy(it->second.begin(), it->second.end(), dst);
    return absl::OkStatus();
  }
  const std::vector<float>& at(const std::string& name) const {
    return tensors_.at(name);
  }
  WanConfig config_;

 private:
  std::map<std::string, std::vector<float>> tensors_;
};

// ---- naive reference (double) -------------------------------------------------

struct Reference {
  const MapWeights& w;
  const WanConfig& c;

  Vec Lin(const Vec& x, int64_t m, int64_t k, const std::string& name, int64_t n) const {
    const auto& wt = w.at(name + ".weight");
    const auto& b = w.at(name + ".bias");
    Vec y(static_cast<size_t>(m * n));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = b[j];
        for (int64_t q = 0; q < k; ++q) acc += x[i * k + q] * wt[j * k + q];
        y[i * n + j] = acc;
      }
    return y;
  }
  static double Gelu(double x) {
    return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
  }
  static double Silu(double x) { return x / (1 + std::exp(-x)); }
  // LN without affine over rows of d.
  Vec LN(const Vec& x, int64_t d) const {
    Vec y(x.size());
    for (size_t r = 0; r < x.size() / d; ++r) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < d; ++j) mean += x[r * d + j];
      mean /= d;
      for (int64_t j = 0; j < d; ++j) var += std::pow(x[r * d + j] - mean, 2);
      var /= d;
      for (int64_t j = 0; j < d; ++j)
        y[r * d + j] = (x[r * d + j] - mean) / std::sqrt(var + c.eps);
    }
    return y;
  }
  Vec Rms(const Vec& x, int64_t d, const std::string& weight) const {
    const auto& g = w.at(weight);
    Vec y(x.size());
    for (size_t r = 0; r < x.size() / d; ++r) {
      double sq = 0;
      for (int64_t j = 0; j < d; ++j) sq += x[r * d + j] * x[r * d + j];
      const double inv = 1 / std::sqrt(sq / d + c.eps);
      for (int64_t j = 0; j < d; ++j) y[r * d + j] = x[r * d + j] * inv * g[j];
    }
    return y;
  }
  // softmax(q k^T / sqrt(hd)) v per head; q [Lq, D], k/v [Lk, D].
  Vec Attn(const Vec& q, int64_t lq, const Vec& k, const Vec& v, int64_t lk) const {
    const int64_t heads = c.num_attention_heads, hd = c.attention_head_dim,
                  d = c.inner_dim();
    Vec o(static_cast<size_t>(lq * d));
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < lq; ++i) {
        Vec s(static_cast<size_t>(lk));
        double mx = -1e300;
        for (int64_t j = 0; j < lk; ++j) {
          double acc = 0;
          for (int64_t e = 0; e < hd; ++e) acc += q[i * d + h * hd + e] * k[j * d + h * hd + e];
          s[j] = acc / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (int64_t e = 0; e < hd; ++e) {
          double acc = 0;
          for (int64_t j = 0; j < lk; ++j) acc += s[j] / sum * v[j * d + h * hd + e];
          o[i * d + h * hd + e] = acc;
        }
      }
    return o;
  }
  // Spec §3 step 7, written per axis: channels [0,dt) frame, [dt,dt+dh)
  // height, [dt+dh, hd) width; pair (2k,2k+1) rotated by pos*theta^(-2j/dim).
  void Rope(Vec* x, int64_t gh, int64_t gw) const {
    const int64_t hd = c.attention_head_dim, d = c.inner_dim();
    const int64_t dh = 2 * (hd / 6), dt = hd - 2 * dh;
    const int64_t l = static_cast<int64_t>(x->size()) / d;
    for (int64_t n = 0; n < l; ++n) {
      const int64_t pos[3] = {n / (gh * gw), (n / gw) % gh, n % gw};
      for (int64_t h = 0; h < c.num_attention_heads; ++h) {
        int64_t ch = 0;
        for (int axis = 0; axis < 3; ++axis) {
          const int64_t dim = axis == 0 ? dt : dh;
          for (int64_t j = 0; j < dim / 2; ++j, ch += 2) {
            const double phi = pos[axis] * std::pow(10000.0, -2.0 * j / dim);
            double& a = (*x)[n * d + h * hd + ch];
            double& b = (*x)[n * d + h * hd + ch + 1];
            const double a0 = a, b0 = b;
            a = a0 * std::cos(phi) - b0 * std::sin(phi);
            b = a0 * std::sin(phi) + b0 * std::cos(phi);
          }
        }
      }
    }
  }

  // v [C_out, F, H, W] for one batch element.
  Vec Forward(const std::vector<float>& latent, int64_t f, int64_t hgt, int64_t wid,
              double t, const std::vector<float>& text, int64_t tlen) const {
    const int64_t d = c.inner_dim(), cin = c.in_channels, cout = c.out_channels;
    const int64_t gh = hgt / 2, gw = wid / 2, l = f * gh * gw;
    // Patchify: (c, pt, ph, pw) with c slowest.
    Vec tok(static_cast<size_t>(l * cin * 4));
    for (int64_t n = 0; n < l; ++n) {
      const int64_t ff = n / (gh * gw), hh = (n / gw) % gh, ww = n % gw;
      for (int64_t ch = 0; ch < cin; ++ch)
        for (int y = 0; y < 2; ++y)
          for (int x = 0; x < 2; ++x)
            tok[n * cin * 4 + ch * 4 + y * 2 + x] =
                latent[((ch * f + ff) * hgt + hh * 2 + y) * wid + ww * 2 + x];
    }
    Vec xs = Lin(tok, l, cin * 4, "patch_embedding", d);
    // Timestep sinusoid: [cos, sin] of t * exp(-ln(1e4) j / half).
    const int64_t half = c.freq_dim / 2;
    Vec sin_t(static_cast<size_t>(c.freq_dim));
    for (int64_t j = 0; j < half; ++j) {
      const double om = std::exp(-std::log(10000.0) * j / half);
      sin_t[j] = std::cos(t * om);
      sin_t[half + j] = std::sin(t * om);
    }
    Vec temb = Lin(sin_t, 1, c.freq_dim, "condition_embedder.time_embedder.linear_1", d);
    for (double& v : temb) v = Silu(v);
    temb = Lin(temb, 1, d, "condition_embedder.time_embedder.linear_2", d);
    Vec st = temb;
    for (double& v : st) v = Silu(v);
    const Vec tproj = Lin(st, 1, d, "condition_embedder.time_proj", 6 * d);
    Vec ctx(text.begin(), text.end());
    ctx = Lin(ctx, tlen, c.text_dim, "condition_embedder.text_embedder.linear_1", d);
    for (double& v : ctx) v = Gelu(v);
    ctx = Lin(ctx, tlen, d, "condition_embedder.text_embedder.linear_2", d);

    for (int i = 0; i < c.num_layers; ++i) {
      const std::string b = absl::StrCat("blocks.", i, ".");
      const auto& sst = w.at(b + "scale_shift_table");
      auto e = [&](int k, int64_t j) { return sst[k * d + j] + tproj[k * d + j]; };
      Vec h = LN(xs, d);
      for (int64_t n = 0; n < l; ++n)
        for (int64_t j = 0; j < d; ++j)
          h[n * d + j] = h[n * d + j] * (1 + e(1, j)) + e(0, j);
      Vec q = Rms(Lin(h, l, d, b + "attn1.to_q", d), d, b + "attn1.norm_q.weight");
      Vec k = Rms(Lin(h, l, d, b + "attn1.to_k", d), d, b + "attn1.norm_k.weight");
      const Vec v = Lin(h, l, d, b + "attn1.to_v", d);
      Rope(&q, gh, gw);
      Rope(&k, gh, gw);
      const Vec a = Lin(Attn(q, l, k, v, l), l, d, b + "attn1.to_out.0", d);
      for (int64_t n = 0; n < l; ++n)
        for (int64_t j = 0; j < d; ++j) xs[n * d + j] += a[n * d + j] * e(2, j);
      Vec h2 = LN(xs, d);
      const auto& g2 = w.at(b + "norm2.weight");
      const auto& b2 = w.at(b + "norm2.bias");
      for (int64_t n = 0; n < l; ++n)
        for (int64_t j = 0; j < d; ++j) h2[n * d + j] = h2[n * d + j] * g2[j] + b2[j];
      const Vec qc = Rms(Lin(h2, l, d, b + "attn2.to_q", d), d, b + "attn2.norm_q.weight");
      const Vec kc = Rms(Lin(ctx, tlen, d, b + "attn2.to_k", d), d, b + "attn2.norm_k.weight");
      const Vec vc = Lin(ctx, tlen, d, b + "attn2.to_v", d);
      const Vec ca = Lin(Attn(qc, l, kc, vc, tlen), l, d, b + "attn2.to_out.0", d);
      for (size_t z = 0; z < xs.size(); ++z) xs[z] += ca[z];
      Vec h3 = LN(xs, d);
      for (int64_t n = 0; n < l; ++n)
        for (int64_t j = 0; j < d; ++j)
          h3[n * d + j] = h3[n * d + j] * (1 + e(4, j)) + e(3, j);
      Vec ff = Lin(h3, l, d, b + "ffn.net.0.proj", c.ffn_dim);
      for (double& x : ff) x = Gelu(x);
      const Vec f2 = Lin(ff, l, c.ffn_dim, b + "ffn.net.2", d);
      for (int64_t n = 0; n < l; ++n)
        for (int64_t j = 0; j < d; ++j) xs[n * d + j] += f2[n * d + j] * e(5, j);
    }
    // Head: shift = sst[0] + temb, scale = sst[1] + temb.
    const auto& hs = w.at("scale_shift_table");
    Vec y = LN(xs, d);
    for (int64_t n = 0; n < l; ++n)
      for (int64_t j = 0; j < d; ++j)
        y[n * d + j] = y[n * d + j] * (1 + hs[d + j] + temb[j]) + hs[j] + temb[j];
    const Vec out = Lin(y, l, d, "proj_out", cout * 4);
    // Unpatchify: index ((pt*2+ph)*2+pw)*C_out + c.
    Vec vout(static_cast<size_t>(cout * f * hgt * wid));
    for (int64_t n = 0; n < l; ++n) {
      const int64_t ff = n / (gh * gw), hh = (n / gw) % gh, ww = n % gw;
      for (int y2 = 0; y2 < 2; ++y2)
        for (int x2 = 0; x2 < 2; ++x2)
          for (int64_t ch = 0; ch < cout; ++ch)
            vout[((ch * f + ff) * hgt + hh * 2 + y2) * wid + ww * 2 + x2] =
                out[n * cout * 4 + (y2 * 2 + x2) * cout + ch];
    }
    return vout;
  }
};

std::vector<float> RandomVec(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

Tensor HostTensor(const Shape& shape, const std::vector<float>& values) {
  Tensor t = Tensor::Host(shape);
  std::copy(values.begin(), values.end(), t.data_as<float>());
  return t;
}

double MaxRelErr(const float* got, const Vec& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
  return worst;
}

// A size-1 Gloo group pair in a fresh temp folder.
struct Groups {
  std::string dir;
  std::unique_ptr<comm::Store> store;
  std::unique_ptr<comm::ProcessGroup> data, control;
};
Groups MakeGroups() {
  Groups g;
  char tmpl[] = "/tmp/dn_model_test_XXXXXX";
  g.dir = mkdtemp(tmpl);
  g.store = comm::MakeFileStore(g.dir).value();
  comm::GlooOptions o;
  o.prefix = "data";
  g.data = comm::MakeGlooProcessGroup(*g.store, o).value();
  o.prefix = "ctl";
  g.control = comm::MakeGlooProcessGroup(*g.store, o).value();
  return g;
}

constexpr int64_t kF = 2, kH = 4, kW = 6;  // latent; token grid 2 x 2 x 3
constexpr double kTol = 2e-5;  // fp32 model vs double reference (relative; seen ~2e-6)

TEST(WanModelTest, ForwardMatchesNaiveReference) {
  const WanConfig c = SmallConfig();
  MapWeights weights(c);
  CpuBackend backend(1);
  auto model = WanModel::Load(weights, backend, 1, 0);
  ASSERT_TRUE(model.ok()) << model.status();
  ModelShape shape{2, kF, kH / 2, kW / 2};
  ASSERT_TRUE((*model)->Plan(shape).ok());
  const auto latent = RandomVec(c.in_channels * kF * kH * kW, 1);
  const auto text0 = RandomVec(5 * c.text_dim, 2);  // cond: 5 tokens
  const auto text1 = RandomVec(3 * c.text_dim, 3);  // uncond: 3 tokens
  Tensor e0 = HostTensor({5, c.text_dim}, text0), e1 = HostTensor({3, c.text_dim}, text1);
  ASSERT_TRUE((*model)->SetContext({&e0, &e1}).ok());
  const double t = 937.0;
  Reference ref{weights, c};
  const Vec want0 = ref.Forward(latent, kF, kH, kW, t, text0, 5);
  const Vec want1 = ref.Forward(latent, kF, kH, kW, t, text1, 3);
  for (bool graph : {false, true, true}) {
    ASSERT_TRUE((*model)->UploadInputs(latent.data(), t).ok());
    ASSERT_TRUE((*model)->Forward(nullptr, nullptr, graph).ok());
    const Tensor& out = (*model)->output();
    // Rows are padded to the backend's shard alignment; the first L are tokens.
    const int64_t l = kF * (kH / 2) * (kW / 2);
    ASSERT_EQ(out.shape(), (Shape{2, (*model)->shard(), 16}));
    ASSERT_EQ((*model)->shard() % backend.shard_alignment(), 0);
    ASSERT_GE((*model)->shard(), l);
    const int64_t stride = out.dim(1);
    for (int b = 0; b < 2; ++b) {
      const Vec& want = b == 0 ? want0 : want1;
      const float* rows = out.data_as<float>() + b * stride * 16;
      std::vector<float> v(want.size());
      for (int64_t n = 0; n < l; ++n) {
        const int64_t ff = n / 6, hh = (n / 3) % 2, ww = n % 3;
        for (int y = 0; y < 2; ++y)
          for (int x = 0; x < 2; ++x)
            for (int ch = 0; ch < 4; ++ch)
              v[((ch * kF + ff) * kH + hh * 2 + y) * kW + ww * 2 + x] =
                  rows[n * 16 + (y * 2 + x) * 4 + ch];
      }
      EXPECT_LE(MaxRelErr(v.data(), want), kTol) << "batch " << b << " graph " << graph;
    }
  }
}

TEST(EngineTest, OneEulerStepWithGuidanceMatchesReference) {
  const WanConfig c = SmallConfig();
  MapWeights weights(c);
  CpuBackend backend(1);
  Groups g = MakeGroups();
  auto engine = Engine::Create(weights, backend, *g.data, *g.control, EngineOptions{});
  ASSERT_TRUE(engine.ok()) << engine.status();
  const auto latent = RandomVec(c.in_channels * kF * kH * kW, 4);
  const auto text = RandomVec(7 * c.text_dim, 5);
  const auto neg = RandomVec(4 * c.text_dim, 6);
  GenerateParams p;
  p.latent = {c.in_channels, static_cast<int>(kF), static_cast<int>(kH), static_cast<int>(kW)};
  p.steps = 1;
  p.guidance = 3.5;
  p.scheduler = SchedulerKind::kEuler;
  p.shift = 3.0;
  p.prompt_embeds = HostTensor({7, c.text_dim}, text);
  p.negative_embeds = HostTensor({4, c.text_dim}, neg);
  p.initial_latents = HostTensor({c.in_channels, kF, kH, kW}, latent);
  int calls = 0;
  auto out = (*engine)->Generate(p, [&](const StepStats& s) {
    ++calls;
    EXPECT_EQ(s.total, 1);
    EXPECT_GE(s.seconds, 0.0);
    EXPECT_EQ(s.alltoall_seconds, 0.0);  // one rank: no all-to-all
  }, nullptr);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(calls, 1);
  auto sampler = Sampler::Create(SchedulerKind::kEuler, 1, 3.0).value();
  const double sigma0 = sampler->sigmas()[0], sigma1 = sampler->sigmas()[1];
  Reference ref{weights, c};
  const Vec vc = ref.Forward(latent, kF, kH, kW, sampler->timesteps()[0], text, 7);
  const Vec vu = ref.Forward(latent, kF, kH, kW, sampler->timesteps()[0], neg, 4);
  Vec want(latent.size());
  for (size_t i = 0; i < want.size(); ++i)
    want[i] = latent[i] + (sigma1 - sigma0) * (vu[i] + 3.5 * (vc[i] - vu[i]));
  EXPECT_LE(MaxRelErr(out->data_as<float>(), want), kTol);

  // A missing negative prompt means zeros of the prompt's shape.
  p.negative_embeds = Tensor();
  auto implicit = (*engine)->Generate(p, nullptr, nullptr);
  p.negative_embeds = Tensor::Host({7, c.text_dim});
  auto explicit_zeros = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(implicit.ok() && explicit_zeros.ok());
  for (int64_t i = 0; i < implicit->numel(); ++i)
    ASSERT_EQ(implicit->data_as<float>()[i], explicit_zeros->data_as<float>()[i]);

  // CFG off (guidance 1): a batch of one, the cond branch only.
  p.guidance = 1.0;
  auto nocfg = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(nocfg.ok()) << nocfg.status();
  for (size_t i = 0; i < want.size(); ++i)
    want[i] = latent[i] + (sigma1 - sigma0) * vc[i];
  EXPECT_LE(MaxRelErr(nocfg->data_as<float>(), want), kTol);
}

TEST(EngineTest, ValidationNamesTheField) {
  const WanConfig c = SmallConfig();
  MapWeights weights(c);
  CpuBackend backend(1);
  Groups g = MakeGroups();
  EngineOptions options;
  options.max_tokens = 12;
  auto engine = Engine::Create(weights, backend, *g.data, *g.control, options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerateParams good;
  good.latent = {4, 2, 4, 6};
  good.steps = 2;
  good.prompt_embeds = Tensor::Host({3, c.text_dim});
  ASSERT_TRUE((*engine)->Validate(good).ok());
  auto expect = [&](GenerateParams p, const std::string& field) {
    const absl::Status s = (*engine)->Validate(p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(std::string(s.message()).find(field), std::string::npos)
        << "'" << s.message() << "' does not name " << field;
  };
  GenerateParams p = good;
  p.steps = 0;
  expect(p, "steps");
  p = good;
  p.guidance = std::nan("");
  expect(p, "guidance_scale");
  p = good;
  p.shift = 0;
  expect(p, "shift");
  p = good;
  p.latent.channels = 16;
  expect(p, "latent_shape.channels");
  p = good;
  p.latent.height = 5;
  expect(p, "latent_shape.height");
  p = good;
  p.latent.width = 0;
  expect(p, "latent_shape.width");
  p = good;
  p.latent.frames = 4;  // 4 x 2 x 3 = 24 tokens > 12
  expect(p, "max_tokens");
  p = good;
  p.prompt_embeds = Tensor::Host({3, c.text_dim + 1});
  expect(p, "prompt_embeds");
  p = good;
  p.prompt_embeds = Tensor();
  expect(p, "prompt_embeds");
  p = good;
  p.negative_embeds = Tensor::Host({3, 2});
  expect(p, "negative_prompt_embeds");
  p = good;
  p.initial_latents = Tensor::Host({4, 2, 4, 5});
  expect(p, "initial_latents");
  // Generate refuses the same way, before any collective.
  p = good;
  p.steps = -1;
  EXPECT_EQ((*engine)->Generate(p, nullptr, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, StopsAtStepBoundary) {
  const WanConfig c = SmallConfig();
  MapWeights weights(c);
  CpuBackend backend(1);
  Groups g = MakeGroups();
  auto engine = Engine::Create(weights, backend, *g.data, *g.control, EngineOptions{});
  ASSERT_TRUE(engine.ok());
  GenerateParams p;
  p.latent = {4, 1, 2, 2};
  p.steps = 4;
  p.prompt_embeds = Tensor::Host({2, c.text_dim});
  StopFlag stop;
  stop.Request(absl::StatusCode::kCancelled);
  int calls = 0;
  auto r = (*engine)->Generate(p, [&](const StepStats&) { ++calls; }, &stop);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(calls, 1);
  p.deadline_unix_millis = 1;  // long past
  calls = 0;
  r = (*engine)->Generate(p, [&](const StepStats&) { ++calls; }, nullptr);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(calls, 1);
  p.deadline_unix_millis = 0;
  // Agreed stops leave the data group (and so the engine) usable.
  EXPECT_FALSE((*engine)->broken());
  auto warm = (*engine)->Warmup(p.latent, 3);
  ASSERT_TRUE(warm.ok()) << warm.status();
  EXPECT_GE(*warm, 0.0);
}

TEST(EngineTest, RefusesImageToVideo) {
  WanConfig c = SmallConfig();
  c.image_dim = 16;
  c.added_kv_proj_dim = 16;
  MapWeights weights(SmallConfig());
  weights.config_ = c;
  CpuBackend backend(1);
  Groups g = MakeGroups();
  auto engine = Engine::Create(weights, backend, *g.data, *g.control, EngineOptions{});
  ASSERT_EQ(engine.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(std::string(engine.status().message()).find("added_kv_proj_dim"), std::string::npos);
}


// Writes a rank-2 diffusers-named LoRA on three Linears of `c` to `path`.
void WriteTestLora(const WanConfig& c, const std::string& path, uint32_t seed,
                   int64_t bad_in = 0) {
  const auto targets = LoraTargets(c);
  std::vector<std::string> names;
  std::vector<std::vector<float>> data;
  std::vector<Shape> shapes;
  for (const char* mod : {"blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj", "blocks.0.attn2.to_k"}) {
    const auto [out, in] = targets.at(mod);
    names.push_back(absl::StrCat("transformer.", mod, ".lora_A.weight"));
    shapes.push_back({2, in + bad_in});
    data.push_back(RandomVec(static_cast<size_t>(2 * (in + bad_in)), seed++));
    names.push_back(absl::StrCat("transformer.", mod, ".lora_B.weight"));
    shapes.push_back({out, 2});
    data.push_back(RandomVec(static_cast<size_t>(2 * out), seed++));
  }
  std::vector<SafetensorsTensorRef> refs;
  for (size_t i = 0; i < names.size(); ++i)
    refs.push_back({names[i], DType::kF32, shapes[i], data[i].data()});
  ASSERT_TRUE(WriteSafetensors(path, refs).ok());
}

// Per-request LoRA (docs/MODELS.md §6): a request without LoRA is bit-identical
// before and after LoRA requests (base weights untouched), a LoRA changes the
// result, a file added after the engine started is listed and usable, and a
// bad file fails the request (naming file and tensor) without breaking the
// engine.
TEST(EngineTest, LoraRequestsLeaveTheBaseModelBitIdentical) {
  const WanConfig c = SmallConfig();
  MapWeights weights(c);
  CpuBackend backend(1);
  Groups g = MakeGroups();
  const std::string dir = g.dir + "/loras";
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  EngineOptions eo;
  eo.lora_dir = dir;
  auto engine = Engine::Create(weights, backend, *g.data, *g.control, eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_TRUE((*engine)->ListLoras().empty());
  WriteTestLora(c, dir + "/style.safetensors", 11);  // added after start
  WriteTestLora(c, dir + "/broken.safetensors", 21, /*bad_in=*/1);
  EXPECT_EQ((*engine)->ListLoras(), (std::vector<std::string>{"broken", "style"}));
  GenerateParams p;
  p.latent = {c.in_channels, static_cast<int>(kF), static_cast<int>(kH), static_cast<int>(kW)};
  p.steps = 4;  // graphs: captured at step 1, replayed after
  p.guidance = 3.0;
  p.prompt_embeds = HostTensor({5, c.text_dim}, RandomVec(5 * c.text_dim, 7));
  p.seed = 3;
  auto same = [](const Tensor& a, const Tensor& b) {
    return std::equal(a.data_as<float>(), a.data_as<float>() + a.numel(), b.data_as<float>());
  };
  auto base = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(base.ok()) << base.status();
  p.loras = {{"style", 0.7, -1}};
  auto with = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(with.ok()) << with.status();
  EXPECT_FALSE(same(*base, *with)) << "the LoRA changed nothing";
  p.loras = {{"broken", 1.0, -1}};
  auto bad = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("broken.safetensors"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("lora_A.weight"), std::string::npos) << bad.status();
  p.loras = {{"absent", 1.0, -1}};
  EXPECT_EQ((*engine)->Generate(p, nullptr, nullptr).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE((*engine)->broken());
  p.loras.clear();
  auto again = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(same(*base, *again)) << "a request without LoRA drifted after LoRA requests";
  // The same LoRA again gives the same result (no state carried over).
  p.loras = {{"style", 0.7, -1}};
  auto with2 = (*engine)->Generate(p, nullptr, nullptr);
  ASSERT_TRUE(with2.ok()) << with2.status();
  EXPECT_TRUE(same(*with, *with2));
}

TEST(EngineTest, LatentFromPixels) {
  WanConfig c = SmallConfig();
  c.in_channels = 16;
  auto s = LatentFromPixels(c, 81, 480, 832);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->channels, 16);
  EXPECT_EQ(s->frames, 21);
  EXPECT_EQ(s->height, 60);
  EXPECT_EQ(s->width, 104);
  EXPECT_EQ(TokenCount(c, *s), 32760);
  EXPECT_NE(std::string(LatentFromPixels(c, 80, 480, 832).status().message()).find("frames"),
            std::string::npos);
  EXPECT_NE(std::string(LatentFromPixels(c, 81, 472, 832).status().message()).find("height"),
            std::string::npos);
  EXPECT_NE(std::string(LatentFromPixels(c, 81, 480, 840).status().message()).find("width"),
            std::string::npos);
}

}  // namespace
}  // namespace dn::worker
