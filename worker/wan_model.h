// File: worker/wan_model.h
//
// The Wan2.1 DiT (WanTransformer3DModel, T2V) of ../shared/docs/wan-spec.md
// §3 on a Backend, for one rank of a Ulysses group of `world` ranks. Written
// only against worker/backend.h, so the CPU reference and the CUDA backend
// run the same model code.
//
// A rank owns tokens [rank*S, min((rank+1)*S, L)) of the L = F'·H'·W'
// patch tokens (S = ceil(L / world) rounded up to a multiple of the
// backend's shard_alignment(); rows past L are zero padding, see
// comm/ulysses.h and docs/ENGINE.md "Rank invariance"). Everything but self-attention is token-local; q/k
// RMSNorm + RoPE (at global token positions) run before the all-to-all.
//
// Usage per request: Plan(shape) (buffers, once per shape) -> SetContext(
// text embeds; computes the cross-attention K/V of every layer once) -> per
// step UploadInputs(latent, t) -> Forward() -> output() [B, S, C_out·pt·ph·pw].
// Batch b of the plan uses text context b (CFG: 0 = cond, 1 = uncond).
#ifndef DN_WORKER_WAN_MODEL_H_
#define DN_WORKER_WAN_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"
#include "worker/backend.h"
#include "worker/checkpoint.h"
#include "worker/lora.h"
#include "worker/tensor.h"
#include "worker/wan_config.h"

namespace dn::worker {

// The patched token grid and batch a forward plan is built for.
struct ModelShape {
  int batch = 1;
  int grid_f = 0;  // F' = F / pt
  int grid_h = 0;  // H' = H / ph
  int grid_w = 0;  // W' = W / pw
  int64_t tokens() const {
    return static_cast<int64_t>(grid_f) * grid_h * grid_w;
  }
  bool operator==(const ModelShape& o) const {
    return batch == o.batch && grid_f == o.grid_f && grid_h == o.grid_h &&
           grid_w == o.grid_w;
  }
};

// Markers recorded around every all-to-all of a forward (pairs: before,
// after), read after the step so nothing synchronises mid-step.
using MarkerList = std::vector<std::unique_ptr<Marker>>;

class WanModel {
 public:
  // Uploads every tensor of `source` (one at a time). Fails with
  // FAILED_PRECONDITION when the heads do not divide by `world`, and
  // UNIMPLEMENTED for configurations outside T2V Wan2.1 (I2V, other norms).
  static absl::StatusOr<std::unique_ptr<WanModel>> Load(
      const WeightSource& source, Backend& backend, int world, int rank);
  ~WanModel();
  WanModel(const WanModel&) = delete;
  WanModel& operator=(const WanModel&) = delete;

  const WanConfig& config() const { return config_; }
  int world() const { return world_; }
  int rank() const { return rank_; }
  // Per-token patch size, C_in·pt·ph·pw and C_out·pt·ph·pw.
  int64_t patch_in() const;
  int64_t patch_out() const;

  // Allocates (or keeps) the activation buffers and the RoPE table for
  // `shape`. Called outside the step; a new shape frees the old buffers.
  absl::Status Plan(const ModelShape& shape);
  const ModelShape& shape() const { return shape_; }
  int64_t shard() const { return shard_; }  // S

  // Two-expert models run one expert at a time, so the experts share one set
  // of activation buffers: this model takes `donor`'s plan (shape, buffers)
  // and drops its graph if the buffers change; donor == nullptr drops this
  // model's plan (its reference to the buffers) without allocating.
  void ShareBuffers(const WanModel* donor);

  // Per-request LoRA (worker/lora.h): every Linear named in `lora` gets the
  // unmerged low-rank term y += (x downᵀ) upᵀ + bias (before its activation);
  // the base weights are untouched. An empty map turns LoRA off (the forward
  // is then exactly the plain one). Call before SetContext (the text
  // embedder and cross K/V may be LoRA targets); drops the graph when the
  // set changes. INVALID_ARGUMENT for a module the model does not have or a
  // shape that does not fit.
  absl::Status SetLora(const std::map<std::string, LoraLowRank>& lora);

  // Wan2.1 I2V (config image_dim > 0): the CLIP image tokens [N, image_dim]
  // (host f32), the same for every batch row. Runs the image embedder and
  // caches the image K/V of every layer; the cross-attention then adds a
  // second softmax over them (docs/MODELS.md §4). nullptr clears it.
  absl::Status SetImageContext(const Tensor* image_embeds);

  // Per-request text: embeds[b] is host f32 [T_b, text_dim] for batch b of
  // the plan (embeds.size() == batch). Runs the text embedder and caches the
  // cross-attention K/V of every layer on the backend.
  absl::Status SetContext(const std::vector<const Tensor*>& embeds);

  // Copies this rank's patch tokens of `latent` (host f32 [C_in, F, H, W],
  // the full replicated latent; every batch row gets the same tokens) and the
  // timestep sinusoid to the backend.
  // Per-token timesteps (TI2V, config expand_timesteps; docs/MODELS.md §5):
  // the first `zero_t_tokens` global tokens (latent frame 0 of a conditioned
  // run: grid_h * grid_w) get t = 0, the others `timestep`. The model embeds
  // the two values once each (rows [0, B) t, rows [B, 2B) 0) and modulates
  // each token with its value's rows; 0 = every token gets `timestep`,
  // exactly the scalar model. INVALID_ARGUMENT for a model without
  // expand_timesteps given zero_t_tokens > 0.
  absl::Status UploadInputs(const float* latent, double timestep,
                            int64_t zero_t_tokens = 0);

  // The forward of this rank's shard, on the backend's stream. `data` carries
  // the Ulysses all-to-alls when world > 1.
  // - use_graph false: runs eagerly; markers (may be null) get a (before,
  //   after) pair around each all-to-all.
  // - use_graph true: the forward, all-to-alls included, is captured once per
  //   plan/context as a graph (the capturing call runs it once) and replayed
  //   by later calls; markers must be null (nothing can be marked inside a
  //   graph). Launches of a graph holding collectives go through
  //   data->LaunchWatched, so the group's watchdog covers them. Run one eager
  //   forward of the shape first (plans, NCCL connections); the engine does.
  absl::Status Forward(comm::ProcessGroup* data, MarkerList* markers,
                       bool use_graph) {
    return ForwardPart(Part::kAll, data, markers, use_graph);
  }

  // Step caching (First-Block-Cache, docs/ENGINE.md "Step caching"): a
  // forward split into parts. kAll is Forward. kFirstBlock runs the patch and
  // time embeddings and block 0, and leaves block 0's residual, negated
  // (x before block 0 minus x after it), in first_block_residual(). Then
  // either kRest (blocks 1..L-1 and the head; it also refreshes the cached
  // residual: x after block 0 minus x after the last block) or kCached (x -=
  // that cached residual, then the head). kFirstBlock + kRest runs the ops of
  // kAll in the same order on the same x (the extra copies write other
  // buffers), so a computed step is bit-identical to Forward. The parts need
  // EnableStepCache after Plan. Each part has its own graph (use_graph), keyed
  // like Forward's on group, zero_rows and attention_fp8.
  enum class Part { kAll = 0, kFirstBlock, kRest, kCached };
  static constexpr int kParts = 4;
  absl::Status ForwardPart(Part part, comm::ProcessGroup* data,
                           MarkerList* markers, bool use_graph);
  // Allocates the step cache's buffers for the current plan (B·S·D twice in
  // compute dtype, and a [B, 1, D] f32 constant); kept until the next plan.
  // Two experts sharing buffers share them too (the engine recomputes at an
  // expert switch).
  absl::Status EnableStepCache();
  bool step_cache_enabled() const;
  // [B, S, D], compute dtype: minus block 0's residual of the latest
  // kFirstBlock (padded rows included; the engine ignores them).
  const Tensor& first_block_residual() const;
  // Whether self-attention uses the fused RmsNormRopePackQkv op (world > 1).
  // On by default; DN_FUSED_QKV_PACK=0 in the environment turns it off.
  bool fused_qkv_pack() const { return fused_qkv_pack_; }
  // Self-attention through Backend::AttentionFp8 (the fast tier) instead of
  // Attention. Cross-attention stays exact. Graphs are keyed on it (a graph
  // captured under one setting is dropped, not replayed, under the other).
  void set_attention_fp8(bool on) { attention_fp8_ = on; }
  bool attention_fp8() const { return attention_fp8_; }
  // One AttentionFp8 call on the planned self-attention operands (their
  // contents do not matter; the output is overwritten by the next forward),
  // eagerly: whether the backend can run the fast tier at this plan's shape.
  // Plan first.
  absl::Status ProbeAttentionFp8();

  // Head output of this rank's shard: [B, S, patch_out()] in compute dtype.
  const Tensor& output() const;

 private:
  struct Block {
    std::string name;  // "blocks.i." (LoRA module prefix)
    Tensor sst;  // f32 [1, 6, D]
    Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
    Tensor norm_q, norm_k;  // f32 [D]
    Tensor q2_w, q2_b, k2_w, k2_b, v2_w, v2_b, o2_w, o2_b;
    Tensor norm_q2, norm_k2;      // f32 [D]
    Tensor norm2_w, norm2_b;      // f32 [D]
    Tensor ffn1_w, ffn1_b, ffn2_w, ffn2_b;
    Tensor ak_w, ak_b, av_w, av_b, norm_ak;  // I2V image K/V (norm_ak f32 [D])
  };
  struct ImageContext {
    int64_t tokens = 0;
    Tensor in, hidden, img, tmp;  // [N, image_dim] x2, [N, D] x2
    std::vector<Tensor> k, v;     // per layer [N, D]
  };
  struct Buffers;
  struct Context;

  WanModel(const WanConfig& config, Backend& backend, int world, int rank);
  absl::Status LoadWeights(const WeightSource& source);
  absl::StatusOr<Tensor> LoadTensor(const WeightSource& source,
                                    const std::string& name, const Shape& shape,
                                    bool f32);
  absl::Status RunForward(comm::ProcessGroup* data, MarkerList* markers);
  absl::Status RunPart(Part part, comm::ProcessGroup* data, MarkerList* markers);
  // The pieces of RunForward, in its order: patch + time embedding; block i;
  // head (reads x, writes out).
  absl::Status RunPrologue();
  absl::Status RunBlock(size_t i, comm::ProcessGroup* data, MarkerList* markers);
  absl::Status RunHead();
  // Drops every captured graph (buffers, context or LoRA changed).
  void DropGraphs();
  // h = LN(x)·(1 + mod[scale]) + mod[shift] and x += y·mod[gate] with each
  // token's modulation rows: rows [0, B) of `mod` for tokens at or past
  // zero_rows_ of the shard, rows [B, 2B) (t = 0) for the first zero_rows_.
  // With zero_rows_ == 0 these are single backend calls on rows [0, B).
  absl::Status Modulate(const Tensor& mod, int shift, int scale, float eps);
  absl::Status Gate(const Tensor& y, const Tensor& mod, int gate);
  // backend_.Linear plus the LoRA term of `module` when one is set.
  absl::Status Lin(const std::string& module, const Tensor& x, const Tensor& w,
                   const Tensor* bias, Activation act, Tensor* y);
  // Time embedding of batch row bi (sinus -> temb, tproj), in calls of its own.
  absl::Status TimeEmbedding(int64_t bi);
  // Text embedder and cross K/V of one branch's context rows [begin, end).
  absl::Status BranchContext(int64_t begin, int64_t end);
  absl::Status SelfAttention(const Block& blk, comm::ProcessGroup* data,
                             MarkerList* markers);
  // send (packed q/k/v) -> all-to-all -> attention -> all-to-all -> o4.
  absl::Status SelfAttend(const Tensor& q, const Tensor& k, const Tensor& v,
                          float scale, Tensor* o);
  absl::Status AttendPacked(comm::ProcessGroup* data, MarkerList* markers,
                            Tensor* o4);
  absl::Status AllToAll(comm::ProcessGroup* data, const Tensor& send,
                        Tensor* recv, MarkerList* markers);

  WanConfig config_;
  Backend& backend_;
  int world_;
  int rank_;
  DType act_;  // compute dtype

  // Weights.
  Tensor patch_w_, patch_b_;
  Tensor te1_w_, te1_b_, te2_w_, te2_b_, tproj_w_, tproj_b_;
  Tensor txt1_w_, txt1_b_, txt2_w_, txt2_b_;
  Tensor head_sst_;  // f32 [1, 2, D]
  Tensor proj_w_, proj_b_;
  // I2V image embedder (LN norms f32).
  Tensor img_n1_w_, img_n1_b_, img_ff0_w_, img_ff0_b_, img_ff2_w_, img_ff2_b_, img_n2_w_,
      img_n2_b_;
  std::unique_ptr<ImageContext> img_ctx_;
  std::vector<Block> blocks_;
  std::vector<float> host_scratch_;  // weight upload staging

  ModelShape shape_;
  int64_t shard_ = 0;
  std::shared_ptr<Buffers> buf_;  // shared between experts (ShareBuffers)
  std::unique_ptr<Context> ctx_;
  // One captured graph per Part, with what it was captured under: a graph
  // is dropped when the group, zero_rows_ or attention_fp8_ differ.
  struct PartGraph {
    std::unique_ptr<Graph> graph;
    comm::ProcessGroup* group = nullptr;
    int64_t zero_rows = 0;
    bool attention_fp8 = false;
  };
  PartGraph graphs_[kParts];
  bool fused_qkv_pack_ = true;
  bool attention_fp8_ = false;
  // Per-token timesteps: leading rows of this rank's shard with t = 0
  // (latent frame 0 of a conditioned TI2V run); 0 = scalar timestep. A graph
  // is captured for one value.
  int64_t zero_rows_ = 0;

  struct LoraWeights {
    Tensor down, up, bias;  // [r, in], [out, r] (scaled), [out] or undefined
  };
  std::map<std::string, LoraWeights> lora_;  // by diffusers module name
  Tensor lora_t_, lora_d_;                   // flat scratch: x downᵀ, delta
};

}  // namespace dn::worker

#endif  // DN_WORKER_WAN_MODEL_H_
