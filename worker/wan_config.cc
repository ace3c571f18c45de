#include "worker/wan_config.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace dn::worker {
namespace {

using Json = nlohmann::json;

constexpr char kClassName[] = "WanTransformer3DModel";
constexpr char kOriginalClassName[] = "WanModel";  // Wan2.1's own config.json
constexpr char kQkNorm[] = "rms_norm_across_heads";
// Upper bound on any size in a config, so derived tensor sizes cannot
// overflow (configs are untrusted input).
constexpr int kMaxSize = 1 << 20;

// A short rendering of an untrusted value for messages: scalars as JSON,
// containers to `depth` levels (deeper ones as [...] / {...}), so a deeply
// nested value cannot recurse (json::dump would, once per level).
void Render(const Json& j, int depth, std::string* out) {
  if (out->size() > 80) return;
  if (!j.is_structured()) {
    *out += j.dump(-1, ' ', false, Json::error_handler_t::replace);
    return;
  }
  const bool array = j.is_array();
  if (depth == 0) {
    *out += array ? "[...]" : "{...}";
    return;
  }
  *out += array ? "[" : "{";
  bool first = true;
  for (auto it = j.begin(); it != j.end() && out->size() <= 80; ++it) {
    if (!first) *out += ", ";
    first = false;
    if (!array) *out += Json(it.key()).dump(-1, ' ', false, Json::error_handler_t::replace) + ": ";
    Render(*it, depth - 1, out);
  }
  *out += array ? "]" : "}";
}

std::string Show(const Json& j) {
  std::string s;
  Render(j, 2, &s);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

absl::Status FieldError(const std::string& field, const std::string& what,
                        const Json& got) {
  return absl::InvalidArgumentError(absl::StrCat(
      "config field '", field, "': ", what, ", got ", Show(got)));
}

// Reads an integer field, if present. `nullable`: JSON null reads as 0.
absl::Status ReadInt(const Json& root, const std::string& field, bool nullable,
                     std::optional<int>* out) {
  auto it = root.find(field);
  if (it == root.end()) return absl::OkStatus();
  if (it->is_null() && nullable) {
    *out = 0;
    return absl::OkStatus();
  }
  if (!it->is_number_integer())
    return FieldError(field, nullable ? "expected an integer or null"
                                      : "expected an integer",
                      *it);
  const int64_t v = it->get<int64_t>();
  if (v < -kMaxSize || v > kMaxSize)
    return FieldError(field, absl::StrCat("out of range [", -kMaxSize, ", ",
                                          kMaxSize, "]"),
                      *it);
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status ReadTriple(const Json& root, const std::string& field,
                        std::optional<std::array<int, 3>>* out) {
  auto it = root.find(field);
  if (it == root.end()) return absl::OkStatus();
  if (!it->is_array() || it->size() != 3)
    return FieldError(field, "expected a list of 3 integers", *it);
  std::array<int, 3> v{};
  for (size_t i = 0; i < 3; ++i) {
    const Json& e = (*it)[i];
    if (!e.is_number_integer() || e.get<int64_t>() < -kMaxSize ||
        e.get<int64_t>() > kMaxSize)
      return FieldError(field, "expected a list of 3 integers", *it);
    v[i] = static_cast<int>(e.get<int64_t>());
  }
  *out = v;
  return absl::OkStatus();
}

// Resolves a field that may come under its diffusers name or its original
// Wan2.1 alias; both present must agree.
absl::Status Merge(const std::string& name, const std::optional<int>& a,
                   const std::string& alias, const std::optional<int>& b,
                   int* out) {
  if (a && b && *a != *b)
    return absl::InvalidArgumentError(absl::StrCat(
        "config fields '", name, "' (", *a, ") and '", alias, "' (", *b,
        ") disagree"));
  if (a) *out = *a;
  else if (b) *out = *b;
  return absl::OkStatus();
}

absl::Status CheckMin(const std::string& field, int value, int min) {
  if (value < min)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field '", field, "' must be >= ", min, " (got ", value, ")"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<WanConfig> WanConfig::FromJson(const std::string& json) {
  Json root;
  try {
    root = Json::parse(json);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("config is not valid JSON: ", e.what()));
  }
  if (!root.is_object())
    return absl::InvalidArgumentError(
        absl::StrCat("config must be a JSON object, got ", root.type_name()));

  WanConfig c;
  if (auto it = root.find("_class_name"); it != root.end()) {
    if (!it->is_string() || (*it != kClassName && *it != kOriginalClassName))
      return FieldError("_class_name",
                        absl::StrCat("expected \"", kClassName, "\" (or \"",
                                     kOriginalClassName, "\" for Wan2.1's own)"),
                        *it);
  }

  std::optional<int> heads, num_heads, head_dim, dim, in_ch, in_dim, out_ch,
      out_dim, text_dim, freq_dim, ffn_dim, layers, image_dim, added_kv,
      rope_len, pos_len;
  DN_RETURN_IF_ERROR(ReadInt(root, "num_attention_heads", false, &heads));
  DN_RETURN_IF_ERROR(ReadInt(root, "num_heads", false, &num_heads));
  DN_RETURN_IF_ERROR(ReadInt(root, "attention_head_dim", false, &head_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "dim", false, &dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "in_channels", false, &in_ch));
  DN_RETURN_IF_ERROR(ReadInt(root, "in_dim", false, &in_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "out_channels", false, &out_ch));
  DN_RETURN_IF_ERROR(ReadInt(root, "out_dim", false, &out_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "text_dim", false, &text_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "freq_dim", false, &freq_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "ffn_dim", false, &ffn_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "num_layers", false, &layers));
  DN_RETURN_IF_ERROR(ReadInt(root, "image_dim", true, &image_dim));
  DN_RETURN_IF_ERROR(ReadInt(root, "added_kv_proj_dim", true, &added_kv));
  DN_RETURN_IF_ERROR(ReadInt(root, "rope_max_seq_len", false, &rope_len));
  DN_RETURN_IF_ERROR(ReadInt(root, "pos_embed_seq_len", true, &pos_len));

  DN_RETURN_IF_ERROR(
      Merge("num_attention_heads", heads, "num_heads", num_heads,
            &c.num_attention_heads));
  DN_RETURN_IF_ERROR(
      Merge("in_channels", in_ch, "in_dim", in_dim, &c.in_channels));
  DN_RETURN_IF_ERROR(
      Merge("out_channels", out_ch, "out_dim", out_dim, &c.out_channels));
  if (head_dim) c.attention_head_dim = *head_dim;
  if (dim) {  // original: dim = heads * head_dim
    if (c.num_attention_heads <= 0 || *dim <= 0 ||
        *dim % c.num_attention_heads != 0)
      return FieldError("dim",
                        absl::StrCat("must be a positive multiple of the head "
                                     "count ",
                                     c.num_attention_heads),
                        root["dim"]);
    const int derived = *dim / c.num_attention_heads;
    if (head_dim && *head_dim != derived)
      return absl::InvalidArgumentError(absl::StrCat(
          "config fields 'dim' (", *dim, ") and 'attention_head_dim' (",
          *head_dim, ") disagree with ", c.num_attention_heads, " heads"));
    c.attention_head_dim = derived;
  }
  if (text_dim) c.text_dim = *text_dim;
  if (freq_dim) c.freq_dim = *freq_dim;
  if (ffn_dim) c.ffn_dim = *ffn_dim;
  if (layers) c.num_layers = *layers;
  if (image_dim) c.image_dim = *image_dim;
  if (added_kv) c.added_kv_proj_dim = *added_kv;
  if (rope_len) c.rope_max_seq_len = *rope_len;
  if (pos_len) c.pos_embed_seq_len = *pos_len;

  std::optional<std::array<int, 3>> patch, stride;
  DN_RETURN_IF_ERROR(ReadTriple(root, "patch_size", &patch));
  DN_RETURN_IF_ERROR(ReadTriple(root, "vae_stride", &stride));
  if (patch) c.patch_size = *patch;
  if (stride) c.vae_stride = *stride;

  if (auto it = root.find("boundary_ratio"); it != root.end()) {
    // Pipeline field (model_index.json; our own config.json of a two-expert
    // preset). null = one transformer.
    if (it->is_null()) {
      c.boundary_ratio = 0;
    } else if (it->is_number()) {
      c.boundary_ratio = it->get<double>();
    } else {
      return FieldError("boundary_ratio", "expected a number in (0, 1) or null", *it);
    }
  }
  std::optional<bool> expand;
  if (auto it = root.find("expand_timesteps"); it != root.end()) {
    // Pipeline field (model_index.json; our own config.json of a TI2V preset).
    if (it->is_null()) {
      expand = false;
    } else if (it->is_boolean()) {
      expand = it->get<bool>();
    } else {
      return FieldError("expand_timesteps", "expected true, false or null", *it);
    }
  }
  if (auto it = root.find("cross_attn_norm"); it != root.end()) {
    if (!it->is_boolean())
      return FieldError("cross_attn_norm", "expected true or false", *it);
    c.cross_attn_norm = it->get<bool>();
  }
  if (auto it = root.find("qk_norm"); it != root.end()) {
    if (it->is_string()) {
      c.qk_norm = it->get<std::string>();
    } else if (it->is_null()) {
      c.qk_norm = "";
    } else if (it->is_boolean()) {  // original Wan2.1: qk_norm=True
      c.qk_norm = it->get<bool>() ? kQkNorm : "";
    } else {
      return FieldError("qk_norm", "expected a string, null or a boolean", *it);
    }
  }
  if (auto it = root.find("eps"); it != root.end()) {
    if (!it->is_number())
      return FieldError("eps", "expected a number", *it);
    c.eps = it->get<double>();
  }
  if (auto it = root.find("window_size"); it != root.end()) {
    // Original Wan2.1: (-1, -1) = global attention, the only kind supported.
    if (!it->is_array() || it->size() != 2 || !(*it)[0].is_number_integer() ||
        !(*it)[1].is_number_integer() || (*it)[0].get<int64_t>() != -1 ||
        (*it)[1].get<int64_t>() != -1)
      return FieldError("window_size",
                        "only [-1, -1] (global attention) is supported", *it);
  }
  if (auto it = root.find("model_type"); it != root.end()) {
    // Original Wan2.1: "t2v", "i2v" or "flf2v"; the I2V image branch takes
    // 1280-wide CLIP features projected to dim (spec §1).
    // Wan2.2 adds "ti2v" (TI2V-5B: per-token timesteps, no image branch).
    if (!it->is_string() ||
        (*it != "t2v" && *it != "i2v" && *it != "flf2v" && *it != "ti2v"))
      return FieldError("model_type",
                        "expected \"t2v\", \"i2v\", \"flf2v\" or \"ti2v\"", *it);
    if (*it == "ti2v") {
      if (!expand) expand = true;
    } else if (*it != "t2v") {
      if (!image_dim) c.image_dim = 1280;
      // (inner_dim() in int64: the factors are not validated yet.)
      if (!added_kv) {
        // Derived, so refused here: a value past the limit would be written
        // by ToJson and then refused when read back.
        const int64_t inner =
            static_cast<int64_t>(c.num_attention_heads) * c.attention_head_dim;
        if (inner < 1 || inner > kMaxSize)
          return FieldError("model_type",
                            absl::StrCat("the image branch's added_kv_proj_dim is the inner dim "
                                         "(heads x head_dim) = ", inner, ", outside [1, ",
                                         kMaxSize, "]"),
                            *it);
        c.added_kv_proj_dim = static_cast<int>(inner);
      }
      if (*it == "flf2v" && !pos_len) c.pos_embed_seq_len = 2 * 257;
    }
  }
  // The Wan2.2 VAE (z_dim 48, strides 4,16,16) is the only 48-channel Wan
  // latent space, and TI2V-5B the only model on it (docs/MODELS.md §1, §5):
  // a diffusers transformer config says neither, so default both from it.
  const bool wan22_vae = c.in_channels == 48 && c.out_channels == 48;
  if (!stride && wan22_vae) c.vae_stride = {4, 16, 16};
  c.expand_timesteps = expand ? *expand : wan22_vae;
  return c;
}

std::string WanConfig::ToJson() const {
  Json j = Json::object();  // std::map-backed: keys come out sorted
  j["_class_name"] = kClassName;
  j["added_kv_proj_dim"] =
      added_kv_proj_dim > 0 ? Json(added_kv_proj_dim) : Json(nullptr);
  j["attention_head_dim"] = attention_head_dim;
  if (boundary_ratio > 0) j["boundary_ratio"] = boundary_ratio;
  j["cross_attn_norm"] = cross_attn_norm;
  j["eps"] = eps;
  // Written when true, and when false where FromJson would default it to true
  // (48 channels in and out), so the JSON reads back to the same config.
  if (expand_timesteps || (in_channels == 48 && out_channels == 48))
    j["expand_timesteps"] = expand_timesteps;
  j["ffn_dim"] = ffn_dim;
  j["freq_dim"] = freq_dim;
  j["image_dim"] = image_dim > 0 ? Json(image_dim) : Json(nullptr);
  j["in_channels"] = in_channels;
  j["num_attention_heads"] = num_attention_heads;
  j["num_layers"] = num_layers;
  j["out_channels"] = out_channels;
  j["patch_size"] = patch_size;
  j["pos_embed_seq_len"] =
      pos_embed_seq_len > 0 ? Json(pos_embed_seq_len) : Json(nullptr);
  j["qk_norm"] = qk_norm.empty() ? Json(nullptr) : Json(qk_norm);
  j["rope_max_seq_len"] = rope_max_seq_len;
  j["text_dim"] = text_dim;
  j["vae_stride"] = vae_stride;
  return j.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
}

std::string WanConfig::Hash() const {
  const std::string text = ToJson();
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(text.data(), text.size(), digest, &len, EVP_sha256(),
                 nullptr) != 1)
    return "";
  static const char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * len);
  for (unsigned int i = 0; i < len; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 15]);
  }
  return hex;
}

absl::Status WanConfig::Validate() const {
  for (int i = 0; i < 3; ++i) {
    DN_RETURN_IF_ERROR(CheckMin(absl::StrCat("patch_size[", i, "]"),
                                patch_size[i], 1));
    DN_RETURN_IF_ERROR(CheckMin(absl::StrCat("vae_stride[", i, "]"),
                                vae_stride[i], 1));
  }
  DN_RETURN_IF_ERROR(CheckMin("num_attention_heads", num_attention_heads, 1));
  DN_RETURN_IF_ERROR(CheckMin("attention_head_dim", attention_head_dim, 6));
  if (attention_head_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'attention_head_dim' must be even for 3-axis RoPE (got ",
        attention_head_dim, ")"));
  if (static_cast<int64_t>(num_attention_heads) * attention_head_dim > kMaxSize)
    return absl::InvalidArgumentError(absl::StrCat(
        "config: inner dim num_attention_heads * attention_head_dim = ",
        static_cast<int64_t>(num_attention_heads) * attention_head_dim,
        " exceeds ", kMaxSize));
  DN_RETURN_IF_ERROR(CheckMin("in_channels", in_channels, 1));
  DN_RETURN_IF_ERROR(CheckMin("out_channels", out_channels, 1));
  // The patch embedding and the head are [inner_dim, in_channels * patch]
  // and [out_channels * patch, inner_dim]: bound the patch volume and those
  // rows so that no derived size overflows.
  const int64_t patch_volume = static_cast<int64_t>(patch_size[0]) * patch_size[1] *
                               patch_size[2];
  if (patch_volume > kMaxSize || patch_volume * std::max(in_channels, out_channels) > kMaxSize)
    return absl::InvalidArgumentError(absl::StrCat(
        "config: patch_size ", patch_size[0], "x", patch_size[1], "x", patch_size[2],
        " times max(in_channels, out_channels) = ",
        patch_volume * std::max(in_channels, out_channels), " exceeds ", kMaxSize));
  DN_RETURN_IF_ERROR(CheckMin("text_dim", text_dim, 1));
  DN_RETURN_IF_ERROR(CheckMin("freq_dim", freq_dim, 2));
  if (freq_dim % 2 != 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'freq_dim' must be even (cos and sin halves; got ",
        freq_dim, ")"));
  DN_RETURN_IF_ERROR(CheckMin("ffn_dim", ffn_dim, 1));
  DN_RETURN_IF_ERROR(CheckMin("num_layers", num_layers, 1));
  if (num_layers > 1000)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'num_layers' must be <= 1000 (got ", num_layers, ")"));
  DN_RETURN_IF_ERROR(CheckMin("rope_max_seq_len", rope_max_seq_len, 1));
  if (!(eps > 0.0) || !std::isfinite(eps) || eps > 1.0)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'eps' must be in (0, 1] (got ", eps, ")"));
  if (qk_norm != kQkNorm)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'qk_norm' must be \"", kQkNorm, "\" (got \"", qk_norm,
        "\"); no other Wan2.1 variant is supported"));
  if (!cross_attn_norm)
    return absl::InvalidArgumentError(
        "config field 'cross_attn_norm' must be true (every Wan2.1 model has "
        "the affine cross-attention norm)");
  if (!std::isfinite(boundary_ratio) || boundary_ratio < 0 || boundary_ratio >= 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'boundary_ratio' must be in (0, 1) (two experts) or unset "
        "(got ", boundary_ratio, ")"));
  DN_RETURN_IF_ERROR(CheckMin("image_dim", image_dim, 0));
  DN_RETURN_IF_ERROR(CheckMin("added_kv_proj_dim", added_kv_proj_dim, 0));
  DN_RETURN_IF_ERROR(CheckMin("pos_embed_seq_len", pos_embed_seq_len, 0));
  if ((image_dim > 0) != (added_kv_proj_dim > 0))
    return absl::InvalidArgumentError(absl::StrCat(
        "config fields 'image_dim' (", image_dim, ") and 'added_kv_proj_dim' (",
        added_kv_proj_dim, ") must both be set (I2V) or both be null (T2V)"));
  if (expand_timesteps && in_channels != out_channels)
    return absl::InvalidArgumentError(absl::StrCat(
        "config field 'expand_timesteps' needs in_channels (", in_channels,
        ") == out_channels (", out_channels,
        "): TI2V conditions by replacing frame 0, not by extra channels"));
  if (expand_timesteps && image_dim > 0)
    return absl::InvalidArgumentError(
        "config field 'expand_timesteps' (TI2V) and 'image_dim' (a Wan2.1 image "
        "branch) do not go together");
  if (pos_embed_seq_len > 0 && image_dim == 0)
    return absl::InvalidArgumentError(
        "config field 'pos_embed_seq_len' needs 'image_dim' (FLF2V is an I2V "
        "model)");
  return absl::OkStatus();
}

namespace {

// One preset: its name and its config. Fields not named keep
// WanConfig's defaults (the Wan2.1-14B shape, 16 channels, text_dim 4096,
// VAE stride 4,8,8). Designated initializers follow WanConfig's field order.
struct Preset {
  const char* name;
  WanConfig config;
};

// The presets, in the order PresetNames() lists them. Their config hashes
// are pinned by tests/worker/wan_config_test.cc (EveryPresetKeepsItsConfigHash).
const std::vector<Preset>& Presets() {
  static const std::vector<Preset> presets = {
      {"tiny",
       {.num_attention_heads = 4, .attention_head_dim = 16, .in_channels = 16,
        .out_channels = 16, .text_dim = 32, .freq_dim = 256, .ffn_dim = 128,
        .num_layers = 2}},
      // The architecture of the demo model (tools/README.md, tools/demo_model):
      // pixel space, RGB. With seeded random weights it is the demo's stand-in
      // until the trained weights are there.
      {"demo-pixel",
       {.num_attention_heads = 4, .attention_head_dim = 32, .in_channels = 3,
        .out_channels = 3, .text_dim = 64, .freq_dim = 256, .ffn_dim = 512,
        .num_layers = 4, .vae_stride = {1, 1, 1}}},
      {"wan2.1-t2v-1.3b",
       {.num_attention_heads = 12, .attention_head_dim = 128, .ffn_dim = 8960,
        .num_layers = 30}},
      {"wan2.1-t2v-14b",
       {.num_attention_heads = 40, .attention_head_dim = 128, .ffn_dim = 13824,
        .num_layers = 40}},
      // Two experts of the Wan2.1-14B shape (docs/MODELS.md §1, §3).
      {"wan2.2-t2v-a14b",
       {.num_attention_heads = 40, .attention_head_dim = 128, .ffn_dim = 13824,
        .num_layers = 40, .boundary_ratio = 0.875}},
      // The two-expert pipeline on two tiny transformers (CI).
      {"tiny-t2v-a14b",
       {.num_attention_heads = 4, .attention_head_dim = 16, .in_channels = 16,
        .out_channels = 16, .text_dim = 32, .freq_dim = 256, .ffn_dim = 128,
        .num_layers = 2, .boundary_ratio = 0.875}},
      // Two 14B experts with the 36-channel input (noise 16 | mask 4 | image
      // latent 16), no image embedder (docs/MODELS.md §3, §4).
      {"wan2.2-i2v-a14b",
       {.num_attention_heads = 40, .attention_head_dim = 128, .in_channels = 36,
        .ffn_dim = 13824, .num_layers = 40, .boundary_ratio = 0.9}},
      {"tiny-i2v-a14b",
       {.num_attention_heads = 4, .attention_head_dim = 16, .in_channels = 36,
        .out_channels = 16, .text_dim = 32, .freq_dim = 256, .ffn_dim = 128,
        .num_layers = 2, .boundary_ratio = 0.9}},
      // Wan2.1-I2V-14B (480P and 720P share the config): 36 channels, CLIP
      // image branch (docs/MODELS.md §1, §4).
      {"wan2.1-i2v-14b",
       {.num_attention_heads = 40, .attention_head_dim = 128, .in_channels = 36,
        .ffn_dim = 13824, .num_layers = 40, .image_dim = 1280,
        .added_kv_proj_dim = 5120}},
      // added_kv_proj_dim = inner_dim (4 x 16), as in the real model (5120).
      {"tiny-i2v-14b",
       {.num_attention_heads = 4, .attention_head_dim = 16, .in_channels = 36,
        .out_channels = 16, .text_dim = 32, .freq_dim = 256, .ffn_dim = 128,
        .num_layers = 2, .image_dim = 24, .added_kv_proj_dim = 64}},
      // Wan2.2-TI2V-5B (docs/MODELS.md §1, §5): dim 3072, 48 latent channels
      // (Wan2.2 VAE, strides 4,16,16), per-token timesteps.
      {"wan2.2-ti2v-5b",
       {.num_attention_heads = 24, .attention_head_dim = 128, .in_channels = 48,
        .out_channels = 48, .ffn_dim = 14336, .num_layers = 30, .vae_stride = {4, 16, 16},
        .expand_timesteps = true}},
      // The TI2V path on the tiny transformer (CI): 48 channels, Wan2.2 VAE
      // strides, per-token timesteps; 4 heads so 1, 2 and 4 ranks divide them.
      {"tiny-ti2v",
       {.num_attention_heads = 4, .attention_head_dim = 16, .in_channels = 48,
        .out_channels = 48, .text_dim = 32, .freq_dim = 256, .ffn_dim = 128,
        .num_layers = 2, .vae_stride = {4, 16, 16}, .expand_timesteps = true}},
  };
  return presets;
}

}  // namespace

absl::StatusOr<WanConfig> PresetConfig(const std::string& name) {
  for (const Preset& p : Presets())
    if (name == p.name) return p.config;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown preset '", name, "' (known: ", absl::StrJoin(PresetNames(), ", "), ")"));
}

std::vector<std::string> PresetNames() {
  std::vector<std::string> names;
  for (const Preset& p : Presets()) names.push_back(p.name);
  return names;
}

}  // namespace dn::worker
