#include "worker/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/log.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "worker/checkpoint_format.h"
#include "worker/noise.h"
#include "worker/safetensors.h"

namespace dn::worker {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr size_t kMaxConfigBytes = size_t{16} << 20;
constexpr size_t kMaxProblemsShown = 8;

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool IsFile(const std::string& path) {
  std::error_code ec;
  return fs::is_regular_file(path, ec);
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = fs::file_size(path, ec);
  if (ec)
    return absl::NotFoundError(absl::StrCat(path, ": ", ec.message()));
  if (size > kMaxConfigBytes)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", size, " bytes is too large for a JSON file"));
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (!in.good() && !in.eof())
    return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return buf.str();
}

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out)
      return absl::PermissionDeniedError(absl::StrCat(tmp, ": cannot create"));
    out << text;
    out.flush();
    if (!out) return absl::DataLossError(absl::StrCat(tmp, ": write failed"));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("rename ", tmp, " -> ", path, ": ", ec.message()));
  return absl::OkStatus();
}

void Add(std::vector<TensorSpec>* out, std::string name, Shape shape) {
  out->push_back({std::move(name), std::move(shape)});
}

// The initialisation rule (see checkpoint.h).
RandomInit InitForSpec(const WanConfig& config, const TensorSpec& spec,
                       uint64_t seed) {
  RandomInit init;
  init.seed = seed;
  init.stream = TensorNameStream(spec.name);
  const std::string& n = spec.name;
  const size_t dot = n.rfind('.');
  const std::string leaf = dot == std::string::npos ? n : n.substr(dot + 1);
  const std::string owner =
      dot == std::string::npos ? "" : n.substr(0, dot);
  const std::string owner_leaf = owner.substr(owner.rfind('.') + 1);
  if (leaf == "scale_shift_table") {
    init.std = static_cast<float>(1.0 / std::sqrt(config.inner_dim()));
  } else if (leaf == "bias") {
    init.std = 0.02f;
  } else if (leaf == "weight" && owner_leaf.rfind("norm", 0) == 0) {
    init.mean = 1.0f;  // norm1/norm2/norm_q/norm_k/norm_added_k weights
    init.std = 0.05f;
  } else if (leaf == "weight" && spec.shape.size() >= 2) {
    // Linear [out, in] and patch-embedding Conv3d [D, C_in, pt, ph, pw]:
    // fan_in = product of all dims but the first.
    int64_t fan_in = 1;
    for (size_t i = 1; i < spec.shape.size(); ++i) fan_in *= spec.shape[i];
    init.std = static_cast<float>(1.0 / std::sqrt(static_cast<double>(fan_in)));
  } else {
    init.std = 0.02f;  // pos_embed and anything else
  }
  return init;
}

std::string ProblemList(const std::vector<std::string>& problems) {
  std::vector<std::string> shown(
      problems.begin(),
      problems.begin() + static_cast<std::ptrdiff_t>(
                             std::min(problems.size(), kMaxProblemsShown)));
  std::string text = absl::StrJoin(shown, "; ");
  if (problems.size() > shown.size())
    absl::StrAppend(&text, "; and ", problems.size() - shown.size(), " more");
  return text;
}

// --- A checkpoint folder -----------------------------------------------------

struct StoredTensor {
  const SafetensorsFile* file = nullptr;
  const SafetensorsEntry* entry = nullptr;
  std::string stored_name;  // the name inside the file
};

class CheckpointWeights : public WeightSource {
 public:
  const WanConfig& config() const override { return config_; }
  std::string description() const override { return description_; }
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      return absl::NotFoundError(
          absl::StrCat(dir_, ": no tensor named ", name));
    return it->second.file->ReadF32(*it->second.entry, dst);
  }

  WanConfig config_;
  std::string dir_;
  std::string description_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, StoredTensor> tensors_;
};

// Opens the safetensors files of `dir` and lists (stored name, file, entry).
absl::Status OpenFiles(const std::string& dir, CheckpointWeights* out,
                       std::vector<StoredTensor>* stored) {
  const std::string index_path = dir + "/" + kIndexFileName;
  if (IsFile(index_path)) {
    DN_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(index_path));
    Json index;
    try {
      index = Json::parse(text);
    } catch (const Json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": not valid JSON: ", e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object())
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": missing the 'weight_map' object"));
    std::map<std::string, const SafetensorsFile*> by_file;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end();
         ++it) {
      if (!it->is_string())
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": weight_map entry for ", it.key(),
            " is not a file name"));
      const std::string file = it->get<std::string>();
      if (file.empty() || file == "." || file == ".." ||
          file.find('/') != std::string::npos ||
          file.find('\\') != std::string::npos || !EndsWith(file, ".safetensors"))
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": weight_map names '", file, "' for tensor ", it.key(),
            "; expected a .safetensors file name in the same folder"));
      auto [pos, inserted] = by_file.emplace(file, nullptr);
      if (inserted) {
        DN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                            SafetensorsFile::Open(dir + "/" + file));
        pos->second = f.get();
        out->files_.push_back(std::move(f));
      }
      const SafetensorsEntry* entry = pos->second->Find(it.key());
      if (entry == nullptr)
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": weight_map puts tensor ", it.key(), " in ", file,
            ", which has no such tensor"));
      stored->push_back({pos->second, entry, it.key()});
    }
    return absl::OkStatus();
  }

  std::string single = dir + "/" + kSingleFileName;
  if (!IsFile(single)) {
    std::vector<std::string> candidates;
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end;
         it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (EndsWith(name, ".safetensors") && IsFile(it->path().string()))
        candidates.push_back(name);
    }
    if (ec)
      return absl::NotFoundError(
          absl::StrCat(dir, ": cannot list: ", ec.message()));
    std::sort(candidates.begin(), candidates.end());
    if (candidates.empty())
      return absl::NotFoundError(
          absl::StrCat(dir, ": no .safetensors file (and no ", kIndexFileName,
                       ")"));
    if (candidates.size() > 1)
      return absl::InvalidArgumentError(absl::StrCat(
          dir, ": ", candidates.size(), " .safetensors files (",
          absl::StrJoin(candidates, ", "), ") but no ", kIndexFileName,
          " saying which tensor is where"));
    single = dir + "/" + candidates[0];
  }
  DN_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                      SafetensorsFile::Open(single));
  for (const SafetensorsEntry& e : f->tensors())
    stored->push_back({f.get(), &e, e.name});
  out->files_.push_back(std::move(f));
  return absl::OkStatus();
}

// --- Random preset weights ---------------------------------------------------

class PresetWeights : public WeightSource {
 public:
  PresetWeights(const WanConfig& config, uint64_t seed) : config_(config) {
    for (const TensorSpec& spec : ExpectedTensors(config))
      inits_.emplace(spec.name,
                     Item{spec.shape, InitForSpec(config, spec, seed)});
    description_ = absl::StrCat("random preset weights (seed ", seed,
                                ", config ", config.Hash().substr(0, 12), ")");
  }
  const WanConfig& config() const override { return config_; }
  std::string description() const override { return description_; }
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    auto it = inits_.find(name);
    if (it == inits_.end())
      return absl::NotFoundError(
          absl::StrCat(description_, ": no tensor named ", name));
    const RandomInit& r = it->second.init;
    FillNormal(r.seed, r.stream, 0, r.mean, r.std, dst,
               static_cast<size_t>(NumElements(it->second.shape)));
    return absl::OkStatus();
  }
  const RandomInit* random_init(const std::string& name) const override {
    auto it = inits_.find(name);
    return it == inits_.end() ? nullptr : &it->second.init;
  }

 private:
  struct Item {
    Shape shape;
    RandomInit init;
  };
  WanConfig config_;
  std::string description_;
  std::unordered_map<std::string, Item> inits_;
};

bool IsOurCheckpointFile(const std::string& name) {
  if (name == kSingleFileName || name == kIndexFileName) return true;
  return name.rfind("diffusion_pytorch_model-", 0) == 0 &&
         EndsWith(name, ".safetensors") &&
         name.find("-of-") != std::string::npos;
}

}  // namespace

std::vector<TensorSpec> ExpectedTensors(const WanConfig& c) {
  const int64_t d = c.inner_dim();
  const int64_t patch = int64_t{c.patch_size[0]} * c.patch_size[1] * c.patch_size[2];
  std::vector<TensorSpec> t;
  t.reserve(15 + 27 * static_cast<size_t>(std::max(c.num_layers, 0)));
  Add(&t, "patch_embedding.weight",
      {d, c.in_channels, c.patch_size[0], c.patch_size[1], c.patch_size[2]});
  Add(&t, "patch_embedding.bias", {d});
  Add(&t, "condition_embedder.time_embedder.linear_1.weight", {d, c.freq_dim});
  Add(&t, "condition_embedder.time_embedder.linear_1.bias", {d});
  Add(&t, "condition_embedder.time_embedder.linear_2.weight", {d, d});
  Add(&t, "condition_embedder.time_embedder.linear_2.bias", {d});
  Add(&t, "condition_embedder.time_proj.weight", {6 * d, d});
  Add(&t, "condition_embedder.time_proj.bias", {6 * d});
  Add(&t, "condition_embedder.text_embedder.linear_1.weight", {d, c.text_dim});
  Add(&t, "condition_embedder.text_embedder.linear_1.bias", {d});
  Add(&t, "condition_embedder.text_embedder.linear_2.weight", {d, d});
  Add(&t, "condition_embedder.text_embedder.linear_2.bias", {d});
  if (c.is_i2v()) {
    const int64_t img = c.image_dim;
    const std::string p = "condition_embedder.image_embedder.";
    Add(&t, p + "norm1.weight", {img});
    Add(&t, p + "norm1.bias", {img});
    Add(&t, p + "ff.net.0.proj.weight", {img, img});
    Add(&t, p + "ff.net.0.proj.bias", {img});
    Add(&t, p + "ff.net.2.weight", {d, img});
    Add(&t, p + "ff.net.2.bias", {d});
    Add(&t, p + "norm2.weight", {d});
    Add(&t, p + "norm2.bias", {d});
    if (c.pos_embed_seq_len > 0)
      Add(&t, p + "pos_embed", {1, c.pos_embed_seq_len, img});
  }
  Add(&t, "scale_shift_table", {1, 2, d});
  Add(&t, "proj_out.weight", {c.out_channels * patch, d});
  Add(&t, "proj_out.bias", {c.out_channels * patch});
  for (int i = 0; i < c.num_layers; ++i) {
    const std::string b = absl::StrCat("blocks.", i, ".");
    Add(&t, b + "scale_shift_table", {1, 6, d});
    for (const char* attn : {"attn1.", "attn2."}) {
      for (const char* proj : {"to_q.", "to_k.", "to_v.", "to_out.0."}) {
        Add(&t, b + attn + proj + "weight", {d, d});
        Add(&t, b + attn + proj + "bias", {d});
      }
      Add(&t, b + attn + "norm_q.weight", {d});
      Add(&t, b + attn + "norm_k.weight", {d});
    }
    if (c.is_i2v()) {
      Add(&t, b + "attn2.add_k_proj.weight", {d, c.added_kv_proj_dim});
      Add(&t, b + "attn2.add_k_proj.bias", {d});
      Add(&t, b + "attn2.add_v_proj.weight", {d, c.added_kv_proj_dim});
      Add(&t, b + "attn2.add_v_proj.bias", {d});
      Add(&t, b + "attn2.norm_added_k.weight", {d});
    }
    Add(&t, b + "norm2.weight", {d});
    Add(&t, b + "norm2.bias", {d});
    Add(&t, b + "ffn.net.0.proj.weight", {c.ffn_dim, d});
    Add(&t, b + "ffn.net.0.proj.bias", {c.ffn_dim});
    Add(&t, b + "ffn.net.2.weight", {d, c.ffn_dim});
    Add(&t, b + "ffn.net.2.bias", {d});
  }
  return t;
}

RandomInit PresetInit(const WanConfig& config, const std::string& name,
                      uint64_t seed) {
  for (const TensorSpec& spec : ExpectedTensors(config))
    if (spec.name == name) return InitForSpec(config, spec, seed);
  return InitForSpec(config, TensorSpec{name, {}}, seed);
}

namespace {

// The two experts of a Wan2.2 A14B pipeline (docs/MODELS.md §3).
class TwoExpertWeights : public WeightSource {
 public:
  TwoExpertWeights(std::unique_ptr<WeightSource> high,
                   std::unique_ptr<WeightSource> low, double boundary_ratio)
      : high_(std::move(high)), low_(std::move(low)) {
    config_ = high_->config();
    config_.boundary_ratio = boundary_ratio;
    description_ = absl::StrCat("two experts, boundary_ratio ", boundary_ratio,
                                ": high-noise ", high_->description(),
                                "; low-noise ", low_->description());
  }
  const WanConfig& config() const override { return config_; }
  std::string description() const override { return description_; }
  // As a plain source it is the high-noise expert.
  absl::Status ReadF32(const std::string& name, float* dst) const override {
    return high_->ReadF32(name, dst);
  }
  const RandomInit* random_init(const std::string& name) const override {
    return high_->random_init(name);
  }
  const WeightSource& expert(int i) const override {
    return i == 0 ? *high_ : *low_;
  }

 private:
  std::unique_ptr<WeightSource> high_, low_;
  WanConfig config_;
  std::string description_;
};

absl::StatusOr<std::unique_ptr<WeightSource>> OpenTransformer(
    const std::string& dir_in);

// model_index.json's `boundary_ratio` (0 when absent or null).
absl::StatusOr<double> ReadBoundaryRatio(const std::string& path) {
  DN_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path));
  Json j;
  try {
    j = Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not valid JSON: ", e.what()));
  }
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  auto it = j.find("boundary_ratio");
  if (it == j.end() || it->is_null()) return 0.0;
  if (!it->is_number() || !std::isfinite(it->get<double>()) ||
      it->get<double>() <= 0 || it->get<double>() >= 1)
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": field 'boundary_ratio' must be a number in (0, 1) or null, got ",
        it->dump()));
  return it->get<double>();
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSource>> MakeTwoExpertWeights(
    std::unique_ptr<WeightSource> high, std::unique_ptr<WeightSource> low,
    double boundary_ratio) {
  if (high == nullptr || low == nullptr)
    return absl::InvalidArgumentError("two experts: an expert is missing");
  if (!(boundary_ratio > 0 && boundary_ratio < 1))
    return absl::InvalidArgumentError(absl::StrCat(
        "two experts: boundary_ratio ", boundary_ratio, " must be in (0, 1)"));
  const std::string a = high->config().TransformerOnly().ToJson();
  const std::string b = low->config().TransformerOnly().ToJson();
  if (a != b)
    return absl::InvalidArgumentError(absl::StrCat(
        "two experts: the high-noise expert (", high->description(),
        ") and the low-noise expert (", low->description(),
        ") have different transformer configs:\n", a, "vs\n", b));
  return std::unique_ptr<WeightSource>(std::make_unique<TwoExpertWeights>(
      std::move(high), std::move(low), boundary_ratio));
}

absl::StatusOr<std::unique_ptr<WeightSource>> OpenCheckpoint(
    const std::string& dir_in) {
  std::string dir = dir_in;
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  // Original Wan2.2 A14B layout: no boundary in the files; the Wan2.2
  // configs use 0.875 (T2V) and 0.9 (I2V, 36 input channels).
  if (!IsFile(dir + "/config.json") &&
      IsFile(dir + "/high_noise_model/config.json") &&
      IsFile(dir + "/low_noise_model/config.json")) {
    DN_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> high,
                        OpenTransformer(dir + "/high_noise_model"));
    DN_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> low,
                        OpenTransformer(dir + "/low_noise_model"));
    const double ratio = high->config().in_channels == 36 ? 0.9 : 0.875;
    return MakeTwoExpertWeights(std::move(high), std::move(low), ratio);
  }
  // A diffusers pipeline folder keeps the DiT under transformer/ (and the
  // low-noise expert of a two-expert pipeline under transformer_2/).
  if (!IsFile(dir + "/config.json") && IsFile(dir + "/transformer/config.json")) {
    double ratio = 0;
    if (IsFile(dir + "/model_index.json")) {
      DN_ASSIGN_OR_RETURN(ratio, ReadBoundaryRatio(dir + "/model_index.json"));
    }
    const bool second = IsFile(dir + "/transformer_2/config.json");
    if (second && ratio == 0)
      return absl::InvalidArgumentError(absl::StrCat(
          dir, ": has transformer_2/ but model_index.json has no boundary_ratio "
               "(which expert runs when is unknown)"));
    DN_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> high,
                        OpenTransformer(dir + "/transformer"));
    if (!second) {
      // A boundary without a second transformer (the diffusers converter
      // writes one for Wan2.1 too): one transformer, as the files say.
      if (ratio > 0)
        DN_LOG(INFO) << dir << ": model_index.json has boundary_ratio " << ratio
                     << " but there is no transformer_2/: one transformer";
      return high;
    }
    DN_ASSIGN_OR_RETURN(std::unique_ptr<WeightSource> low,
                        OpenTransformer(dir + "/transformer_2"));
    return MakeTwoExpertWeights(std::move(high), std::move(low), ratio);
  }
  return OpenTransformer(dir);
}

namespace {

absl::StatusOr<std::unique_ptr<WeightSource>> OpenTransformer(
    const std::string& dir_in) {
  std::string dir = dir_in;
  const std::string config_path = dir + "/config.json";
  if (!IsFile(config_path))
    return absl::NotFoundError(absl::StrCat(
        dir_in, ": not a checkpoint folder (no config.json)"));
  DN_ASSIGN_OR_RETURN(std::string config_text, ReadSmallFile(config_path));
  absl::StatusOr<WanConfig> config = WanConfig::FromJson(config_text);
  if (!config.ok())
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": ", config.status().message()));
  if (absl::Status s = config->Validate(); !s.ok())
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": ", s.message()));

  // A transformer folder is one transformer, whatever pipeline field it has.
  *config = config->TransformerOnly();
  auto weights = std::make_unique<CheckpointWeights>();
  weights->config_ = *config;
  weights->dir_ = dir;
  std::vector<StoredTensor> stored;
  DN_RETURN_IF_ERROR(OpenFiles(dir, weights.get(), &stored));

  // Which naming the files use: the layout most names can only belong to.
  // Names of the other layout are reported as unexpected below.
  size_t original_names = 0, diffusers_names = 0;
  for (const StoredTensor& s : stored) {
    const NameLayout layout = LayoutOfName(StripComfyPrefix(s.stored_name));
    original_names += layout == NameLayout::kWanOriginal;
    diffusers_names += layout == NameLayout::kDiffusers;
  }
  const bool original = original_names > diffusers_names;
  const NameLayout foreign =
      original ? NameLayout::kDiffusers : NameLayout::kWanOriginal;

  // Map to diffusers names.
  std::vector<std::string> problems;
  std::vector<std::string> misnamed;
  for (StoredTensor& s : stored) {
    std::string name = StripComfyPrefix(s.stored_name);
    if (LayoutOfName(name) == foreign) {
      misnamed.push_back(absl::StrCat(
          "unexpected tensor ", s.stored_name, " with shape ",
          ShapeString(s.entry->shape),
          original ? " (a diffusers name in an original Wan2.1 checkpoint)"
                   : " (an original Wan2.1 name in a diffusers checkpoint)"));
      continue;
    }
    if (original) {
      if (std::optional<std::string> mapped = WanOriginalToDiffusers(name))
        name = *mapped;
    }
    auto [it, inserted] = weights->tensors_.emplace(name, s);
    if (!inserted)
      problems.push_back(absl::StrCat(
          "tensor ", name, " stored twice (as ", it->second.stored_name, " in ",
          it->second.file->path(), " and as ", s.stored_name, " in ",
          s.file->path(), ")"));
  }
  if (!problems.empty())
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": ", ProblemList(problems)));

  // Validate against the config.
  const std::vector<TensorSpec> expected = ExpectedTensors(*config);
  std::unordered_map<std::string, const TensorSpec*> expected_by_name;
  for (const TensorSpec& spec : expected) expected_by_name[spec.name] = &spec;
  auto stored_as = [](const std::string& name, const StoredTensor& s) {
    const std::string n = s.stored_name;
    return n == name ? std::string() : absl::StrCat(" (stored as ", n, ")");
  };
  for (const TensorSpec& spec : expected) {
    auto it = weights->tensors_.find(spec.name);
    if (it == weights->tensors_.end()) {
      problems.push_back(absl::StrCat("missing tensor ", spec.name,
                                      " (expected shape ",
                                      ShapeString(spec.shape), ")"));
    } else if (it->second.entry->shape != spec.shape) {
      problems.push_back(absl::StrCat(
          "tensor ", spec.name, stored_as(spec.name, it->second), " has shape ",
          ShapeString(it->second.entry->shape), ", expected ",
          ShapeString(spec.shape)));
    }
  }
  std::vector<std::string> ignored;
  std::vector<std::string> extras;
  for (const auto& [name, s] : weights->tensors_) {
    if (expected_by_name.count(name)) continue;
    // I2V files may carry attn2.norm_added_q.* (unused by the model).
    if (config->is_i2v() && name.find(".attn2.norm_added_q.") != std::string::npos &&
        name.rfind("blocks.", 0) == 0) {
      ignored.push_back(name);
      continue;
    }
    extras.push_back(absl::StrCat("unexpected tensor ", name, stored_as(name, s),
                                  " with shape ",
                                  ShapeString(s.entry->shape)));
  }
  extras.insert(extras.end(), misnamed.begin(), misnamed.end());
  std::sort(extras.begin(), extras.end());
  problems.insert(problems.end(), extras.begin(), extras.end());
  if (!problems.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": checkpoint does not match its config.json (", problems.size(),
        problems.size() == 1 ? " problem): " : " problems): ",
        ProblemList(problems)));
  for (const std::string& name : ignored) weights->tensors_.erase(name);
  if (!ignored.empty())
    DN_LOG(INFO) << dir << ": ignoring " << ignored.size()
                 << " unused attn2.norm_added_q tensors";

  std::map<DType, int> dtypes;
  for (const auto& [name, s] : weights->tensors_) ++dtypes[s.entry->dtype];
  std::vector<std::string> dtype_names;
  for (const auto& [dt, n] : dtypes) dtype_names.push_back(DTypeName(dt));
  weights->description_ = absl::StrCat(
      dir, " (", weights->tensors_.size(), " tensors, ",
      absl::StrJoin(dtype_names, "+"), ", ", weights->files_.size(),
      weights->files_.size() == 1 ? " file" : " files",
      original ? ", original Wan2.1 names" : "", ")");
  return std::unique_ptr<WeightSource>(std::move(weights));
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightSource>> MakePresetWeights(
    const WanConfig& config, uint64_t seed) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  if (config.num_experts() == 2)
    return MakeTwoExpertWeights(
        std::make_unique<PresetWeights>(config.TransformerOnly(), seed),
        std::make_unique<PresetWeights>(config.TransformerOnly(), seed + 1),
        config.boundary_ratio);
  return std::unique_ptr<WeightSource>(
      std::make_unique<PresetWeights>(config, seed));
}

absl::Status WriteCheckpoint(const WeightSource& source,
                             const std::string& dir, DType dtype,
                             int64_t max_shard_bytes) {
  CheckpointWriteOptions options;
  options.dtype = dtype;
  options.max_shard_bytes = max_shard_bytes;
  return WriteCheckpointWithOptions(source, dir, options);
}

absl::Status WriteCheckpointWithOptions(const WeightSource& source,
                                        const std::string& dir,
                                        const CheckpointWriteOptions& options) {
  const WanConfig& config = source.config();
  DN_RETURN_IF_ERROR(config.Validate());
  if (config.num_experts() == 2) {
    // A pipeline folder: each expert a transformer folder of its own.
    const bool orig = options.names == NameLayout::kWanOriginal;
    const char* sub[2] = {orig ? "high_noise_model" : "transformer",
                          orig ? "low_noise_model" : "transformer_2"};
    for (int e = 0; e < 2; ++e)
      DN_RETURN_IF_ERROR(WriteCheckpointWithOptions(
          source.expert(e), absl::StrCat(dir, "/", sub[e]), options));
    if (orig) return absl::OkStatus();  // the original layout has no index
    Json index = Json::object();
    index["_class_name"] = "WanPipeline";
    index["boundary_ratio"] = config.boundary_ratio;
    index["transformer"] = {"diffusers", "WanTransformer3DModel"};
    index["transformer_2"] = {"diffusers", "WanTransformer3DModel"};
    return WriteTextFile(dir + "/model_index.json", index.dump(2) + "\n");
  }
  if (options.max_shard_bytes <= 0)
    return absl::InvalidArgumentError(absl::StrCat(
        "max_shard_bytes must be positive (got ", options.max_shard_bytes, ")"));
  const bool original = options.names == NameLayout::kWanOriginal;

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    return absl::PermissionDeniedError(
        absl::StrCat(dir, ": cannot create: ", ec.message()));
  // Remove what an earlier write of ours left, so the folder holds exactly
  // one checkpoint.
  std::vector<std::string> stale;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (IsOurCheckpointFile(name) || name == "config.json")
      stale.push_back(it->path().string());
  }
  if (ec)
    return absl::InternalError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  for (const std::string& path : stale) {
    fs::remove(path, ec);
    if (ec)
      return absl::InternalError(
          absl::StrCat(path, ": cannot remove: ", ec.message()));
  }

  const std::vector<TensorSpec> specs = ExpectedTensors(config);
  const size_t elem = DTypeSize(options.dtype);
  // Shard plan: greedy in tensor order.
  std::vector<std::vector<size_t>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t bytes = NumElements(specs[i].shape) * static_cast<int64_t>(elem);
    if (!shards.back().empty() && shard_bytes + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  const int count = static_cast<int>(shards.size());

  auto file_name = [&](const TensorSpec& spec) -> absl::StatusOr<std::string> {
    if (!original) return spec.name;
    std::optional<std::string> n = DiffusersToWanOriginal(spec.name);
    if (!n)
      return absl::InternalError(
          absl::StrCat("tensor ", spec.name, " has no original Wan2.1 name"));
    return *n;
  };

  Json weight_map = Json::object();
  std::vector<float> f32;
  std::vector<uint8_t> converted;
  for (int s = 0; s < count; ++s) {
    const std::string fname =
        count == 1 ? std::string(kSingleFileName) : ShardFileName(s + 1, count);
    std::vector<SafetensorsWriter::TensorInfo> infos;
    for (size_t i : shards[s]) {
      DN_ASSIGN_OR_RETURN(std::string name, file_name(specs[i]));
      weight_map[name] = fname;
      infos.push_back({name, options.dtype, specs[i].shape});
    }
    DN_ASSIGN_OR_RETURN(
        std::unique_ptr<SafetensorsWriter> writer,
        SafetensorsWriter::Create(dir + "/" + fname, std::move(infos),
                                  {{"format", "pt"}}));
    for (size_t i : shards[s]) {
      const size_t n = static_cast<size_t>(NumElements(specs[i].shape));
      f32.resize(n);
      DN_RETURN_IF_ERROR(source.ReadF32(specs[i].name, f32.data()));
      if (options.dtype == DType::kF32) {
        DN_RETURN_IF_ERROR(writer->WriteNext(f32.data(), n * sizeof(float)));
      } else {
        converted.resize(n * elem);
        ConvertFromF32(options.dtype, f32.data(), n, converted.data());
        DN_RETURN_IF_ERROR(writer->WriteNext(converted.data(), converted.size()));
      }
    }
    DN_RETURN_IF_ERROR(writer->Finish());
  }
  if (count > 1) {
    Json index = Json::object();
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = std::move(weight_map);
    DN_RETURN_IF_ERROR(
        WriteTextFile(dir + "/" + kIndexFileName, index.dump(2) + "\n"));
  }
  return WriteTextFile(dir + "/config.json", original
                                                 ? WanOriginalConfigJson(config)
                                                 : config.ToJson());
}

}  // namespace dn::worker
