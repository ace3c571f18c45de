#include "worker/checkpoint_format.h"

#include <cstdio>

#include "nlohmann/json.hpp"

namespace dn::worker {
namespace {

struct Rename {
  const char* original;
  const char* diffusers;
  bool exact;  // whole (rest of the) name, else a prefix
};

// Top-level names (spec §2).
constexpr Rename kTopLevel[] = {
    {"time_embedding.0.", "condition_embedder.time_embedder.linear_1.", false},
    {"time_embedding.2.", "condition_embedder.time_embedder.linear_2.", false},
    {"time_projection.1.", "condition_embedder.time_proj.", false},
    {"text_embedding.0.", "condition_embedder.text_embedder.linear_1.", false},
    {"text_embedding.2.", "condition_embedder.text_embedder.linear_2.", false},
    {"head.head.", "proj_out.", false},
    {"head.modulation", "scale_shift_table", true},
    {"img_emb.proj.0.", "condition_embedder.image_embedder.norm1.", false},
    {"img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj.", false},
    {"img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2.", false},
    {"img_emb.proj.4.", "condition_embedder.image_embedder.norm2.", false},
    {"img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed", true},
};

// The part of a block tensor's name after "blocks.<i>.".
constexpr Rename kBlock[] = {
    {"self_attn.q.", "attn1.to_q.", false},
    {"self_attn.k.", "attn1.to_k.", false},
    {"self_attn.v.", "attn1.to_v.", false},
    {"self_attn.o.", "attn1.to_out.0.", false},
    {"self_attn.norm_q.", "attn1.norm_q.", false},
    {"self_attn.norm_k.", "attn1.norm_k.", false},
    {"cross_attn.q.", "attn2.to_q.", false},
    {"cross_attn.k.", "attn2.to_k.", false},
    {"cross_attn.v.", "attn2.to_v.", false},
    {"cross_attn.o.", "attn2.to_out.0.", false},
    {"cross_attn.norm_q.", "attn2.norm_q.", false},
    {"cross_attn.norm_k.", "attn2.norm_k.", false},
    {"cross_attn.k_img.", "attn2.add_k_proj.", false},
    {"cross_attn.v_img.", "attn2.add_v_proj.", false},
    {"cross_attn.norm_k_img.", "attn2.norm_added_k.", false},
    // The norm swap: original norm3 is the affine cross-attention LN, which
    // diffusers calls norm2 (original norm2 is the parameter-free FFN LN).
    {"norm3.", "norm2.", false},
    {"ffn.0.", "ffn.net.0.proj.", false},
    {"ffn.2.", "ffn.net.2.", false},
    {"modulation", "scale_shift_table", true},
};

// Names (or block rests) that exist in both layouts unchanged.
constexpr const char* kSharedTop[] = {"patch_embedding."};

bool StartsWith(const std::string& s, const char* prefix) {
  return s.rfind(prefix, 0) == 0;
}

// Splits "blocks.<digits>.<rest>" into ("blocks.<digits>.", rest).
bool SplitBlock(const std::string& name, std::string* head, std::string* rest) {
  if (!StartsWith(name, "blocks.")) return false;
  size_t i = 7;
  while (i < name.size() && name[i] >= '0' && name[i] <= '9') ++i;
  if (i == 7 || i >= name.size() || name[i] != '.') return false;
  *head = name.substr(0, i + 1);
  *rest = name.substr(i + 1);
  return true;
}

template <size_t N>
std::optional<std::string> Apply(const Rename (&table)[N],
                                 const std::string& s, bool to_diffusers) {
  for (const Rename& r : table) {
    const char* from = to_diffusers ? r.original : r.diffusers;
    const char* to = to_diffusers ? r.diffusers : r.original;
    if (r.exact) {
      if (s == from) return std::string(to);
    } else if (StartsWith(s, from)) {
      return std::string(to) + s.substr(std::char_traits<char>::length(from));
    }
  }
  return std::nullopt;
}

std::optional<std::string> Translate(const std::string& name,
                                     bool to_diffusers) {
  std::string head, rest;
  if (SplitBlock(name, &head, &rest)) {
    std::optional<std::string> r = Apply(kBlock, rest, to_diffusers);
    if (!r) return std::nullopt;
    return head + *r;
  }
  for (const char* shared : kSharedTop)
    if (StartsWith(name, shared)) return name;
  return Apply(kTopLevel, name, to_diffusers);
}

}  // namespace

std::string ShardFileName(int index, int count) {
  char buf[96];
  std::snprintf(buf, sizeof(buf),
                "diffusion_pytorch_model-%05d-of-%05d.safetensors", index,
                count);
  return buf;
}

std::string StripComfyPrefix(const std::string& name) {
  return StartsWith(name, kComfyPrefix)
             ? name.substr(std::char_traits<char>::length(kComfyPrefix))
             : name;
}

std::optional<std::string> WanOriginalToDiffusers(const std::string& name) {
  return Translate(name, true);
}

std::optional<std::string> DiffusersToWanOriginal(const std::string& name) {
  return Translate(name, false);
}

NameLayout LayoutOfName(const std::string& name) {
  std::string head, rest;
  const bool block = SplitBlock(name, &head, &rest);
  const std::string& s = block ? rest : name;
  for (const char* shared : kSharedTop)
    if (!block && StartsWith(s, shared)) return NameLayout::kUnknown;
  auto in = [&](bool original_side) {
    const auto check = [&](const auto& table) {
      for (const Rename& r : table) {
        const char* key = original_side ? r.original : r.diffusers;
        if (r.exact ? s == key : StartsWith(s, key)) return true;
      }
      return false;
    };
    return block ? check(kBlock) : check(kTopLevel);
  };
  if (in(true)) return NameLayout::kWanOriginal;
  if (in(false)) return NameLayout::kDiffusers;
  // Diffusers-only names with no original counterpart.
  if (block && StartsWith(s, "attn2.norm_added_q.")) return NameLayout::kDiffusers;
  return NameLayout::kUnknown;
}

std::string WanOriginalConfigJson(const WanConfig& c) {
  nlohmann::json j = nlohmann::json::object();
  j["_class_name"] = "WanModel";
  j["dim"] = c.inner_dim();
  j["num_heads"] = c.num_attention_heads;
  j["in_dim"] = c.in_channels;
  j["out_dim"] = c.out_channels;
  j["ffn_dim"] = c.ffn_dim;
  j["freq_dim"] = c.freq_dim;
  j["text_dim"] = c.text_dim;
  j["num_layers"] = c.num_layers;
  j["eps"] = c.eps;
  j["patch_size"] = c.patch_size;
  j["qk_norm"] = c.qk_norm == "rms_norm_across_heads";
  j["cross_attn_norm"] = c.cross_attn_norm;
  j["window_size"] = {-1, -1};
  j["text_len"] = 512;
  j["vae_stride"] = c.vae_stride;
  if (c.is_i2v()) {
    j["model_type"] = c.pos_embed_seq_len > 0 ? "flf2v" : "i2v";
    j["image_dim"] = c.image_dim;
    j["added_kv_proj_dim"] = c.added_kv_proj_dim;
    if (c.pos_embed_seq_len > 0) j["pos_embed_seq_len"] = c.pos_embed_seq_len;
  } else {
    j["model_type"] = "t2v";
  }
  if (c.rope_max_seq_len != 1024) j["rope_max_seq_len"] = c.rope_max_seq_len;
  return j.dump(2) + "\n";
}

uint64_t TensorNameStream(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ull;  // FNV-1a 64 prime
  }
  return h;
}

}  // namespace dn::worker
