// File: worker/wan_config.h
//
// The WanTransformer3DModel configuration (diffusers `config.json` fields,
// see ../shared/docs/wan-spec.md §1) plus the VAE strides that map pixel
// sizes to latent sizes, and the presets `make-checkpoint` and `bench` use.
#ifndef DN_WORKER_WAN_CONFIG_H_
#define DN_WORKER_WAN_CONFIG_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dn::worker {

struct WanConfig {
  std::array<int, 3> patch_size = {1, 2, 2};  // (t, h, w)
  int num_attention_heads = 40;
  int attention_head_dim = 128;
  int in_channels = 16;
  int out_channels = 16;
  int text_dim = 4096;
  int freq_dim = 256;
  int ffn_dim = 13824;
  int num_layers = 40;
  bool cross_attn_norm = true;
  std::string qk_norm = "rms_norm_across_heads";
  double eps = 1e-6;
  int image_dim = 0;          // 0 = none (T2V); I2V: 1280
  int added_kv_proj_dim = 0;  // 0 = none (T2V); I2V: 5120
  int rope_max_seq_len = 1024;
  int pos_embed_seq_len = 0;  // FLF2V only
  // Not a diffusers transformer field: VAE strides (t, h, w) from pixels to
  // latents. Wan: (4, 8, 8). A pixel-space model declares (1, 1, 1). Read
  // from "vae_stride" in config.json when present.
  std::array<int, 3> vae_stride = {4, 8, 8};
  // Not a transformer field either: the pipeline's `boundary_ratio`
  // (model_index.json). > 0 = two experts (Wan2.2 A14B): the high-noise
  // `transformer` runs for timesteps t >= boundary_ratio * 1000, the
  // low-noise `transformer_2` after (docs/MODELS.md §3). 0 = one transformer.
  // Written to / read from JSON only when set, so it changes no Wan2.1 hash.
  double boundary_ratio = 0;
  // Not a transformer field either: the pipeline's `expand_timesteps`
  // (model_index.json; true only for Wan2.2-TI2V-5B, docs/MODELS.md §5).
  // True = per-token timesteps: a request may give the image latent of frame
  // 0 (condition_latents [out_channels, 1, H, W]); frame 0's tokens then get
  // t = 0 and frame 0 is replaced by the condition. Written to / read from
  // JSON only when true (no other model's hash changes); original configs
  // with model_type "ti2v" set it, and so does a config with 48 latent
  // channels in and out (the Wan2.2 VAE's z_dim; TI2V-5B is the only such
  // Wan model) that does not say otherwise.
  bool expand_timesteps = false;

  int inner_dim() const { return num_attention_heads * attention_head_dim; }
  bool is_i2v() const { return added_kv_proj_dim > 0 || image_dim > 0; }
  // Wan2.2 TI2V: per-token timesteps, first-frame conditioning (§5).
  bool is_ti2v() const { return expand_timesteps; }
  int num_experts() const { return boundary_ratio > 0 ? 2 : 1; }
  // The config of one expert's transformer (pipeline fields cleared).
  WanConfig TransformerOnly() const {
    WanConfig c = *this;
    c.boundary_ratio = 0;
    return c;
  }

  // Parses a diffusers config.json (unknown keys ignored; "_class_name", if
  // present, must be WanTransformer3DModel, or WanModel as original Wan2.1
  // releases write). Also accepts the original Wan2.1 names (dim, num_heads,
  // in_dim, out_dim, model_type, ...). Errors name the field.
  static absl::StatusOr<WanConfig> FromJson(const std::string& json);
  // Canonical diffusers JSON (sorted keys), as make-checkpoint writes it.
  std::string ToJson() const;
  // Hex sha256 of ToJson(): identifies the architecture in metadata and
  // worker registration.
  std::string Hash() const;
  // Checks internal consistency (positive sizes, head_dim even and >= 6, ...).
  absl::Status Validate() const;
};

// Presets: named configs for make-checkpoint, run and bench (--preset). They
// are one data table in wan_config.cc; PresetNames() lists them in its order.
// An unknown name is INVALID_ARGUMENT listing the known ones.
absl::StatusOr<WanConfig> PresetConfig(const std::string& name);
std::vector<std::string> PresetNames();

}  // namespace dn::worker

#endif  // DN_WORKER_WAN_CONFIG_H_
