#include "worker/wan_config.h"

#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dn::worker {
namespace {

using ::testing::HasSubstr;

WanConfig Preset(const std::string& name) {
  absl::StatusOr<WanConfig> c = PresetConfig(name);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : WanConfig();
}

std::string ErrorOf(const std::string& json) {
  absl::StatusOr<WanConfig> c = WanConfig::FromJson(json);
  if (!c.ok()) return std::string(c.status().message());
  absl::Status v = c->Validate();
  return v.ok() ? "OK" : std::string(v.message());
}

TEST(WanConfigTest, PresetsMatchTheSpec) {
  const WanConfig tiny = Preset("tiny");
  EXPECT_EQ(tiny.num_layers, 2);
  EXPECT_EQ(tiny.num_attention_heads, 4);
  EXPECT_EQ(tiny.attention_head_dim, 16);
  EXPECT_EQ(tiny.inner_dim(), 64);
  EXPECT_EQ(tiny.in_channels, 16);
  EXPECT_EQ(tiny.out_channels, 16);
  EXPECT_EQ(tiny.text_dim, 32);
  EXPECT_EQ(tiny.ffn_dim, 128);
  EXPECT_EQ(tiny.freq_dim, 256);
  EXPECT_EQ(tiny.patch_size, (std::array<int, 3>{1, 2, 2}));
  EXPECT_EQ(tiny.vae_stride, (std::array<int, 3>{4, 8, 8}));
  EXPECT_FALSE(tiny.is_i2v());

  const WanConfig small = Preset("wan2.1-t2v-1.3b");
  EXPECT_EQ(small.inner_dim(), 1536);
  EXPECT_EQ(small.num_attention_heads, 12);
  EXPECT_EQ(small.ffn_dim, 8960);
  EXPECT_EQ(small.num_layers, 30);
  EXPECT_EQ(small.text_dim, 4096);
  EXPECT_EQ(small.eps, 1e-6);
  EXPECT_EQ(small.rope_max_seq_len, 1024);

  const WanConfig big = Preset("wan2.1-t2v-14b");
  EXPECT_EQ(big.inner_dim(), 5120);
  EXPECT_EQ(big.num_attention_heads, 40);
  EXPECT_EQ(big.ffn_dim, 13824);
  EXPECT_EQ(big.num_layers, 40);

  for (const char* name : {"tiny", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"})
    EXPECT_TRUE(Preset(name).Validate().ok()) << name;
  absl::StatusOr<WanConfig> bad = PresetConfig("wan2.2");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("unknown preset 'wan2.2'"));
}

TEST(WanConfigTest, JsonRoundTripsAndHashIsStable) {
  WanConfig i2v = Preset("wan2.1-t2v-14b");
  i2v.in_channels = 36;
  i2v.image_dim = 1280;
  i2v.added_kv_proj_dim = 5120;
  i2v.pos_embed_seq_len = 514;
  for (const WanConfig& c : {Preset("tiny"), Preset("wan2.1-t2v-1.3b"),
                             Preset("wan2.1-t2v-14b"), i2v}) {
    const std::string json = c.ToJson();
    absl::StatusOr<WanConfig> back = WanConfig::FromJson(json);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->ToJson(), json);
    EXPECT_EQ(back->Hash(), c.Hash());
    EXPECT_EQ(c.Hash().size(), 64u);
  }
  EXPECT_NE(Preset("tiny").Hash(), Preset("wan2.1-t2v-1.3b").Hash());
  EXPECT_NE(Preset("wan2.1-t2v-14b").Hash(), i2v.Hash());
  // Canonical form: sorted keys, class name first.
  const std::string tiny = Preset("tiny").ToJson();
  EXPECT_EQ(tiny.rfind("{\n  \"_class_name\": \"WanTransformer3DModel\",\n  "
                       "\"added_kv_proj_dim\": null,",
                       0),
            0u)
      << tiny;
  // Pinned: sha256 of the tiny preset's canonical JSON (checked with
  // sha256sum). A change here changes every config hash in metadata.
  EXPECT_EQ(Preset("tiny").Hash(),
            "1898e045260026d997f58336a82c5e336a61cdfc043464ac16b0e972f5e489e2");
}

// Every preset's config hash, pinned (the hash is sha256 of the canonical JSON,
// which holds every field, so a changed value in any preset fails here; logs
// print its first 12 digits, e.g. "config a5c97e6408bb" for wan2.1-t2v-1.3b).
// A new preset gets a row here; PresetNames() must list exactly these.
TEST(WanConfigTest, EveryPresetKeepsItsConfigHash) {
  const std::vector<std::pair<std::string, std::string>> pinned = {
      {"tiny", "1898e045260026d997f58336a82c5e336a61cdfc043464ac16b0e972f5e489e2"},
      {"demo-pixel", "0fcf059baaea7c37cb57a84435dd788d1f11ace358d811c856f28fc16e10e939"},
      {"wan2.1-t2v-1.3b", "a5c97e6408bb684c5f01e6614c128b592f24f8233dafd5bb18a14f560f4a314b"},
      {"wan2.1-t2v-14b", "a9306c6f2de08834315c15accbbdfa3c0a01371b7ef993431fa32aeca431c090"},
      {"wan2.2-t2v-a14b", "5020d1eec23150868dfc1509d52811ec87fd654acabd797ce720c3e31c3facb5"},
      {"tiny-t2v-a14b", "5f858ce7abdb45ce3306e6aa29b25a5996a6089f4b8bd69183c81e661fad54c4"},
      {"wan2.2-i2v-a14b", "3cb2f45dbfaf6044ba4047dc3f60adc0f029ccb5ff1a64865870ea057466cc0c"},
      {"tiny-i2v-a14b", "356aeb91712f6ce7f9c16a6190db53e1be89756405210a3644cc0c120bb94b09"},
      {"wan2.1-i2v-14b", "b9f0cfde2930e1e39765398917ebdfc05fa6aa7c0b8931fc5a33956bb4832802"},
      {"tiny-i2v-14b", "43a92bffaae32cf4f0ce2f5309d3c0e5c966768d489383d39e8643b7bb88b226"},
      {"wan2.2-ti2v-5b", "4ed4d354e375eb3c916f28fd6a145420e7191414c8e37d90af223888e7c7d92e"},
      {"tiny-ti2v", "d03fdded2db64ff3060da6994d26520a460c92462c451e5e0cd898f3f38b5c0f"},
  };
  std::vector<std::string> names;
  for (const auto& [name, hash] : pinned) {
    names.push_back(name);
    EXPECT_EQ(Preset(name).Hash(), hash) << name;
  }
  EXPECT_THAT(PresetNames(), ::testing::UnorderedElementsAreArray(names));
}

TEST(WanConfigTest, ReadsTheDiffusersHubConfig) {
  // Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (its fields).
  const std::string hub = R"({
    "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
    "added_kv_proj_dim": null, "attention_head_dim": 128, "cross_attn_norm": true,
    "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": null,
    "in_channels": 16, "num_attention_heads": 12, "num_layers": 30,
    "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024, "text_dim": 4096})";
  absl::StatusOr<WanConfig> c = WanConfig::FromJson(hub);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->ToJson(), Preset("wan2.1-t2v-1.3b").ToJson());
  // No keys at all: the class defaults (= T2V-14B).
  c = WanConfig::FromJson("{}");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->ToJson(), Preset("wan2.1-t2v-14b").ToJson());
}

TEST(WanConfigTest, ReadsOriginalWan21Names) {
  // Wan-AI/Wan2.1-T2V-1.3B config.json as released.
  const std::string t2v = R"({"_class_name": "WanModel", "_diffusers_version": "0.30.0",
    "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16,
    "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
    "text_len": 512})";
  absl::StatusOr<WanConfig> c = WanConfig::FromJson(t2v);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->ToJson(), Preset("wan2.1-t2v-1.3b").ToJson());

  const std::string i2v = R"({"_class_name": "WanModel", "dim": 5120, "ffn_dim": 13824,
    "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40,
    "out_dim": 16, "qk_norm": true, "cross_attn_norm": true, "window_size": [-1, -1]})";
  c = WanConfig::FromJson(i2v);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->is_i2v());
  EXPECT_EQ(c->in_channels, 36);
  EXPECT_EQ(c->image_dim, 1280);
  EXPECT_EQ(c->added_kv_proj_dim, 5120);
  EXPECT_EQ(c->pos_embed_seq_len, 0);
  EXPECT_TRUE(c->Validate().ok());

  c = WanConfig::FromJson(R"({"dim": 5120, "num_heads": 40, "in_dim": 36, "model_type": "flf2v"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->pos_embed_seq_len, 514);
}

TEST(WanConfigTest, ErrorsNameTheField) {
  struct Case {
    const char* json;
    const char* message;
  };
  const Case cases[] = {
      {"not json", "config is not valid JSON"},
      {"[1]", "config must be a JSON object"},
      {R"({"_class_name": "UNet2DConditionModel"})",
       "config field '_class_name': expected \"WanTransformer3DModel\""},
      {R"({"num_layers": "two"})", "config field 'num_layers': expected an integer, got \"two\""},
      {R"({"num_layers": 2.5})", "config field 'num_layers': expected an integer"},
      {R"({"num_layers": 0})", "config field 'num_layers' must be >= 1 (got 0)"},
      {R"({"num_layers": 99999999999})", "config field 'num_layers': out of range"},
      {R"({"image_dim": "x"})", "config field 'image_dim': expected an integer or null"},
      {R"({"patch_size": [1, 2]})", "config field 'patch_size': expected a list of 3 integers"},
      {R"({"patch_size": [1, 0, 2]})", "config field 'patch_size[1]' must be >= 1"},
      {R"({"vae_stride": "4,8,8"})", "config field 'vae_stride': expected a list of 3"},
      {R"({"attention_head_dim": 15})", "config field 'attention_head_dim' must be even"},
      {R"({"attention_head_dim": 4})", "config field 'attention_head_dim' must be >= 6"},
      {R"({"freq_dim": 255})", "config field 'freq_dim' must be even"},
      {R"({"eps": "small"})", "config field 'eps': expected a number"},
      {R"({"eps": -1})", "config field 'eps' must be in (0, 1]"},
      {R"({"qk_norm": "rms_norm"})", "config field 'qk_norm' must be \"rms_norm_across_heads\""},
      {R"({"qk_norm": false})", "config field 'qk_norm' must be"},
      {R"({"cross_attn_norm": false})", "config field 'cross_attn_norm' must be true"},
      {R"({"cross_attn_norm": 1})", "config field 'cross_attn_norm': expected true or false"},
      {R"({"num_heads": 12, "num_attention_heads": 40})",
       "config fields 'num_attention_heads' (40) and 'num_heads' (12) disagree"},
      {R"({"in_dim": 36, "in_channels": 16})", "'in_channels' (16) and 'in_dim' (36) disagree"},
      {R"({"dim": 1000, "num_heads": 12})", "config field 'dim': must be a positive multiple"},
      {R"({"dim": 1536, "num_heads": 12, "attention_head_dim": 64})",
       "config fields 'dim' (1536) and 'attention_head_dim' (64) disagree"},
      {R"({"window_size": [256, 256]})", "config field 'window_size': only [-1, -1]"},
      {R"({"model_type": "vace"})", "config field 'model_type'"},
      {R"({"image_dim": 1280})", "'image_dim' (1280) and 'added_kv_proj_dim' (0) must both"},
      {R"({"pos_embed_seq_len": 514})", "'pos_embed_seq_len' needs 'image_dim'"},
      {R"({"num_attention_heads": 100000, "attention_head_dim": 128})", "inner dim"},
      // Overflows computed before validation (int64 now) are still refused.
      {R"({"num_attention_heads": 1048576, "attention_head_dim": 1048576, "model_type": "i2v"})",
       "inner dim"},
      {R"({"patch_size": [1048576, 1048576, 1048576]})", "config: patch_size"},
      {R"({"patch_size": [64, 64, 64], "in_channels": 16})", "exceeds 1048576"},
  };
  for (const Case& c : cases)
    EXPECT_THAT(ErrorOf(c.json), HasSubstr(c.message)) << c.json;
  // A deeply nested value in an error message is shown shallowly (rendering
  // it whole would recurse once per level and overflow the stack).
  const std::string deep = R"({"num_layers": )" + std::string(100000, '[') +
                           std::string(100000, ']') + "}";
  EXPECT_THAT(ErrorOf(deep), HasSubstr("config field 'num_layers': expected an integer, got [[[...]]]"));
  EXPECT_THAT(ErrorOf(R"({"patch_size": [1, [2, {"a": [3]}], 4, 5]})"),
              HasSubstr(R"(got [1, [2, {...}], 4, 5])"));
}

// Wan2.2-TI2V-5B (docs/MODELS.md §1 table, §5) and its CI twin.
TEST(WanConfigTest, Ti2vPresetsAndConfigs) {
  const WanConfig c = Preset("wan2.2-ti2v-5b");
  EXPECT_EQ(c.num_attention_heads, 24);
  EXPECT_EQ(c.attention_head_dim, 128);
  EXPECT_EQ(c.inner_dim(), 3072);
  EXPECT_EQ(c.ffn_dim, 14336);
  EXPECT_EQ(c.num_layers, 30);
  EXPECT_EQ(c.in_channels, 48);
  EXPECT_EQ(c.out_channels, 48);
  EXPECT_EQ(c.text_dim, 4096);
  EXPECT_EQ(c.freq_dim, 256);
  EXPECT_EQ(c.eps, 1e-6);
  EXPECT_EQ(c.rope_max_seq_len, 1024);
  EXPECT_EQ(c.patch_size, (std::array<int, 3>{1, 2, 2}));
  EXPECT_EQ(c.vae_stride, (std::array<int, 3>{4, 16, 16}));
  EXPECT_EQ(c.image_dim, 0);
  EXPECT_EQ(c.num_experts(), 1);
  EXPECT_TRUE(c.is_ti2v());
  EXPECT_FALSE(c.is_i2v());
  const WanConfig tiny = Preset("tiny-ti2v");
  EXPECT_TRUE(tiny.is_ti2v());
  EXPECT_EQ(tiny.in_channels, 48);
  EXPECT_EQ(tiny.out_channels, 48);
  EXPECT_EQ(tiny.num_attention_heads, 4);
  EXPECT_EQ(tiny.vae_stride, (std::array<int, 3>{4, 16, 16}));
  for (const WanConfig& t : {c, tiny}) {
    ASSERT_TRUE(t.Validate().ok()) << t.Validate();
    absl::StatusOr<WanConfig> back = WanConfig::FromJson(t.ToJson());
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->ToJson(), t.ToJson());
    EXPECT_TRUE(back->is_ti2v());
  }
  // Only TI2V writes the field: no other model's hash changes.
  EXPECT_EQ(Preset("tiny").ToJson().find("expand_timesteps"), std::string::npos);
  EXPECT_NE(c.ToJson().find("\"expand_timesteps\": true"), std::string::npos);
  // The diffusers Hub transformer config (no vae_stride, no expand_timesteps):
  // 48 channels in and out = the Wan2.2 VAE and TI2V.
  const std::string hub = R"({"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": null,
    "attention_head_dim": 128, "cross_attn_norm": true, "eps": 1e-06, "ffn_dim": 14336,
    "freq_dim": 256, "image_dim": null, "in_channels": 48, "num_attention_heads": 24,
    "num_layers": 30, "out_channels": 48, "patch_size": [1, 2, 2], "pos_embed_seq_len": null,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096})";
  absl::StatusOr<WanConfig> h = WanConfig::FromJson(hub);
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->ToJson(), c.ToJson());
  // The original Wan2.2 config: model_type "ti2v".
  absl::StatusOr<WanConfig> o = WanConfig::FromJson(
      R"({"_class_name": "WanModel", "dim": 3072, "num_heads": 24, "in_dim": 48, "out_dim": 48,
          "ffn_dim": 14336, "freq_dim": 256, "num_layers": 30, "eps": 1e-06,
          "model_type": "ti2v"})");
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->ToJson(), c.ToJson());
  // An explicit false wins over the 48-channel default; a bad value is named.
  absl::StatusOr<WanConfig> off = WanConfig::FromJson(
      R"({"in_channels": 48, "out_channels": 48, "expand_timesteps": false})");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->is_ti2v());
  EXPECT_THAT(ErrorOf(R"({"expand_timesteps": 1})"), HasSubstr("'expand_timesteps'"));
  EXPECT_THAT(ErrorOf(R"({"in_channels": 36, "expand_timesteps": true})"),
              HasSubstr("'expand_timesteps' needs in_channels"));
}

}  // namespace
}  // namespace dn::worker
