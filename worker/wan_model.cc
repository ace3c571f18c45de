#include "worker/wan_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/log.h"
#include "base/status_macros.h"

namespace dn::worker {

struct WanModel::Buffers {
  Tensor tokens;                       // [B*S, patch_in]
  // Time rows: B, or 2B for per-token timesteps (TI2V: rows [B, 2B) hold
  // t = 0, docs/MODELS.md §5).
  Tensor sinus;                        // [B|2B, freq_dim]
  Tensor temb_h, temb, temb_silu;      // [B|2B, D]
  Tensor tproj;                        // [B|2B, 6D]
  Tensor mod;                          // f32 [B|2B, 6, D]
  Tensor head_mod;                     // f32 [B|2B, 2, D]
  Tensor x, h, tmp, q, k, v, attn;     // [B, S, D]
  Tensor ffn;                          // [B*S, Fd]
  Tensor rope;                         // f32 [S, d/2, 2]
  Tensor send, recv;                   // [P, 3, B, S, H/P, d]
  Tensor qh, kh, vh, oh;               // [B, P*S, H/P, d]
  Tensor osend, orecv;                 // [P, B, S, H/P, d]
  Tensor out;                          // [B, S, patch_out]
  // Step cache (EnableStepCache): minus block 0's residual, the cached
  // residual of blocks 1..L-1 (negated), and -1 as a gate row.
  Tensor cache_r0, cache_rest;         // [B, S, D]
  Tensor cache_neg;                    // f32 [B, 1, D] of -1
  std::vector<float> tokens_host;      // [B*S, patch_in]
  std::vector<float> sinus_host;       // [B|2B, freq_dim]
};

struct WanModel::Context {
  std::vector<int64_t> lengths;  // T_b
  std::vector<int64_t> offsets;  // first row of batch b in the stacked text
  Tensor in;                     // [sum T, text_dim]
  Tensor hidden;                 // [sum T, D]
  Tensor ctx;                    // [sum T, D] (ctx' of spec §3 step 5)
  Tensor tmp;                    // [sum T, D]
  std::vector<Tensor> k, v;      // per layer [sum T, D]
};

namespace {

std::string BlockName(int i, const std::string& rest) {
  return absl::StrCat("blocks.", i, ".", rest);
}

}  // namespace

WanModel::WanModel(const WanConfig& config, Backend& backend, int world,
                   int rank)
    : config_(config),
      backend_(backend),
      world_(world),
      rank_(rank),
      act_(backend.compute_dtype()) {
  const char* fused = std::getenv("DN_FUSED_QKV_PACK");
  fused_qkv_pack_ = fused == nullptr || std::string(fused) != "0";
}

WanModel::~WanModel() = default;

int64_t WanModel::patch_in() const {
  return static_cast<int64_t>(config_.in_channels) * config_.patch_size[0] *
         config_.patch_size[1] * config_.patch_size[2];
}

int64_t WanModel::patch_out() const {
  return static_cast<int64_t>(config_.out_channels) * config_.patch_size[0] *
         config_.patch_size[1] * config_.patch_size[2];
}

absl::StatusOr<std::unique_ptr<WanModel>> WanModel::Load(
    const WeightSource& source, Backend& backend, int world, int rank) {
  const WanConfig& c = source.config();
  DN_RETURN_IF_ERROR(c.Validate());
  if (c.is_i2v() && c.added_kv_proj_dim != c.inner_dim())
    return absl::UnimplementedError(absl::StrCat(
        "config added_kv_proj_dim=", c.added_kv_proj_dim, " != the inner dim ", c.inner_dim(),
        " (every Wan I2V model projects the embedded image tokens from the inner dim)"));
  if (c.pos_embed_seq_len > 0)
    return absl::UnimplementedError(absl::StrCat(
        "config pos_embed_seq_len=", c.pos_embed_seq_len,
        " (FLF2V) is not supported"));
  if (c.qk_norm != "rms_norm_across_heads")
    return absl::UnimplementedError(absl::StrCat(
        "config qk_norm='", c.qk_norm,
        "' is not supported (only rms_norm_across_heads)"));
  if (!c.cross_attn_norm)
    return absl::UnimplementedError(
        "config cross_attn_norm=false is not supported (Wan2.1 uses true)");
  if (world < 1 || rank < 0 || rank >= world)
    return absl::InvalidArgumentError(
        absl::StrCat("rank ", rank, " outside a group of ", world));
  if (c.num_attention_heads % world != 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "num_attention_heads ", c.num_attention_heads,
        " does not divide by the sequence-parallel group size ", world,
        " (Ulysses shards heads; use a group size that divides the heads)"));
  if (c.attention_head_dim % 2 != 0 || c.attention_head_dim < 6)
    return absl::InvalidArgumentError(absl::StrCat(
        "attention_head_dim ", c.attention_head_dim, " must be even and >= 6"));
  if (c.freq_dim % 2 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("freq_dim ", c.freq_dim, " must be even"));
  std::unique_ptr<WanModel> model(new WanModel(c, backend, world, rank));
  DN_RETURN_IF_ERROR(model->LoadWeights(source));
  return model;
}

absl::StatusOr<Tensor> WanModel::LoadTensor(const WeightSource& source,
                                            const std::string& name,
                                            const Shape& shape, bool f32) {
  DN_ASSIGN_OR_RETURN(Tensor t,
                      backend_.Empty(shape, f32 ? DType::kF32 : act_));
  if (const RandomInit* init = source.random_init(name); init != nullptr) {
    DN_RETURN_IF_ERROR(
        backend_.FillNormal(&t, init->seed, init->stream, init->mean, init->std));
    return t;
  }
  const size_t n = static_cast<size_t>(NumElements(shape));
  if (host_scratch_.size() < n) host_scratch_.resize(n);
  absl::Status s = source.ReadF32(name, host_scratch_.data());
  if (!s.ok())
    return absl::Status(s.code(), absl::StrCat("loading tensor '", name,
                                               "': ", s.message()));
  DN_RETURN_IF_ERROR(backend_.CopyFromHost(host_scratch_.data(), &t));
  return t;
}

absl::Status WanModel::LoadWeights(const WeightSource& source) {
  const WanConfig& c = config_;
  const int64_t d = c.inner_dim();
  const int64_t fd = c.ffn_dim;
  const auto& p = c.patch_size;
  auto gemm = [&](Tensor* t, const std::string& name, const Shape& shape) {
    absl::StatusOr<Tensor> r = LoadTensor(source, name, shape, false);
    if (r.ok()) *t = *std::move(r);
    return r.status();
  };
  auto f32 = [&](Tensor* t, const std::string& name, const Shape& shape) {
    absl::StatusOr<Tensor> r = LoadTensor(source, name, shape, true);
    if (r.ok()) *t = *std::move(r);
    return r.status();
  };
  DN_RETURN_IF_ERROR(gemm(&patch_w_, "patch_embedding.weight",
                          {d, c.in_channels, p[0], p[1], p[2]}));
  patch_w_ = patch_w_.View({d, patch_in()});
  DN_RETURN_IF_ERROR(gemm(&patch_b_, "patch_embedding.bias", {d}));
  const std::string ce = "condition_embedder.";
  DN_RETURN_IF_ERROR(gemm(&te1_w_, ce + "time_embedder.linear_1.weight", {d, c.freq_dim}));
  DN_RETURN_IF_ERROR(gemm(&te1_b_, ce + "time_embedder.linear_1.bias", {d}));
  DN_RETURN_IF_ERROR(gemm(&te2_w_, ce + "time_embedder.linear_2.weight", {d, d}));
  DN_RETURN_IF_ERROR(gemm(&te2_b_, ce + "time_embedder.linear_2.bias", {d}));
  DN_RETURN_IF_ERROR(gemm(&tproj_w_, ce + "time_proj.weight", {6 * d, d}));
  DN_RETURN_IF_ERROR(gemm(&tproj_b_, ce + "time_proj.bias", {6 * d}));
  DN_RETURN_IF_ERROR(gemm(&txt1_w_, ce + "text_embedder.linear_1.weight", {d, c.text_dim}));
  DN_RETURN_IF_ERROR(gemm(&txt1_b_, ce + "text_embedder.linear_1.bias", {d}));
  DN_RETURN_IF_ERROR(gemm(&txt2_w_, ce + "text_embedder.linear_2.weight", {d, d}));
  DN_RETURN_IF_ERROR(gemm(&txt2_b_, ce + "text_embedder.linear_2.bias", {d}));
  DN_RETURN_IF_ERROR(f32(&head_sst_, "scale_shift_table", {1, 2, d}));
  DN_RETURN_IF_ERROR(gemm(&proj_w_, "proj_out.weight", {patch_out(), d}));
  DN_RETURN_IF_ERROR(gemm(&proj_b_, "proj_out.bias", {patch_out()}));
  if (c.is_i2v()) {
    const std::string ie = ce + "image_embedder.";
    const int64_t img = c.image_dim;
    DN_RETURN_IF_ERROR(f32(&img_n1_w_, ie + "norm1.weight", {img}));
    DN_RETURN_IF_ERROR(f32(&img_n1_b_, ie + "norm1.bias", {img}));
    DN_RETURN_IF_ERROR(gemm(&img_ff0_w_, ie + "ff.net.0.proj.weight", {img, img}));
    DN_RETURN_IF_ERROR(gemm(&img_ff0_b_, ie + "ff.net.0.proj.bias", {img}));
    DN_RETURN_IF_ERROR(gemm(&img_ff2_w_, ie + "ff.net.2.weight", {d, img}));
    DN_RETURN_IF_ERROR(gemm(&img_ff2_b_, ie + "ff.net.2.bias", {d}));
    DN_RETURN_IF_ERROR(f32(&img_n2_w_, ie + "norm2.weight", {d}));
    DN_RETURN_IF_ERROR(f32(&img_n2_b_, ie + "norm2.bias", {d}));
  }

  blocks_.resize(static_cast<size_t>(c.num_layers));
  for (int i = 0; i < c.num_layers; ++i) {
    Block& b = blocks_[static_cast<size_t>(i)];
    b.name = BlockName(i, "");
    auto n = [&](const std::string& rest) { return BlockName(i, rest); };
    DN_RETURN_IF_ERROR(f32(&b.sst, n("scale_shift_table"), {1, 6, d}));
    DN_RETURN_IF_ERROR(gemm(&b.q_w, n("attn1.to_q.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.q_b, n("attn1.to_q.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.k_w, n("attn1.to_k.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.k_b, n("attn1.to_k.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.v_w, n("attn1.to_v.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.v_b, n("attn1.to_v.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.o_w, n("attn1.to_out.0.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.o_b, n("attn1.to_out.0.bias"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm_q, n("attn1.norm_q.weight"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm_k, n("attn1.norm_k.weight"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.q2_w, n("attn2.to_q.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.q2_b, n("attn2.to_q.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.k2_w, n("attn2.to_k.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.k2_b, n("attn2.to_k.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.v2_w, n("attn2.to_v.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.v2_b, n("attn2.to_v.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.o2_w, n("attn2.to_out.0.weight"), {d, d}));
    DN_RETURN_IF_ERROR(gemm(&b.o2_b, n("attn2.to_out.0.bias"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm_q2, n("attn2.norm_q.weight"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm_k2, n("attn2.norm_k.weight"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm2_w, n("norm2.weight"), {d}));
    DN_RETURN_IF_ERROR(f32(&b.norm2_b, n("norm2.bias"), {d}));
    DN_RETURN_IF_ERROR(gemm(&b.ffn1_w, n("ffn.net.0.proj.weight"), {fd, d}));
    DN_RETURN_IF_ERROR(gemm(&b.ffn1_b, n("ffn.net.0.proj.bias"), {fd}));
    DN_RETURN_IF_ERROR(gemm(&b.ffn2_w, n("ffn.net.2.weight"), {d, fd}));
    DN_RETURN_IF_ERROR(gemm(&b.ffn2_b, n("ffn.net.2.bias"), {d}));
    if (c.is_i2v()) {
      DN_RETURN_IF_ERROR(gemm(&b.ak_w, n("attn2.add_k_proj.weight"), {d, d}));
      DN_RETURN_IF_ERROR(gemm(&b.ak_b, n("attn2.add_k_proj.bias"), {d}));
      DN_RETURN_IF_ERROR(gemm(&b.av_w, n("attn2.add_v_proj.weight"), {d, d}));
      DN_RETURN_IF_ERROR(gemm(&b.av_b, n("attn2.add_v_proj.bias"), {d}));
      DN_RETURN_IF_ERROR(f32(&b.norm_ak, n("attn2.norm_added_k.weight"), {d}));
    }
  }
  host_scratch_.clear();
  host_scratch_.shrink_to_fit();
  return backend_.Synchronize();
}

absl::Status WanModel::Plan(const ModelShape& shape) {
  if (buf_ != nullptr && shape == shape_) return absl::OkStatus();
  if (shape.batch < 1 || shape.grid_f < 1 || shape.grid_h < 1 ||
      shape.grid_w < 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "model plan: batch ", shape.batch, " and token grid ", shape.grid_f,
        "x", shape.grid_h, "x", shape.grid_w, " must be positive"));
  const int max_pos = config_.rope_max_seq_len;
  if (shape.grid_f > max_pos || shape.grid_h > max_pos || shape.grid_w > max_pos)
    return absl::InvalidArgumentError(absl::StrCat(
        "token grid ", shape.grid_f, "x", shape.grid_h, "x", shape.grid_w,
        " exceeds rope_max_seq_len ", max_pos, " on some axis"));
  DropGraphs();
  buf_.reset();  // free the old buffers before allocating new ones
  const int64_t b = shape.batch;
  const int64_t l = shape.tokens();
  const int64_t p = world_;
  const int64_t align = std::max<int64_t>(1, backend_.shard_alignment());
  const int64_t s = ((l + p - 1) / p + align - 1) / align * align;
  const int64_t d = config_.inner_dim();
  const int64_t heads = config_.num_attention_heads;
  const int64_t hd = config_.attention_head_dim;
  auto buf = std::make_unique<Buffers>();
  auto alloc = [&](Tensor* t, const Shape& sh, DType dt) {
    absl::StatusOr<Tensor> r = backend_.Empty(sh, dt);
    if (r.ok()) *t = *std::move(r);
    return r.status();
  };
  DN_RETURN_IF_ERROR(alloc(&buf->tokens, {b * s, patch_in()}, act_));
  const int64_t tb = config_.is_ti2v() ? 2 * b : b;  // time rows
  DN_RETURN_IF_ERROR(alloc(&buf->sinus, {tb, config_.freq_dim}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->temb_h, {tb, d}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->temb, {tb, d}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->temb_silu, {tb, d}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->tproj, {tb, 6 * d}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->mod, {tb, 6, d}, DType::kF32));
  DN_RETURN_IF_ERROR(alloc(&buf->head_mod, {tb, 2, d}, DType::kF32));
  for (Tensor* t : {&buf->x, &buf->h, &buf->tmp, &buf->q, &buf->k, &buf->v,
                    &buf->attn})
    DN_RETURN_IF_ERROR(alloc(t, {b, s, d}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->ffn, {b * s, config_.ffn_dim}, act_));
  DN_RETURN_IF_ERROR(alloc(&buf->out, {b, s, patch_out()}, act_));
  if (world_ > 1) {
    const int64_t hp = heads / p;
    DN_RETURN_IF_ERROR(alloc(&buf->send, {p, 3, b, s, hp, hd}, act_));
    DN_RETURN_IF_ERROR(alloc(&buf->recv, {p, 3, b, s, hp, hd}, act_));
    for (Tensor* t : {&buf->qh, &buf->kh, &buf->vh, &buf->oh})
      DN_RETURN_IF_ERROR(alloc(t, {b, p * s, hp, hd}, act_));
    DN_RETURN_IF_ERROR(alloc(&buf->osend, {p, b, s, hp, hd}, act_));
    DN_RETURN_IF_ERROR(alloc(&buf->orecv, {p, b, s, hp, hd}, act_));
  }

  // RoPE table of this rank's rows (spec §3 step 7): global token n = rank*S+s
  // -> (f, h, w); pairs [0, dt/2) frame, then height, then width. Padded rows
  // get the identity rotation.
  const int64_t pairs = hd / 2;
  const int64_t dh = 2 * (hd / 6), dt = hd - 2 * dh;
  std::vector<double> omega(static_cast<size_t>(pairs));
  std::vector<int> axis(static_cast<size_t>(pairs));
  for (int64_t k = 0; k < pairs; ++k) {
    int64_t j;
    int64_t dim;
    if (k < dt / 2) {
      axis[k] = 0, j = k, dim = dt;
    } else if (k < dt / 2 + dh / 2) {
      axis[k] = 1, j = k - dt / 2, dim = dh;
    } else {
      axis[k] = 2, j = k - dt / 2 - dh / 2, dim = dh;
    }
    omega[k] = std::pow(10000.0, -2.0 * static_cast<double>(j) /
                                     static_cast<double>(dim));
  }
  std::vector<float> rope(static_cast<size_t>(s * pairs * 2));
  const int64_t hw = static_cast<int64_t>(shape.grid_h) * shape.grid_w;
  for (int64_t si = 0; si < s; ++si) {
    const int64_t n = rank_ * s + si;
    const int64_t pos[3] = {n / hw, (n % hw) / shape.grid_w, n % shape.grid_w};
    for (int64_t k = 0; k < pairs; ++k) {
      float* cs = rope.data() + (si * pairs + k) * 2;
      if (n >= l) {
        cs[0] = 1.0f, cs[1] = 0.0f;
        continue;
      }
      const double angle = static_cast<double>(pos[axis[k]]) * omega[k];
      cs[0] = static_cast<float>(std::cos(angle));
      cs[1] = static_cast<float>(std::sin(angle));
    }
  }
  DN_RETURN_IF_ERROR(alloc(&buf->rope, {s, pairs, 2}, DType::kF32));
  DN_RETURN_IF_ERROR(backend_.CopyFromHost(rope.data(), &buf->rope));
  buf->tokens_host.assign(static_cast<size_t>(b * s * patch_in()), 0.0f);
  buf->sinus_host.assign(static_cast<size_t>(tb * config_.freq_dim), 0.0f);
  buf_ = std::move(buf);
  shape_ = shape;
  shard_ = s;
  return backend_.Synchronize();
}

void WanModel::ShareBuffers(const WanModel* donor) {
  if (donor == nullptr) {
    DropGraphs();
    buf_.reset();
    shape_ = ModelShape();
    shard_ = 0;
    return;
  }
  if (buf_ == donor->buf_ && shape_ == donor->shape_) return;
  DropGraphs();  // the graph reads the old buffers
  buf_ = donor->buf_;
  shape_ = donor->shape_;
  shard_ = donor->shard_;
}

absl::Status WanModel::SetLora(const std::map<std::string, LoraLowRank>& lora) {
  if (lora.empty() && lora_.empty()) return absl::OkStatus();  // keeps the graph
  DropGraphs();  // the graph holds the old set's ops (or none)
  lora_.clear();
  lora_t_ = Tensor();
  lora_d_ = Tensor();
  if (lora.empty()) return absl::OkStatus();
  const auto targets = LoraTargets(config_);
  std::map<std::string, LoraWeights> loaded;
  for (const auto& [mod, l] : lora) {
    auto it = targets.find(mod);
    if (it == targets.end())
      return absl::InvalidArgumentError(
          absl::StrCat("LoRA module ", mod, " is not a Linear of the model"));
    if (l.out != it->second.first || l.in != it->second.second || l.rank < 1 ||
        static_cast<int64_t>(l.down.size()) != l.rank * l.in ||
        static_cast<int64_t>(l.up.size()) != l.out * l.rank ||
        (!l.bias.empty() && static_cast<int64_t>(l.bias.size()) != l.out))
      return absl::InvalidArgumentError(absl::StrCat(
          "LoRA module ", mod, ": factors of rank ", l.rank, " for [", l.out, ", ", l.in,
          "] do not fit the model's [", it->second.first, ", ", it->second.second, "]"));
    LoraWeights w;
    DN_ASSIGN_OR_RETURN(w.down, backend_.Empty({l.rank, l.in}, act_));
    DN_RETURN_IF_ERROR(backend_.CopyFromHost(l.down.data(), &w.down));
    DN_ASSIGN_OR_RETURN(w.up, backend_.Empty({l.out, l.rank}, act_));
    DN_RETURN_IF_ERROR(backend_.CopyFromHost(l.up.data(), &w.up));
    if (!l.bias.empty()) {
      DN_ASSIGN_OR_RETURN(w.bias, backend_.Empty({l.out}, act_));
      DN_RETURN_IF_ERROR(backend_.CopyFromHost(l.bias.data(), &w.bias));
    }
    loaded.emplace(mod, std::move(w));
  }
  lora_ = std::move(loaded);
  return backend_.Synchronize();
}

absl::Status WanModel::Lin(const std::string& module, const Tensor& x, const Tensor& w,
                           const Tensor* bias, Activation act, Tensor* y) {
  if (lora_.empty()) return backend_.Linear(x, w, bias, act, y);
  auto it = lora_.find(module);
  if (it == lora_.end()) return backend_.Linear(x, w, bias, act, y);
  const LoraWeights& l = it->second;
  const int64_t in = w.dim(1), out = w.dim(0), r = l.down.dim(0);
  const int64_t m = x.numel() / in;
  // Scratch grows on eager calls only: the first forward of a set (and
  // SetContext) is never captured.
  if (!lora_t_.defined() || lora_t_.numel() < m * r) {
    DN_ASSIGN_OR_RETURN(lora_t_, backend_.Empty({m * r}, act_));
  }
  if (!lora_d_.defined() || lora_d_.numel() < m * out) {
    DN_ASSIGN_OR_RETURN(lora_d_, backend_.Empty({m * out}, act_));
  }
  Tensor t = lora_t_.Rows(0, m * r).View({m, r});
  Tensor d = lora_d_.Rows(0, m * out).View(y->shape());
  DN_RETURN_IF_ERROR(backend_.Linear(x, w, bias, Activation::kNone, y));
  DN_RETURN_IF_ERROR(backend_.Linear(x, l.down, nullptr, Activation::kNone, &t));
  DN_RETURN_IF_ERROR(backend_.Linear(t, l.up, l.bias.defined() ? &l.bias : nullptr,
                                     Activation::kNone, &d));
  DN_RETURN_IF_ERROR(backend_.AddInPlace(y, d));
  if (act == Activation::kGeluTanh) return backend_.GeluTanh(*y, y);
  return absl::OkStatus();
}

absl::Status WanModel::SetImageContext(const Tensor* image) {
  if (image == nullptr) {
    if (img_ctx_ != nullptr) DropGraphs();
    img_ctx_.reset();
    return absl::OkStatus();
  }
  if (!config_.is_i2v())
    return absl::InvalidArgumentError("image_embeds: the model has no image branch (image_dim unset)");
  if (!image->defined() || image->device() != Device::kCpu || image->dtype() != DType::kF32 ||
      image->rank() != 2 || image->dim(0) < 1 || image->dim(1) != config_.image_dim)
    return absl::InvalidArgumentError(absl::StrCat(
        "image_embeds must be host f32 [N, image_dim = ", config_.image_dim, "], got ",
        image->defined() ? image->DebugString() : "none"));
  const int64_t n = image->dim(0), d = config_.inner_dim(), di = config_.image_dim;
  if (img_ctx_ == nullptr || img_ctx_->tokens != n) {
    DropGraphs();  // the graph reads the old image buffers
    img_ctx_.reset();
    auto ic = std::make_unique<ImageContext>();
    ic->tokens = n;
    auto alloc = [&](Tensor* t, const Shape& sh) {
      absl::StatusOr<Tensor> r = backend_.Empty(sh, act_);
      if (r.ok()) *t = *std::move(r);
      return r.status();
    };
    DN_RETURN_IF_ERROR(alloc(&ic->in, {n, di}));
    DN_RETURN_IF_ERROR(alloc(&ic->hidden, {n, di}));
    DN_RETURN_IF_ERROR(alloc(&ic->img, {n, d}));
    DN_RETURN_IF_ERROR(alloc(&ic->tmp, {n, d}));
    ic->k.resize(blocks_.size());
    ic->v.resize(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i) {
      DN_RETURN_IF_ERROR(alloc(&ic->k[i], {n, d}));
      DN_RETURN_IF_ERROR(alloc(&ic->v[i], {n, d}));
    }
    img_ctx_ = std::move(ic);
  }
  ImageContext& ic = *img_ctx_;
  DN_RETURN_IF_ERROR(backend_.CopyFromHost(image->data_as<float>(), &ic.in));
  // Image embedder (docs/MODELS.md §4): LN(1e-5) -> Linear -> erf GELU ->
  // Linear -> LN(1e-5), per token.
  const std::string ie = "condition_embedder.image_embedder.";
  DN_RETURN_IF_ERROR(backend_.LayerNormAffine(ic.in, img_n1_w_, img_n1_b_, 1e-5f, &ic.hidden));
  DN_RETURN_IF_ERROR(
      Lin(ie + "ff.net.0.proj", ic.hidden, img_ff0_w_, &img_ff0_b_, Activation::kNone, &ic.in));
  DN_RETURN_IF_ERROR(backend_.GeluErf(ic.in, &ic.hidden));
  DN_RETURN_IF_ERROR(
      Lin(ie + "ff.net.2", ic.hidden, img_ff2_w_, &img_ff2_b_, Activation::kNone, &ic.tmp));
  DN_RETURN_IF_ERROR(backend_.LayerNormAffine(ic.tmp, img_n2_w_, img_n2_b_, 1e-5f, &ic.img));
  const float eps = static_cast<float>(config_.eps);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& blk = blocks_[i];
    // ki = RMS_D(img Wak^T + b) * g_added_k ; vi = img Wav^T + b
    DN_RETURN_IF_ERROR(Lin(blk.name + "attn2.add_k_proj", ic.img, blk.ak_w, &blk.ak_b,
                           Activation::kNone, &ic.tmp));
    DN_RETURN_IF_ERROR(backend_.RmsNorm(ic.tmp, blk.norm_ak, eps, &ic.k[i]));
    DN_RETURN_IF_ERROR(Lin(blk.name + "attn2.add_v_proj", ic.img, blk.av_w, &blk.av_b,
                           Activation::kNone, &ic.v[i]));
  }
  return absl::OkStatus();
}

absl::Status WanModel::SetContext(const std::vector<const Tensor*>& embeds) {
  if (embeds.empty())
    return absl::InvalidArgumentError("model context: no text embeddings");
  std::vector<int64_t> lengths;
  for (size_t b = 0; b < embeds.size(); ++b) {
    const Tensor* e = embeds[b];
    if (e == nullptr || !e->defined() || e->device() != Device::kCpu ||
        e->dtype() != DType::kF32 || e->rank() != 2 ||
        e->dim(1) != config_.text_dim || e->dim(0) < 1)
      return absl::InvalidArgumentError(absl::StrCat(
          "text embeddings of batch ", b, " must be host f32 [T, ",
          config_.text_dim, "] with T >= 1, got ",
          e != nullptr && e->defined() ? e->DebugString() : "none"));
    lengths.push_back(e->dim(0));
  }
  const int64_t d = config_.inner_dim();
  int64_t total = 0;
  for (int64_t t : lengths) total += t;
  if (ctx_ == nullptr || ctx_->lengths != lengths) {
    DropGraphs();  // the graph reads the old context buffers
    ctx_.reset();
    auto ctx = std::make_unique<Context>();
    ctx->lengths = lengths;
    int64_t off = 0;
    for (int64_t t : lengths) {
      ctx->offsets.push_back(off);
      off += t;
    }
    auto alloc = [&](Tensor* t, const Shape& sh) {
      absl::StatusOr<Tensor> r = backend_.Empty(sh, act_);
      if (r.ok()) *t = *std::move(r);
      return r.status();
    };
    DN_RETURN_IF_ERROR(alloc(&ctx->in, {total, config_.text_dim}));
    DN_RETURN_IF_ERROR(alloc(&ctx->hidden, {total, d}));
    DN_RETURN_IF_ERROR(alloc(&ctx->ctx, {total, d}));
    DN_RETURN_IF_ERROR(alloc(&ctx->tmp, {total, d}));
    ctx->k.resize(blocks_.size());
    ctx->v.resize(blocks_.size());
    for (size_t i = 0; i < blocks_.size(); ++i) {
      DN_RETURN_IF_ERROR(alloc(&ctx->k[i], {total, d}));
      DN_RETURN_IF_ERROR(alloc(&ctx->v[i], {total, d}));
    }
    ctx_ = std::move(ctx);
  }
  Context& c = *ctx_;
  for (size_t b = 0; b < embeds.size(); ++b) {
    Tensor rows = c.in.Rows(c.offsets[b], c.offsets[b] + lengths[b]);
    DN_RETURN_IF_ERROR(backend_.CopyFromHost(embeds[b]->data_as<float>(), &rows));
  }
  for (size_t b = 0; b < embeds.size(); ++b)
    DN_RETURN_IF_ERROR(BranchContext(c.offsets[b], c.offsets[b] + lengths[b]));
  return absl::OkStatus();
}

absl::Status WanModel::BranchContext(int64_t begin, int64_t end) {
  // One branch's text rows [begin, end) of the stacked context, in calls of
  // their own: a branch's rows then sit at the same place of the same GEMM
  // calls whether the batch holds one branch or both (CFG-parallel halves
  // run one; docs/ENGINE.md, rank invariance).
  Context& c = *ctx_;
  auto rows = [&](const Tensor& t) { return t.Rows(begin, end); };
  // ctx' = Linear_2(GELU_tanh(Linear_1(ctx)))  (spec §3 step 5)
  Tensor in = rows(c.in), hidden = rows(c.hidden), ctx = rows(c.ctx),
         tmp = rows(c.tmp);
  DN_RETURN_IF_ERROR(Lin("condition_embedder.text_embedder.linear_1", in, txt1_w_, &txt1_b_,
                         Activation::kGeluTanh, &hidden));
  DN_RETURN_IF_ERROR(Lin("condition_embedder.text_embedder.linear_2", hidden, txt2_w_, &txt2_b_,
                         Activation::kNone, &ctx));
  const float eps = static_cast<float>(config_.eps);
  for (size_t i = 0; i < blocks_.size(); ++i) {
    const Block& blk = blocks_[i];
    // kc = RMS_D(ctx' Wk2^T + b) * g_k2 ; vc = ctx' Wv2^T + b
    Tensor k = rows(c.k[i]), v = rows(c.v[i]);
    DN_RETURN_IF_ERROR(
        Lin(BlockName(static_cast<int>(i), "attn2.to_k"), ctx, blk.k2_w, &blk.k2_b,
            Activation::kNone, &tmp));
    DN_RETURN_IF_ERROR(backend_.RmsNorm(tmp, blk.norm_k2, eps, &k));
    DN_RETURN_IF_ERROR(Lin(BlockName(static_cast<int>(i), "attn2.to_v"), ctx, blk.v2_w,
                           &blk.v2_b, Activation::kNone, &v));
  }
  return absl::OkStatus();
}

absl::Status WanModel::UploadInputs(const float* latent, double timestep,
                                    int64_t zero_t_tokens) {
  if (buf_ == nullptr)
    return absl::FailedPreconditionError("model: UploadInputs before Plan");
  if (zero_t_tokens < 0 || zero_t_tokens > shape_.tokens() ||
      (zero_t_tokens > 0 && !config_.is_ti2v()))
    return absl::InvalidArgumentError(absl::StrCat(
        "model: ", zero_t_tokens, " tokens with t = 0 (per-token timesteps need "
        "expand_timesteps and at most the ", shape_.tokens(), " tokens)"));
  // This rank's leading rows among the t = 0 tokens (token-local: each rank
  // modulates its own tokens, docs/MODELS.md §5).
  zero_rows_ = std::clamp<int64_t>(zero_t_tokens - rank_ * shard_, 0, shard_);
  Buffers& b = *buf_;
  const int pt = config_.patch_size[0], ph = config_.patch_size[1],
            pw = config_.patch_size[2];
  const int64_t gh = shape_.grid_h, gw = shape_.grid_w;
  const int64_t frames = static_cast<int64_t>(shape_.grid_f) * pt;
  const int64_t height = gh * ph, width = gw * pw;
  const int64_t l = shape_.tokens();
  const int64_t cp = patch_in();
  const int64_t begin = rank_ * shard_;
  const int64_t end = std::min(l, begin + shard_);
  // Patch vector of token n, flattened (c, pt, ph, pw) with c slowest.
  for (int64_t n = begin; n < end; ++n) {
    const int64_t f = n / (gh * gw), hh = (n / gw) % gh, ww = n % gw;
    float* row = b.tokens_host.data() + (n - begin) * cp;
    int64_t idx = 0;
    for (int64_t c = 0; c < config_.in_channels; ++c)
      for (int a = 0; a < pt; ++a)
        for (int y = 0; y < ph; ++y) {
          const float* src = latent + ((c * frames + f * pt + a) * height +
                                       hh * ph + y) * width + ww * pw;
          for (int x = 0; x < pw; ++x) row[idx++] = src[x];
        }
  }
  const size_t batch_elems = static_cast<size_t>(shard_ * cp);
  for (int bi = 1; bi < shape_.batch; ++bi)
    std::memcpy(b.tokens_host.data() + bi * batch_elems, b.tokens_host.data(),
                batch_elems * sizeof(float));
  DN_RETURN_IF_ERROR(backend_.CopyFromHost(b.tokens_host.data(), &b.tokens));

  // Sinusoid (spec §3 step 3, flip_sin_to_cos): [cos(t w_j), sin(t w_j)],
  // w_j = exp(-ln(10000) j / half), computed in double.
  const int half = config_.freq_dim / 2;
  for (int j = 0; j < half; ++j) {
    const double w = std::exp(-std::log(10000.0) * j / half);
    b.sinus_host[static_cast<size_t>(j)] = static_cast<float>(std::cos(timestep * w));
    b.sinus_host[static_cast<size_t>(half + j)] =
        static_cast<float>(std::sin(timestep * w));
  }
  for (int bi = 1; bi < shape_.batch; ++bi)
    std::memcpy(b.sinus_host.data() + bi * config_.freq_dim, b.sinus_host.data(),
                static_cast<size_t>(config_.freq_dim) * sizeof(float));
  if (config_.is_ti2v()) {
    // Rows [B, 2B): t = 0, i.e. [cos 0 = 1 ..., sin 0 = 0 ...].
    for (int bi = shape_.batch; bi < 2 * shape_.batch; ++bi) {
      float* row = b.sinus_host.data() + static_cast<size_t>(bi) * config_.freq_dim;
      std::fill(row, row + half, 1.0f);
      std::fill(row + half, row + config_.freq_dim, 0.0f);
    }
  }
  return backend_.CopyFromHost(b.sinus_host.data(), &b.sinus);
}

const Tensor& WanModel::output() const { return buf_->out; }

void WanModel::DropGraphs() {
  for (PartGraph& g : graphs_) g.graph.reset();
}

absl::Status WanModel::EnableStepCache() {
  if (buf_ == nullptr)
    return absl::FailedPreconditionError("model: EnableStepCache before Plan");
  Buffers& b = *buf_;
  if (b.cache_neg.defined()) return absl::OkStatus();
  const int64_t bs = shape_.batch, d = config_.inner_dim();
  DN_ASSIGN_OR_RETURN(b.cache_r0, backend_.Empty({bs, shard_, d}, act_));
  DN_ASSIGN_OR_RETURN(b.cache_rest, backend_.Empty({bs, shard_, d}, act_));
  DN_ASSIGN_OR_RETURN(b.cache_neg, backend_.Empty({bs, 1, d}, DType::kF32));
  const std::vector<float> neg(static_cast<size_t>(bs * d), -1.0f);
  DN_RETURN_IF_ERROR(backend_.CopyFromHost(neg.data(), &b.cache_neg));
  return backend_.Synchronize();
}

bool WanModel::step_cache_enabled() const {
  return buf_ != nullptr && buf_->cache_neg.defined();
}

const Tensor& WanModel::first_block_residual() const { return buf_->cache_r0; }

absl::Status WanModel::ForwardPart(Part part, comm::ProcessGroup* data,
                                   MarkerList* markers, bool use_graph) {
  if (buf_ == nullptr)
    return absl::FailedPreconditionError("model: Forward before Plan");
  if (ctx_ == nullptr ||
      static_cast<int>(ctx_->lengths.size()) != shape_.batch)
    return absl::FailedPreconditionError(absl::StrCat(
        "model: Forward needs text context for each of the ", shape_.batch,
        " batch rows (SetContext)"));
  if (world_ > 1 && data == nullptr)
    return absl::InvalidArgumentError("model: Forward with world > 1 needs a group");
  if (config_.is_i2v() && img_ctx_ == nullptr)
    return absl::FailedPreconditionError("model: an I2V model needs SetImageContext before Forward");
  if (part != Part::kAll && !step_cache_enabled())
    return absl::FailedPreconditionError("model: a forward part needs EnableStepCache");
  if (!use_graph) return RunPart(part, data, markers);
  if (markers != nullptr)
    return absl::InvalidArgumentError(
        "model: Forward with a graph takes no markers (run eagerly to time the "
        "all-to-alls)");
  comm::ProcessGroup* group = world_ > 1 ? data : nullptr;
  PartGraph& g = graphs_[static_cast<int>(part)];
  if (g.graph != nullptr && (g.group != group || g.zero_rows != zero_rows_ ||
                             g.attention_fp8 != attention_fp8_))
    g.graph.reset();
  if (g.graph == nullptr) {
    // Nothing of the group may be pending while the stream is captured
    // (earlier collectives done, so the watchdog has nothing to query).
    DN_RETURN_IF_ERROR(backend_.Synchronize());
    // Capture has the effect of running the body once (CPU runs it; CUDA
    // records it and launches the graph), so this step is done; that launch
    // is watched like a replay.
    absl::StatusOr<std::unique_ptr<Graph>> graph = backend_.Capture(
        [this, part, group] { return RunPart(part, group, nullptr); });
    DN_RETURN_IF_ERROR(graph.status());
    g.graph = *std::move(graph);
    g.group = group;
    g.zero_rows = zero_rows_;
    g.attention_fp8 = attention_fp8_;
    if (group != nullptr)
      return group->LaunchWatched([] { return absl::OkStatus(); });
    return absl::OkStatus();
  }
  Graph* graph = g.graph.get();
  if (group != nullptr)
    return group->LaunchWatched([graph] { return graph->Replay(); });
  return graph->Replay();
}

absl::Status WanModel::RunPart(Part part, comm::ProcessGroup* data,
                               MarkerList* markers) {
  Buffers& b = *buf_;
  switch (part) {
    case Part::kAll:
      return RunForward(data, markers);
    case Part::kFirstBlock:
      DN_RETURN_IF_ERROR(RunPrologue());
      DN_RETURN_IF_ERROR(backend_.Copy(b.x, &b.cache_r0));
      if (!blocks_.empty()) DN_RETURN_IF_ERROR(RunBlock(0, data, markers));
      // cache_r0 = x_before - x_after (negation and subtraction are exact).
      return backend_.GatedResidual(&b.cache_r0, b.x, b.cache_neg, 0);
    case Part::kRest:
      DN_RETURN_IF_ERROR(backend_.Copy(b.x, &b.cache_rest));
      for (size_t i = 1; i < blocks_.size(); ++i)
        DN_RETURN_IF_ERROR(RunBlock(i, data, markers));
      // cache_rest = x after block 0 - x after the last block.
      DN_RETURN_IF_ERROR(backend_.GatedResidual(&b.cache_rest, b.x, b.cache_neg, 0));
      return RunHead();
    case Part::kCached:
      // x = x after block 0 + (x after the last block - x after block 0) of
      // the last computed step.
      DN_RETURN_IF_ERROR(backend_.GatedResidual(&b.x, b.cache_rest, b.cache_neg, 0));
      return RunHead();
  }
  return absl::InvalidArgumentError("model: unknown forward part");
}

absl::Status WanModel::AllToAll(comm::ProcessGroup* data, const Tensor& send,
                                Tensor* recv, MarkerList* markers) {
  if (markers != nullptr) {
    DN_ASSIGN_OR_RETURN(auto m, backend_.Mark());
    markers->push_back(std::move(m));
  }
  DN_RETURN_IF_ERROR(data->AllToAll(send.data(), recv->data(),
                                    send.nbytes() / static_cast<size_t>(world_)));
  if (markers != nullptr) {
    DN_ASSIGN_OR_RETURN(auto m, backend_.Mark());
    markers->push_back(std::move(m));
  }
  return absl::OkStatus();
}

absl::Status WanModel::SelfAttention(const Block& blk, comm::ProcessGroup* data,
                                     MarkerList* markers) {
  Buffers& b = *buf_;
  const int64_t bs = shape_.batch, s = shard_;
  const int64_t heads = config_.num_attention_heads;
  const int64_t hd = config_.attention_head_dim;
  const float eps = static_cast<float>(config_.eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  // q = RoPE(RMS_D(h Wq^T + bq) * g_q), k likewise, v = h Wv^T + bv.
  const Shape seq4 = {bs, s, heads, hd};
  Tensor o4 = b.attn.View(seq4);
  if (world_ > 1 && fused_qkv_pack_) {
    // Projections, then norm + RoPE + destination-major pack in one pass.
    DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_q", b.h, blk.q_w, &blk.q_b, Activation::kNone, &b.q));
    DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_k", b.h, blk.k_w, &blk.k_b, Activation::kNone, &b.k));
    DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_v", b.h, blk.v_w, &blk.v_b, Activation::kNone, &b.v));
    DN_RETURN_IF_ERROR(backend_.RmsNormRopePackQkv(
        b.q, b.k, b.v, blk.norm_q, blk.norm_k, b.rope, static_cast<int>(heads),
        eps, world_, &b.send));
    return AttendPacked(data, markers, &o4);
  }
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_q", b.h, blk.q_w, &blk.q_b, Activation::kNone, &b.tmp));
  DN_RETURN_IF_ERROR(backend_.RmsNormRope(b.tmp, blk.norm_q, b.rope,
                                          static_cast<int>(heads), eps, &b.q));
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_k", b.h, blk.k_w, &blk.k_b, Activation::kNone, &b.tmp));
  DN_RETURN_IF_ERROR(backend_.RmsNormRope(b.tmp, blk.norm_k, b.rope,
                                          static_cast<int>(heads), eps, &b.k));
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_v", b.h, blk.v_w, &blk.v_b, Activation::kNone, &b.v));
  if (world_ == 1) {
    return SelfAttend(b.q.View(seq4), b.k.View(seq4), b.v.View(seq4), scale,
                      &o4);
  }
  DN_RETURN_IF_ERROR(backend_.PackQkv(b.q.View(seq4), b.k.View(seq4),
                                      b.v.View(seq4), world_, &b.send));
  return AttendPacked(data, markers, &o4);
}

absl::Status WanModel::ProbeAttentionFp8() {
  if (buf_ == nullptr) return absl::FailedPreconditionError("ProbeAttentionFp8 before Plan");
  Buffers& b = *buf_;
  const int64_t hd = config_.attention_head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  absl::Status s;
  if (world_ > 1) {
    s = backend_.AttentionFp8(b.qh, b.kh, b.vh, shape_.tokens(), scale, &b.oh);
  } else {
    const Shape seq4 = {shape_.batch, shard_, config_.num_attention_heads, hd};
    Tensor o4 = b.attn.View(seq4);
    s = backend_.AttentionFp8(b.q.View(seq4), b.k.View(seq4), b.v.View(seq4),
                              shape_.tokens(), scale, &o4);
  }
  DN_RETURN_IF_ERROR(s);
  return backend_.Synchronize();
}

absl::Status WanModel::SelfAttend(const Tensor& q, const Tensor& k,
                                  const Tensor& v, float scale, Tensor* o) {
  // Keys past shape_.tokens() are the shard padding.
  return attention_fp8_
             ? backend_.AttentionFp8(q, k, v, shape_.tokens(), scale, o)
             : backend_.Attention(q, k, v, shape_.tokens(), scale, o);
}

absl::Status WanModel::AttendPacked(comm::ProcessGroup* data,
                                    MarkerList* markers, Tensor* o4) {
  Buffers& b = *buf_;
  const int64_t hd = config_.attention_head_dim;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  DN_RETURN_IF_ERROR(AllToAll(data, b.send, &b.recv, markers));
  DN_RETURN_IF_ERROR(backend_.UnpackQkv(b.recv, world_, &b.qh, &b.kh, &b.vh));
  // Padded rows sit at [L, P*S) of the gathered sequence: not keys.
  DN_RETURN_IF_ERROR(SelfAttend(b.qh, b.kh, b.vh, scale, &b.oh));
  DN_RETURN_IF_ERROR(backend_.PackOut(b.oh, world_, &b.osend));
  DN_RETURN_IF_ERROR(AllToAll(data, b.osend, &b.orecv, markers));
  return backend_.UnpackOut(b.orecv, world_, o4);
}

absl::Status WanModel::TimeEmbedding(int64_t bi) {
  // Batch row bi alone: its GEMMs are the same calls whatever the batch
  // (a CFG-parallel half runs batch 1; docs/ENGINE.md, rank invariance).
  Buffers& b = *buf_;
  constexpr Activation kNone = Activation::kNone;
  auto row = [bi](const Tensor& t) { return t.Rows(bi, bi + 1); };
  Tensor sinus = row(b.sinus), temb_h = row(b.temb_h), temb = row(b.temb),
         temb_silu = row(b.temb_silu), tproj = row(b.tproj);
  const std::string ce = "condition_embedder.";
  DN_RETURN_IF_ERROR(Lin(ce + "time_embedder.linear_1", sinus, te1_w_, &te1_b_, kNone, &temb_h));
  DN_RETURN_IF_ERROR(backend_.Silu(temb_h, &temb_silu));
  DN_RETURN_IF_ERROR(Lin(ce + "time_embedder.linear_2", temb_silu, te2_w_, &te2_b_, kNone, &temb));
  DN_RETURN_IF_ERROR(backend_.Silu(temb, &temb_silu));
  return Lin(ce + "time_proj", temb_silu, tproj_w_, &tproj_b_, kNone, &tproj);
}

absl::Status WanModel::RunForward(comm::ProcessGroup* data,
                                  MarkerList* markers) {
  DN_RETURN_IF_ERROR(RunPrologue());
  for (size_t i = 0; i < blocks_.size(); ++i)
    DN_RETURN_IF_ERROR(RunBlock(i, data, markers));
  return RunHead();
}

absl::Status WanModel::RunPrologue() {
  Buffers& b = *buf_;
  const int64_t bs = shape_.batch;
  // Patch embed (step 2) and time embedding (steps 3-4).
  DN_RETURN_IF_ERROR(backend_.Linear(b.tokens, patch_w_, &patch_b_, Activation::kNone, &b.x));
  // Time rows: one per batch row, plus (per-token timesteps with t = 0
  // tokens on this rank) one more per batch row for t = 0 (MODELS.md §5).
  const int64_t time_rows = zero_rows_ > 0 ? 2 * bs : bs;
  for (int64_t bi = 0; bi < time_rows; ++bi) DN_RETURN_IF_ERROR(TimeEmbedding(bi));
  return absl::OkStatus();
}

absl::Status WanModel::RunBlock(size_t i, comm::ProcessGroup* data,
                                MarkerList* markers) {
  Buffers& b = *buf_;
  Context& c = *ctx_;
  const int64_t bs = shape_.batch, s = shard_;
  const int64_t heads = config_.num_attention_heads;
  const int64_t hd = config_.attention_head_dim;
  const float eps = static_cast<float>(config_.eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  constexpr Activation kNone = Activation::kNone;
  const int64_t time_rows = zero_rows_ > 0 ? 2 * bs : bs;
  const Tensor tproj = b.tproj.Rows(0, time_rows), mod = b.mod.Rows(0, time_rows);
  Tensor mod_out = mod;

  const Block& blk = blocks_[i];
  // e = sst + tproj; (shift1, scale1, gate1, shift2, scale2, gate2)
  DN_RETURN_IF_ERROR(backend_.AddModulation(blk.sst, tproj, &mod_out));
  // Self-attention with gated residual.
  DN_RETURN_IF_ERROR(Modulate(mod, 0, 1, eps));
  DN_RETURN_IF_ERROR(SelfAttention(blk, data, markers));
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn1.to_out.0", b.attn, blk.o_w, &blk.o_b, kNone, &b.tmp));
  DN_RETURN_IF_ERROR(Gate(b.tmp, mod, 2));
  // Cross-attention (local, cached text K/V, no RoPE, no gate).
  DN_RETURN_IF_ERROR(
      backend_.LayerNormAffine(b.x, blk.norm2_w, blk.norm2_b, eps, &b.h));
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn2.to_q", b.h, blk.q2_w, &blk.q2_b, kNone, &b.tmp));
  DN_RETURN_IF_ERROR(backend_.RmsNorm(b.tmp, blk.norm_q2, eps, &b.q));
  for (int64_t bi = 0; bi < bs; ++bi) {
    const int64_t t = c.lengths[static_cast<size_t>(bi)];
    const int64_t off = c.offsets[static_cast<size_t>(bi)];
    Tensor q1 = b.q.Rows(bi, bi + 1).View({1, s, heads, hd});
    Tensor o1 = b.attn.Rows(bi, bi + 1).View({1, s, heads, hd});
    Tensor k1 = c.k[i].Rows(off, off + t).View({1, t, heads, hd});
    Tensor v1 = c.v[i].Rows(off, off + t).View({1, t, heads, hd});
    DN_RETURN_IF_ERROR(backend_.Attention(q1, k1, v1, t, scale, &o1));
  }
  if (img_ctx_ != nullptr) {
    // A second, separate softmax over the image tokens; the two outputs
    // are summed before to_out (docs/MODELS.md §4).
    const int64_t n = img_ctx_->tokens;
    Tensor ki = img_ctx_->k[i].View({1, n, heads, hd});
    Tensor vi = img_ctx_->v[i].View({1, n, heads, hd});
    for (int64_t bi = 0; bi < bs; ++bi) {
      Tensor q1 = b.q.Rows(bi, bi + 1).View({1, s, heads, hd});
      Tensor o1 = b.tmp.Rows(bi, bi + 1).View({1, s, heads, hd});
      DN_RETURN_IF_ERROR(backend_.Attention(q1, ki, vi, n, scale, &o1));
    }
    DN_RETURN_IF_ERROR(backend_.AddInPlace(&b.attn, b.tmp));
  }
  DN_RETURN_IF_ERROR(Lin(blk.name + "attn2.to_out.0", b.attn, blk.o2_w, &blk.o2_b, kNone, &b.tmp));
  DN_RETURN_IF_ERROR(backend_.AddInPlace(&b.x, b.tmp));
  // FFN with gated residual.
  DN_RETURN_IF_ERROR(Modulate(mod, 3, 4, eps));
  DN_RETURN_IF_ERROR(Lin(blk.name + "ffn.net.0.proj", b.h, blk.ffn1_w, &blk.ffn1_b,
                                     Activation::kGeluTanh, &b.ffn));
  DN_RETURN_IF_ERROR(Lin(blk.name + "ffn.net.2", b.ffn, blk.ffn2_w, &blk.ffn2_b, kNone, &b.tmp));
  DN_RETURN_IF_ERROR(Gate(b.tmp, mod, 5));
  return absl::OkStatus();
}

absl::Status WanModel::RunHead() {
  Buffers& b = *buf_;
  const int64_t time_rows = zero_rows_ > 0 ? 2 * shape_.batch : shape_.batch;
  const float eps = static_cast<float>(config_.eps);
  // Head (step 8): shift, scale = sst + temb (pre-SiLU); proj_out.
  Tensor head_mod = b.head_mod.Rows(0, time_rows);
  DN_RETURN_IF_ERROR(
      backend_.AddModulation(head_sst_, b.temb.Rows(0, time_rows), &head_mod));
  DN_RETURN_IF_ERROR(Modulate(head_mod, 0, 1, eps));
  return Lin("proj_out", b.h, proj_w_, &proj_b_, Activation::kNone, &b.out);
}

namespace {

// Per-token timesteps: each batch row bi's shard [bi*s, (bi+1)*s) splits into
// its first `zero_rows` tokens (time row batch + bi, t = 0) and the rest (time
// row bi). Calls fn(begin, end, time_row) on the flattened [batch*s] rows of
// each non-empty part. The ops run this way are token-local, so splitting a
// row's tokens computes every token exactly as one call would (rank
// invariance).
template <typename Fn>
absl::Status ForEachTimePart(int64_t batch, int64_t s, int64_t zero_rows, Fn fn) {
  for (int64_t bi = 0; bi < batch; ++bi) {
    const int64_t cut = bi * s + zero_rows;
    const struct { int64_t begin, end, row; } parts[2] = {{bi * s, cut, batch + bi},
                                                          {cut, (bi + 1) * s, bi}};
    for (const auto& p : parts)
      if (p.end > p.begin) DN_RETURN_IF_ERROR(fn(p.begin, p.end, p.row));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WanModel::Modulate(const Tensor& mod, int shift, int scale, float eps) {
  Buffers& b = *buf_;
  const int64_t bs = shape_.batch, s = shard_;
  if (zero_rows_ == 0) return backend_.LayerNormModulate(b.x, mod, shift, scale, eps, &b.h);
  const int64_t d = config_.inner_dim();
  const Tensor x2 = b.x.View({bs * s, d}), h2 = b.h.View({bs * s, d});
  return ForEachTimePart(bs, s, zero_rows_, [&](int64_t begin, int64_t end, int64_t row) {
    const Shape rows = {1, end - begin, d};
    Tensor h = h2.Rows(begin, end).View(rows);
    return backend_.LayerNormModulate(x2.Rows(begin, end).View(rows), mod.Rows(row, row + 1),
                                      shift, scale, eps, &h);
  });
}

absl::Status WanModel::Gate(const Tensor& y, const Tensor& mod, int gate) {
  Buffers& b = *buf_;
  const int64_t bs = shape_.batch, s = shard_;
  if (zero_rows_ == 0) return backend_.GatedResidual(&b.x, y, mod, gate);
  const int64_t d = config_.inner_dim();
  const Tensor x2 = b.x.View({bs * s, d}), y2 = y.View({bs * s, d});
  return ForEachTimePart(bs, s, zero_rows_, [&](int64_t begin, int64_t end, int64_t row) {
    const Shape rows = {1, end - begin, d};
    Tensor x = x2.Rows(begin, end).View(rows);
    return backend_.GatedResidual(&x, y2.Rows(begin, end).View(rows), mod.Rows(row, row + 1),
                                  gate);
  });
}

}  // namespace dn::worker
