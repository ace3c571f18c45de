#include "worker/checkpoint.h"

#include <cmath>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "nlohmann/json.hpp"
#include "tests/worker/io_test_util.h"
#include "worker/checkpoint_format.h"
#include "worker/noise.h"
#include "worker/safetensors.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::ReadFile;
using testing_util::TempDir;
using testing_util::WriteFile;

WanConfig Tiny() { return *PresetConfig("tiny"); }

WanConfig I2V() {
  WanConfig c = *PresetConfig("wan2.1-t2v-14b");
  c.in_channels = 36;
  c.image_dim = 1280;
  c.added_kv_proj_dim = 5120;
  return c;
}

std::vector<float> Read(const WeightSource& w, const TensorSpec& spec) {
  std::vector<float> out(static_cast<size_t>(NumElements(spec.shape)));
  absl::Status s = w.ReadF32(spec.name, out.data());
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::map<std::string, Shape> SpecMap(const WanConfig& c) {
  std::map<std::string, Shape> m;
  for (const TensorSpec& s : ExpectedTensors(c)) m[s.name] = s.shape;
  return m;
}

// --- Expected tensors --------------------------------------------------------

TEST(CheckpointTest, ExpectedTensorsMatchTheSpec) {
  const WanConfig small = *PresetConfig("wan2.1-t2v-1.3b");
  const WanConfig big = *PresetConfig("wan2.1-t2v-14b");
  EXPECT_EQ(ExpectedTensors(small).size(), 825u);
  EXPECT_EQ(ExpectedTensors(big).size(), 1095u);
  EXPECT_EQ(ExpectedTensors(Tiny()).size(), 15u + 2 * 27);
  EXPECT_EQ(ExpectedTensors(I2V()).size(), 15u + 8 + 40 * (27 + 5));

  auto params = [](const WanConfig& c) {
    int64_t n = 0;
    for (const TensorSpec& s : ExpectedTensors(c)) n += NumElements(s.shape);
    return n;
  };
  // Spec §1: 1.3B -> 1.419 B total, 46.44 M/block; 14B -> 14.289 B, 351.39 M/block.
  EXPECT_NEAR(params(small) / 1e9, 1.419, 0.0005);
  EXPECT_NEAR(params(big) / 1e9, 14.289, 0.001);  // 14.2885 exactly
  WanConfig one = small;
  one.num_layers = 1;
  EXPECT_NEAR((params(small) - params(one)) / 29 / 1e6, 46.44, 0.005);

  const auto m = SpecMap(small);
  EXPECT_EQ(m.at("patch_embedding.weight"), (Shape{1536, 16, 1, 2, 2}));
  EXPECT_EQ(m.at("condition_embedder.time_embedder.linear_1.weight"), (Shape{1536, 256}));
  EXPECT_EQ(m.at("condition_embedder.time_proj.weight"), (Shape{9216, 1536}));
  EXPECT_EQ(m.at("condition_embedder.time_proj.bias"), (Shape{9216}));
  EXPECT_EQ(m.at("condition_embedder.text_embedder.linear_1.weight"), (Shape{1536, 4096}));
  EXPECT_EQ(m.at("scale_shift_table"), (Shape{1, 2, 1536}));
  EXPECT_EQ(m.at("proj_out.weight"), (Shape{64, 1536}));
  EXPECT_EQ(m.at("proj_out.bias"), (Shape{64}));
  EXPECT_EQ(m.at("blocks.29.scale_shift_table"), (Shape{1, 6, 1536}));
  EXPECT_EQ(m.at("blocks.0.attn1.to_out.0.weight"), (Shape{1536, 1536}));
  EXPECT_EQ(m.at("blocks.0.attn2.norm_k.weight"), (Shape{1536}));
  EXPECT_EQ(m.at("blocks.0.norm2.bias"), (Shape{1536}));
  EXPECT_EQ(m.at("blocks.0.ffn.net.0.proj.weight"), (Shape{8960, 1536}));
  EXPECT_EQ(m.at("blocks.0.ffn.net.2.weight"), (Shape{1536, 8960}));
  EXPECT_EQ(m.count("blocks.30.norm2.bias"), 0u);
  EXPECT_EQ(m.count("blocks.0.norm3.weight"), 0u);
  EXPECT_EQ(m.count("blocks.0.norm1.weight"), 0u);

  const auto i = SpecMap(I2V());
  EXPECT_EQ(i.at("patch_embedding.weight"), (Shape{5120, 36, 1, 2, 2}));
  EXPECT_EQ(i.at("blocks.3.attn2.add_k_proj.weight"), (Shape{5120, 5120}));
  EXPECT_EQ(i.at("blocks.3.attn2.norm_added_k.weight"), (Shape{5120}));
  EXPECT_EQ(i.at("condition_embedder.image_embedder.norm1.weight"), (Shape{1280}));
  EXPECT_EQ(i.at("condition_embedder.image_embedder.ff.net.0.proj.weight"), (Shape{1280, 1280}));
  EXPECT_EQ(i.at("condition_embedder.image_embedder.ff.net.2.weight"), (Shape{5120, 1280}));
  EXPECT_EQ(i.at("condition_embedder.image_embedder.norm2.bias"), (Shape{5120}));
  WanConfig flf = I2V();
  flf.pos_embed_seq_len = 514;
  EXPECT_EQ(SpecMap(flf).at("condition_embedder.image_embedder.pos_embed"),
            (Shape{1, 514, 1280}));
}

// --- Name mapping --------------------------------------------------------------

TEST(CheckpointTest, MapsOriginalWan21Names) {
  const std::map<std::string, std::string> cases = {
      {"patch_embedding.weight", "patch_embedding.weight"},
      {"time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"},
      {"time_embedding.2.bias", "condition_embedder.time_embedder.linear_2.bias"},
      {"time_projection.1.weight", "condition_embedder.time_proj.weight"},
      {"text_embedding.0.bias", "condition_embedder.text_embedder.linear_1.bias"},
      {"text_embedding.2.weight", "condition_embedder.text_embedder.linear_2.weight"},
      {"head.modulation", "scale_shift_table"},
      {"head.head.weight", "proj_out.weight"},
      {"blocks.7.modulation", "blocks.7.scale_shift_table"},
      {"blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"},
      {"blocks.0.self_attn.k.bias", "blocks.0.attn1.to_k.bias"},
      {"blocks.0.self_attn.v.weight", "blocks.0.attn1.to_v.weight"},
      {"blocks.12.self_attn.o.weight", "blocks.12.attn1.to_out.0.weight"},
      {"blocks.0.self_attn.norm_q.weight", "blocks.0.attn1.norm_q.weight"},
      {"blocks.0.self_attn.norm_k.weight", "blocks.0.attn1.norm_k.weight"},
      {"blocks.1.cross_attn.q.weight", "blocks.1.attn2.to_q.weight"},
      {"blocks.1.cross_attn.o.bias", "blocks.1.attn2.to_out.0.bias"},
      {"blocks.1.cross_attn.norm_k.weight", "blocks.1.attn2.norm_k.weight"},
      {"blocks.1.cross_attn.k_img.weight", "blocks.1.attn2.add_k_proj.weight"},
      {"blocks.1.cross_attn.v_img.bias", "blocks.1.attn2.add_v_proj.bias"},
      {"blocks.1.cross_attn.norm_k_img.weight", "blocks.1.attn2.norm_added_k.weight"},
      // The norm swap.
      {"blocks.2.norm3.weight", "blocks.2.norm2.weight"},
      {"blocks.2.norm3.bias", "blocks.2.norm2.bias"},
      {"blocks.2.ffn.0.weight", "blocks.2.ffn.net.0.proj.weight"},
      {"blocks.2.ffn.2.bias", "blocks.2.ffn.net.2.bias"},
      {"img_emb.proj.0.weight", "condition_embedder.image_embedder.norm1.weight"},
      {"img_emb.proj.1.weight", "condition_embedder.image_embedder.ff.net.0.proj.weight"},
      {"img_emb.proj.3.bias", "condition_embedder.image_embedder.ff.net.2.bias"},
      {"img_emb.proj.4.bias", "condition_embedder.image_embedder.norm2.bias"},
      {"img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"},
  };
  for (const auto& [orig, diff] : cases) {
    EXPECT_EQ(WanOriginalToDiffusers(orig).value_or("<none>"), diff) << orig;
    EXPECT_EQ(DiffusersToWanOriginal(diff).value_or("<none>"), orig) << diff;
  }
  EXPECT_EQ(StripComfyPrefix("model.diffusion_model.head.head.bias"), "head.head.bias");
  EXPECT_EQ(StripComfyPrefix("head.head.bias"), "head.head.bias");
  // Not original names.
  EXPECT_FALSE(WanOriginalToDiffusers("blocks.0.attn1.to_q.weight").has_value());
  EXPECT_FALSE(WanOriginalToDiffusers("blocks.0.norm2.weight").has_value());
  EXPECT_FALSE(WanOriginalToDiffusers("blocks.x.norm3.weight").has_value());
  EXPECT_FALSE(DiffusersToWanOriginal("blocks.0.attn2.norm_added_q.weight").has_value());
  EXPECT_EQ(LayoutOfName("blocks.0.norm3.weight"), NameLayout::kWanOriginal);
  EXPECT_EQ(LayoutOfName("blocks.0.norm2.weight"), NameLayout::kDiffusers);
  EXPECT_EQ(LayoutOfName("head.modulation"), NameLayout::kWanOriginal);
  EXPECT_EQ(LayoutOfName("scale_shift_table"), NameLayout::kDiffusers);
  EXPECT_EQ(LayoutOfName("patch_embedding.bias"), NameLayout::kUnknown);

  // Every diffusers tensor of every model kind has an original name that maps back.
  WanConfig flf = I2V();
  flf.pos_embed_seq_len = 514;
  std::set<std::string> originals;
  for (const TensorSpec& s : ExpectedTensors(flf)) {
    std::optional<std::string> orig = DiffusersToWanOriginal(s.name);
    ASSERT_TRUE(orig.has_value()) << s.name;
    EXPECT_EQ(WanOriginalToDiffusers(*orig).value_or(""), s.name);
    EXPECT_TRUE(originals.insert(*orig).second) << *orig;
  }
}

// --- Preset weights ------------------------------------------------------------

TEST(CheckpointTest, PresetInitRule) {
  const WanConfig c = *PresetConfig("wan2.1-t2v-1.3b");
  const uint64_t seed = 11;
  auto init = [&](const std::string& name) { return PresetInit(c, name, seed); };
  EXPECT_EQ(init("blocks.0.attn1.to_q.weight").std, static_cast<float>(1 / std::sqrt(1536.0)));
  EXPECT_EQ(init("blocks.0.attn1.to_q.weight").mean, 0.0f);
  EXPECT_EQ(init("blocks.0.ffn.net.2.weight").std, static_cast<float>(1 / std::sqrt(8960.0)));
  EXPECT_EQ(init("condition_embedder.text_embedder.linear_1.weight").std,
            static_cast<float>(1 / std::sqrt(4096.0)));
  EXPECT_EQ(init("patch_embedding.weight").std, static_cast<float>(1 / std::sqrt(64.0)));
  EXPECT_EQ(init("proj_out.bias").std, 0.02f);
  EXPECT_EQ(init("blocks.3.norm2.bias").std, 0.02f);
  EXPECT_EQ(init("blocks.3.norm2.bias").mean, 0.0f);
  for (const char* norm : {"blocks.3.norm2.weight", "blocks.3.attn1.norm_q.weight",
                           "blocks.3.attn2.norm_k.weight"}) {
    EXPECT_EQ(init(norm).mean, 1.0f) << norm;
    EXPECT_EQ(init(norm).std, 0.05f) << norm;
  }
  EXPECT_EQ(init("scale_shift_table").std, static_cast<float>(1 / std::sqrt(1536.0)));
  EXPECT_EQ(init("blocks.29.scale_shift_table").std, static_cast<float>(1 / std::sqrt(1536.0)));
  // Stream = FNV-1a 64 of the name; seed passed through.
  EXPECT_EQ(TensorNameStream(""), 0xcbf29ce484222325ull);
  EXPECT_EQ(TensorNameStream("a"), 0xaf63dc4c8601ec8cull);
  EXPECT_EQ(TensorNameStream("foobar"), 0x85944171f73967e8ull);
  EXPECT_EQ(init("proj_out.bias").stream, TensorNameStream("proj_out.bias"));
  EXPECT_EQ(init("proj_out.bias").seed, seed);
  EXPECT_NE(init("proj_out.bias").stream, init("proj_out.weight").stream);
}

TEST(CheckpointTest, PresetWeightsAreDeterministicAndFollowTheRule) {
  const WanConfig c = Tiny();
  auto a = MakePresetWeights(c, 5);
  auto b = MakePresetWeights(c, 5);
  auto other = MakePresetWeights(c, 6);
  ASSERT_TRUE(a.ok() && b.ok() && other.ok());
  for (const TensorSpec& spec : ExpectedTensors(c)) {
    const std::vector<float> va = Read(**a, spec), vb = Read(**b, spec);
    EXPECT_EQ(va, vb) << spec.name;
    EXPECT_NE(va, Read(**other, spec)) << spec.name;
    const RandomInit* r = (*a)->random_init(spec.name);
    ASSERT_NE(r, nullptr) << spec.name;
    const RandomInit expected = PresetInit(c, spec.name, 5);
    EXPECT_EQ(r->seed, expected.seed);
    EXPECT_EQ(r->stream, expected.stream);
    EXPECT_EQ(r->mean, expected.mean);
    EXPECT_EQ(r->std, expected.std);
    // ReadF32 is exactly FillNormal with the RandomInit.
    std::vector<float> filled(va.size());
    FillNormal(r->seed, r->stream, 0, r->mean, r->std, filled.data(), filled.size());
    EXPECT_EQ(va, filled) << spec.name;
  }
  EXPECT_EQ((*a)->random_init("nope"), nullptr);
  float dummy;
  EXPECT_FALSE((*a)->ReadF32("nope", &dummy).ok());

  // Statistics of a big tensor follow the rule.
  const WanConfig small = *PresetConfig("wan2.1-t2v-1.3b");
  auto w = MakePresetWeights(small, 1);
  ASSERT_TRUE(w.ok());
  const TensorSpec spec{"blocks.0.attn1.to_q.weight", {1536, 1536}};
  const std::vector<float> q = Read(**w, spec);
  double sum = 0, sq = 0;
  for (float v : q) {
    sum += v;
    sq += static_cast<double>(v) * v;
  }
  const double mean = sum / q.size(), sd = std::sqrt(sq / q.size() - mean * mean);
  EXPECT_NEAR(mean, 0.0, 1e-4);
  EXPECT_NEAR(sd * std::sqrt(1536.0), 1.0, 0.005);
  const std::vector<float> g = Read(**w, {"blocks.0.norm2.weight", {1536}});
  double gm = 0;
  for (float v : g) gm += v;
  EXPECT_NEAR(gm / g.size(), 1.0, 0.01);
}

// --- Write + open --------------------------------------------------------------

void ExpectSameWeights(const WeightSource& got, const WeightSource& want, DType dtype) {
  for (const TensorSpec& spec : ExpectedTensors(want.config())) {
    std::vector<float> expected = Read(want, spec);
    if (dtype == DType::kBF16)
      for (float& v : expected) v = BF16ToF32(F32ToBF16(v));
    if (dtype == DType::kF16)
      for (float& v : expected) v = F16ToF32(F32ToF16(v));
    EXPECT_EQ(Read(got, spec), expected) << spec.name;
  }
}

TEST(CheckpointTest, WriteThenOpenRoundTripsEveryDType) {
  auto preset = MakePresetWeights(Tiny(), 3);
  ASSERT_TRUE(preset.ok());
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    TempDir dir;
    ASSERT_TRUE(WriteCheckpoint(**preset, dir.path(), dtype).ok());
    EXPECT_TRUE(std::filesystem::exists(dir / kSingleFileName));
    EXPECT_FALSE(std::filesystem::exists(dir / kIndexFileName));
    EXPECT_EQ(ReadFile(dir / "config.json"), Tiny().ToJson());
    auto file = SafetensorsFile::Open(dir / kSingleFileName);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((*file)->header().metadata.at("format"), "pt");
    for (const SafetensorsEntry& e : (*file)->tensors()) EXPECT_EQ(e.dtype, dtype);

    auto opened = OpenCheckpoint(dir.path() + "/");
    ASSERT_TRUE(opened.ok()) << opened.status();
    EXPECT_EQ((*opened)->config().Hash(), Tiny().Hash());
    EXPECT_EQ((*opened)->random_init("proj_out.weight"), nullptr);
    EXPECT_THAT((*opened)->description(), HasSubstr(DTypeName(dtype)));
    ExpectSameWeights(**opened, **preset, dtype);
  }
}

// Two experts (docs/MODELS.md §3): a pipeline folder round-trips (both
// layouts), each expert keeps its own weights, and inconsistent folders are
// refused with a message naming the problem.
TEST(CheckpointTest, TwoExpertPipelineFolders) {
  auto config = PresetConfig("tiny-t2v-a14b");
  ASSERT_TRUE(config.ok());
  auto preset = MakePresetWeights(*config, 3);
  ASSERT_TRUE(preset.ok()) << preset.status();
  ASSERT_EQ((*preset)->num_experts(), 2);
  auto high = MakePresetWeights(config->TransformerOnly(), 3);
  auto low = MakePresetWeights(config->TransformerOnly(), 4);
  for (bool original : {false, true}) {
    TempDir dir;
    CheckpointWriteOptions o;
    o.names = original ? NameLayout::kWanOriginal : NameLayout::kDiffusers;
    ASSERT_TRUE(WriteCheckpointWithOptions(**preset, dir.path(), o).ok());
    EXPECT_EQ(std::filesystem::exists(dir / "model_index.json"), !original);
    auto opened = OpenCheckpoint(dir.path());
    ASSERT_TRUE(opened.ok()) << opened.status();
    EXPECT_EQ((*opened)->num_experts(), 2);
    EXPECT_EQ((*opened)->config().boundary_ratio, 0.875);
    EXPECT_EQ((*opened)->config().Hash(), config->Hash());
    EXPECT_EQ((*opened)->expert(0).config().num_experts(), 1);
    ExpectSameWeights((*opened)->expert(0), **high, DType::kF32);
    ExpectSameWeights((*opened)->expert(1), **low, DType::kF32);
  }
  TempDir dir;
  ASSERT_TRUE(WriteCheckpoint(**preset, dir.path(), DType::kF32).ok());
  std::filesystem::remove(dir / "model_index.json");
  auto no_boundary = OpenCheckpoint(dir.path());
  EXPECT_EQ(no_boundary.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(no_boundary.status().message()), HasSubstr("boundary_ratio"));
  // Experts of different shapes.
  auto other = MakePresetWeights(*PresetConfig("demo-pixel"), 1);
  ASSERT_TRUE(other.ok());
  auto mixed = MakeTwoExpertWeights(std::move(*high), std::move(*other), 0.875);
  EXPECT_EQ(mixed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(mixed.status().message()), HasSubstr("different transformer configs"));
}

TEST(CheckpointTest, ShardsWithIndex) {
  TempDir dir;
  auto preset = MakePresetWeights(Tiny(), 9);
  ASSERT_TRUE(preset.ok());
  // tiny in f32 is ~646 KB; 100 KB shards give several files.
  ASSERT_TRUE(WriteCheckpoint(**preset, dir.path(), DType::kF32, 100000).ok());
  EXPECT_FALSE(std::filesystem::exists(dir / kSingleFileName));
  const nlohmann::json index = nlohmann::json::parse(ReadFile(dir / kIndexFileName));
  std::set<std::string> files;
  int64_t total = 0;
  for (const TensorSpec& s : ExpectedTensors(Tiny())) {
    ASSERT_TRUE(index["weight_map"].contains(s.name)) << s.name;
    files.insert(index["weight_map"][s.name].get<std::string>());
    total += NumElements(s.shape) * 4;
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), total);
  const int n = static_cast<int>(files.size());
  EXPECT_GE(n, 6);
  for (int i = 1; i <= n; ++i) {
    const std::string name = ShardFileName(i, n);
    EXPECT_TRUE(files.count(name)) << name;
    EXPECT_LE(std::filesystem::file_size(dir / name), 100000u + 4096u);
  }
  EXPECT_EQ(ShardFileName(2, 7), "diffusion_pytorch_model-00002-of-00007.safetensors");
  auto opened = OpenCheckpoint(dir.path());
  ASSERT_TRUE(opened.ok()) << opened.status();
  ExpectSameWeights(**opened, **preset, DType::kF32);

  // Rewriting as one file removes the shards and the index.
  ASSERT_TRUE(WriteCheckpoint(**preset, dir.path(), DType::kBF16).ok());
  EXPECT_FALSE(std::filesystem::exists(dir / kIndexFileName));
  EXPECT_FALSE(std::filesystem::exists(dir / ShardFileName(1, n)));
  opened = OpenCheckpoint(dir.path());
  ASSERT_TRUE(opened.ok()) << opened.status();
  ExpectSameWeights(**opened, **preset, DType::kBF16);
}

TEST(CheckpointTest, LoadsOriginalNamesWithTheNormSwapAndComfyPrefix) {
  TempDir dir;
  auto preset = MakePresetWeights(Tiny(), 4);
  ASSERT_TRUE(preset.ok());
  CheckpointWriteOptions options;
  options.names = NameLayout::kWanOriginal;
  ASSERT_TRUE(WriteCheckpointWithOptions(**preset, dir.path(), options).ok());
  const nlohmann::json config = nlohmann::json::parse(ReadFile(dir / "config.json"));
  EXPECT_EQ(config["_class_name"], "WanModel");
  EXPECT_EQ(config["dim"], 64);
  auto file = SafetensorsFile::Open(dir / kSingleFileName);
  ASSERT_TRUE(file.ok());
  EXPECT_NE((*file)->Find("blocks.1.norm3.weight"), nullptr);
  EXPECT_NE((*file)->Find("blocks.0.self_attn.o.bias"), nullptr);
  EXPECT_NE((*file)->Find("head.modulation"), nullptr);
  EXPECT_EQ((*file)->Find("blocks.1.norm2.weight"), nullptr);
  // The original norm3 tensor holds what diffusers calls norm2.
  std::vector<float> norm3(64);
  ASSERT_TRUE((*file)->ReadF32(*(*file)->Find("blocks.1.norm3.bias"), norm3.data()).ok());
  EXPECT_EQ(norm3, Read(**preset, {"blocks.1.norm2.bias", {64}}));

  auto opened = OpenCheckpoint(dir.path());
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_THAT((*opened)->description(), HasSubstr("original Wan2.1 names"));
  EXPECT_EQ((*opened)->config().ToJson(), Tiny().ToJson());
  ExpectSameWeights(**opened, **preset, DType::kF32);

  // ComfyUI: the same tensors with a model.diffusion_model. prefix, in one
  // file with another name.
  TempDir comfy;
  std::vector<SafetensorsTensorRef> refs;
  for (const SafetensorsEntry& e : (*file)->tensors())
    refs.push_back({std::string(kComfyPrefix) + e.name, e.dtype, e.shape,
                    (*file)->RawData(e)});
  ASSERT_TRUE(WriteSafetensors(comfy / "wan2.1_t2v_tiny.safetensors", refs).ok());
  WriteFile(comfy / "config.json", ReadFile(dir / "config.json"));
  opened = OpenCheckpoint(comfy.path());
  ASSERT_TRUE(opened.ok()) << opened.status();
  ExpectSameWeights(**opened, **preset, DType::kF32);
}

TEST(CheckpointTest, FindsTheTransformerSubfolder) {
  TempDir dir;
  auto preset = MakePresetWeights(Tiny(), 2);
  ASSERT_TRUE(preset.ok());
  ASSERT_TRUE(WriteCheckpoint(**preset, dir / "transformer", DType::kBF16).ok());
  auto opened = OpenCheckpoint(dir.path());
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_THAT((*opened)->description(), HasSubstr("/transformer"));
}

// --- Bad checkpoints -------------------------------------------------------------

// The tiny preset's tensors in memory, to write edited copies.
struct Tensors {
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  std::vector<std::vector<float>> data;

  static Tensors Preset() {
    Tensors t;
    auto w = MakePresetWeights(Tiny(), 1);
    for (const TensorSpec& s : ExpectedTensors(Tiny())) {
      t.names.push_back(s.name);
      t.shapes.push_back(s.shape);
      t.data.push_back(Read(**w, s));
    }
    return t;
  }
  void Remove(const std::string& name) {
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) {
        names.erase(names.begin() + i);
        shapes.erase(shapes.begin() + i);
        data.erase(data.begin() + i);
        return;
      }
    ADD_FAILURE() << "no " << name;
  }
  void Add(const std::string& name, Shape shape) {
    names.push_back(name);
    data.emplace_back(static_cast<size_t>(NumElements(shape)), 0.5f);
    shapes.push_back(std::move(shape));
  }
  void Write(const std::string& dir, const std::string& config_json = Tiny().ToJson(),
             const std::string& file = kSingleFileName) const {
    std::filesystem::create_directories(dir);
    std::vector<SafetensorsTensorRef> refs;
    for (size_t i = 0; i < names.size(); ++i)
      refs.push_back({names[i], DType::kF32, shapes[i], data[i].data()});
    ASSERT_TRUE(WriteSafetensors(dir + "/" + file, refs).ok());
    WriteFile(dir + "/config.json", config_json);
  }
};

std::string OpenError(const std::string& dir) {
  auto opened = OpenCheckpoint(dir);
  return opened.ok() ? "OK" : std::string(opened.status().message());
}

TEST(CheckpointTest, BadCheckpointsNameTheProblem) {
  {
    TempDir dir;
    Tensors::Preset().Write(dir.path());
    EXPECT_EQ(OpenError(dir.path()), "OK");
  }
  {  // missing tensor
    TempDir dir;
    Tensors t = Tensors::Preset();
    t.Remove("blocks.1.attn2.to_k.bias");
    t.Write(dir.path());
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("(1 problem): missing tensor blocks.1.attn2.to_k.bias "
                          "(expected shape [64])"));
  }
  {  // extra tensor
    TempDir dir;
    Tensors t = Tensors::Preset();
    t.Add("blocks.0.norm1.weight", {64});
    t.Write(dir.path());
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("(1 problem): unexpected tensor blocks.0.norm1.weight with shape [64]"));
  }
  {  // wrong shape
    TempDir dir;
    Tensors t = Tensors::Preset();
    t.Remove("proj_out.weight");
    t.Add("proj_out.weight", {64, 32});
    t.Write(dir.path());
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("tensor proj_out.weight has shape [64, 32], expected [64, 64]"));
  }
  {  // several problems in one message, the first few listed
    TempDir dir;
    Tensors t = Tensors::Preset();
    for (int i = 0; i < 12; ++i) t.Remove(t.names.back());
    t.Add("extra", {1});
    t.Write(dir.path());
    const std::string e = OpenError(dir.path());
    EXPECT_THAT(e, HasSubstr("(13 problems)"));
    EXPECT_THAT(e, HasSubstr("missing tensor blocks.1.attn2.to_v.weight (expected shape [64, 64])"));
    EXPECT_THAT(e, HasSubstr("and 5 more"));
  }
  {  // config too deep for the file: a missing layer
    TempDir dir;
    WanConfig three = Tiny();
    three.num_layers = 3;
    Tensors::Preset().Write(dir.path(), three.ToJson());
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("missing tensor blocks.2.scale_shift_table"));
  }
  {  // bad config field
    TempDir dir;
    Tensors::Preset().Write(dir.path(), R"({"num_layers": "two"})");
    const std::string e = OpenError(dir.path());
    EXPECT_THAT(e, HasSubstr("config.json: config field 'num_layers'"));
  }
  {  // config fails validation
    TempDir dir;
    Tensors::Preset().Write(dir.path(), R"({"qk_norm": "rms_norm"})");
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("config field 'qk_norm'"));
  }
  {  // no config
    TempDir dir;
    Tensors::Preset().Write(dir.path());
    std::filesystem::remove(dir / "config.json");
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("no config.json"));
  }
  {  // unsupported dtype inside the file names the tensor
    TempDir dir;
    Tensors::Preset().Write(dir.path());
    std::string bytes = ReadFile(dir / kSingleFileName);
    const size_t at = bytes.find(R"("proj_out.bias":{"dtype":"F32")");
    ASSERT_NE(at, std::string::npos);
    bytes.replace(at + 26, 3, "I32");
    WriteFile(dir / kSingleFileName, bytes);
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("tensor 'proj_out.bias' has dtype 'I32'"));
  }
  {  // a stray name of the other layout
    TempDir dir;
    Tensors t = Tensors::Preset();
    t.Add("blocks.0.self_attn.q.weight", {64, 64});
    t.Add("blocks.0.norm3.weight", {64});
    t.Write(dir.path());
    const std::string e = OpenError(dir.path());
    EXPECT_THAT(e, HasSubstr("(2 problems)"));
    EXPECT_THAT(e, HasSubstr("unexpected tensor blocks.0.self_attn.q.weight with shape [64, 64] "
                             "(an original Wan2.1 name in a diffusers checkpoint)"));
    EXPECT_THAT(e, HasSubstr("unexpected tensor blocks.0.norm3.weight"));
  }
  {  // the same tensor twice (with and without the ComfyUI prefix)
    TempDir dir;
    Tensors t = Tensors::Preset();
    t.Add("model.diffusion_model.proj_out.bias", {64});
    t.Write(dir.path());
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("tensor proj_out.bias stored twice"));
  }
  {  // original layout with a tensor original Wan2.1 does not have
    TempDir dir;
    auto preset = MakePresetWeights(Tiny(), 1);
    CheckpointWriteOptions options;
    options.names = NameLayout::kWanOriginal;
    ASSERT_TRUE(WriteCheckpointWithOptions(**preset, dir.path(), options).ok());
    auto file = SafetensorsFile::Open(dir / kSingleFileName);
    std::vector<SafetensorsTensorRef> refs;
    for (const SafetensorsEntry& e : (*file)->tensors())
      refs.push_back({e.name, e.dtype, e.shape, (*file)->RawData(e)});
    const float zeros[64] = {};
    refs.push_back({"blocks.0.norm2.weight", DType::kF32, {64}, zeros});
    ASSERT_TRUE(WriteSafetensors(dir / "other.safetensors", refs).ok());
    std::filesystem::remove(dir / kSingleFileName);
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("(1 problem): unexpected tensor blocks.0.norm2.weight with shape [64] "
                          "(a diffusers name in an original Wan2.1 checkpoint)"));
  }
}

TEST(CheckpointTest, BadFileSetsAreRejected) {
  {  // no weights
    TempDir dir;
    WriteFile(dir / "config.json", Tiny().ToJson());
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("no .safetensors file"));
  }
  {  // two files and no index
    TempDir dir;
    Tensors::Preset().Write(dir.path(), Tiny().ToJson(), "a.safetensors");
    Tensors::Preset().Write(dir.path(), Tiny().ToJson(), "b.safetensors");
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("2 .safetensors files (a.safetensors, b.safetensors) but no"));
  }
  auto preset = MakePresetWeights(Tiny(), 9);
  // Writes tiny in 200 KB shards; returns the shard count.
  auto sharded = [&](const TempDir& dir) {
    EXPECT_TRUE(WriteCheckpoint(**preset, dir.path(), DType::kF32, 200000).ok());
    std::set<std::string> files;
    const nlohmann::json index = nlohmann::json::parse(ReadFile(dir / kIndexFileName));
    for (const auto& [name, file] : index["weight_map"].items()) files.insert(file);
    EXPECT_GE(files.size(), 3u);
    return static_cast<int>(files.size());
  };
  {  // index points outside the folder
    TempDir dir;
    sharded(dir);
    nlohmann::json index = nlohmann::json::parse(ReadFile(dir / kIndexFileName));
    index["weight_map"]["proj_out.bias"] = "../x.safetensors";
    WriteFile(dir / kIndexFileName, index.dump());
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("weight_map names '../x.safetensors'"));
  }
  {  // index names a shard that is missing
    TempDir dir;
    const int n = sharded(dir);
    std::filesystem::remove(dir / ShardFileName(2, n));
    EXPECT_THAT(OpenError(dir.path()), HasSubstr(ShardFileName(2, n) + ": cannot open"));
  }
  {  // index puts a tensor in the wrong shard
    TempDir dir;
    const int n = sharded(dir);
    nlohmann::json index = nlohmann::json::parse(ReadFile(dir / kIndexFileName));
    index["weight_map"]["patch_embedding.weight"] = ShardFileName(n, n);
    WriteFile(dir / kIndexFileName, index.dump());
    EXPECT_THAT(OpenError(dir.path()),
                HasSubstr("puts tensor patch_embedding.weight in " + ShardFileName(n, n) +
                          ", which has no such tensor"));
  }
  {  // index without a tensor: missing
    TempDir dir;
    sharded(dir);
    nlohmann::json index = nlohmann::json::parse(ReadFile(dir / kIndexFileName));
    index["weight_map"].erase("blocks.0.norm2.weight");
    WriteFile(dir / kIndexFileName, index.dump());
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("missing tensor blocks.0.norm2.weight"));
  }
  {  // index not JSON
    TempDir dir;
    sharded(dir);
    WriteFile(dir / kIndexFileName, "{");
    EXPECT_THAT(OpenError(dir.path()), HasSubstr("index.json: not valid JSON"));
  }
}

}  // namespace
}  // namespace dn::worker
