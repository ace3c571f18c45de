#include "worker/lora.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"
#include "worker/checkpoint.h"
#include "worker/checkpoint_format.h"
#include "worker/safetensors.h"

namespace dn::worker {
namespace {

using Json = nlohmann::json;

bool StartsWith(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(0, p.size(), p) == 0;
}
bool EndsWith(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

enum class Role { kDown, kUp, kUpBias, kAlpha, kDiffB, kDiff };
struct Suffix {
  const char* text;
  Role role;
};
constexpr Suffix kSuffixes[] = {
    {"lora_A.weight", Role::kDown},  {"lora_down.weight", Role::kDown},
    {"lora_B.weight", Role::kUp},    {"lora_up.weight", Role::kUp},
    {"lora_B.bias", Role::kUpBias},  {"alpha", Role::kAlpha},
    {"diff_b", Role::kDiffB},        {"diff", Role::kDiff},
};
const char* RoleName(Role r) {
  switch (r) {
    case Role::kDown: return "down (lora_A/lora_down)";
    case Role::kUp: return "up (lora_B/lora_up)";
    case Role::kUpBias: return "lora_B.bias";
    case Role::kAlpha: return "alpha";
    case Role::kDiffB: return "diff_b";
    case Role::kDiff: return "diff";
  }
  return "?";
}

// Original module path -> diffusers module path (via the checkpoint renames).
std::string OriginalModuleToDiffusers(const std::string& mod) {
  if (std::optional<std::string> n = WanOriginalToDiffusers(mod + ".weight"))
    return n->substr(0, n->size() - 7);
  return mod;
}

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("LoRA file ", path, ": ", what));
}

}  // namespace

std::map<std::string, std::pair<int64_t, int64_t>> LoraTargets(const WanConfig& config) {
  std::map<std::string, std::pair<int64_t, int64_t>> out;
  for (const TensorSpec& s : ExpectedTensors(config)) {
    if (s.shape.size() != 2 || !EndsWith(s.name, ".weight") ||
        StartsWith(s.name, "patch_embedding"))
      continue;
    out[s.name.substr(0, s.name.size() - 7)] = {s.shape[0], s.shape[1]};
  }
  return out;
}

absl::StatusOr<LoraFile> ParseLoraFile(const std::string& path, const WanConfig& config) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec))
    return absl::NotFoundError(absl::StrCat("LoRA file ", path, " does not exist"));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
  if (!opened.ok())
    return Bad(path, absl::StrCat("not a readable safetensors file (truncated or malformed): ",
                                  opened.status().message()));
  const SafetensorsFile& file = **opened;
  const auto targets = LoraTargets(config);
  // kohya / musubi names: lora_unet_<original module, '.' -> '_'>.
  std::map<std::string, std::string> kohya;
  for (const auto& [mod, shape] : targets) {
    std::string orig = mod;
    if (std::optional<std::string> o = DiffusersToWanOriginal(mod + ".weight"))
      orig = o->substr(0, o->size() - 7);
    std::replace(orig.begin(), orig.end(), '.', '_');
    kohya["lora_unet_" + orig] = mod;
  }
  // PEFT alpha: metadata lora_adapter_metadata (JSON LoraConfig).
  std::optional<double> meta_alpha;
  Json alpha_pattern = Json::object();
  if (auto it = file.header().metadata.find("lora_adapter_metadata");
      it != file.header().metadata.end()) {
    Json j;
    try {
      j = Json::parse(it->second);
    } catch (const Json::exception& e) {
      return Bad(path, absl::StrCat("metadata lora_adapter_metadata is not JSON: ", e.what()));
    }
    if (!j.is_object()) return Bad(path, "metadata lora_adapter_metadata is not a JSON object");
    for (auto kv = j.begin(); kv != j.end(); ++kv) {
      std::string key = kv.key();
      if (StartsWith(key, "transformer.")) key = key.substr(12);
      if (key == "lora_alpha" && kv->is_number()) meta_alpha = kv->get<double>();
      if (key == "alpha_pattern" && kv->is_object()) alpha_pattern = *kv;
    }
  }

  struct Part {
    std::string key;
    std::vector<float> data;
    Shape shape;
  };
  std::map<std::string, std::map<Role, Part>> parts;
  for (const SafetensorsEntry& e : file.tensors()) {
    const std::string& key = e.name;
    std::string mod;
    std::optional<Role> role;
    for (const Suffix& s : kSuffixes) {
      const std::string suf = std::string(".") + s.text;
      if (EndsWith(key, suf)) {
        mod = key.substr(0, key.size() - suf.size());
        role = s.role;
        break;
      }
    }
    if (!role) return Bad(path, absl::StrCat("tensor ", key, ": not a LoRA tensor name"));
    std::string target;
    if (StartsWith(mod, "lora_unet_")) {
      auto it = kohya.find(mod);
      if (it == kohya.end())
        return Bad(path, absl::StrCat("tensor ", key, ": no module ", mod, " in the model"));
      target = it->second;
    } else {
      bool original = false;
      for (const auto& [pre, orig] : {std::pair<const char*, bool>{"model.diffusion_model.", true},
                                      {"diffusion_model.", true},
                                      {"base_model.model.", false},
                                      {"transformer.", false}}) {
        if (StartsWith(mod, pre)) {
          mod = mod.substr(std::string(pre).size());
          original = orig;
          break;
        }
      }
      target = original || !targets.count(mod) ? OriginalModuleToDiffusers(mod) : mod;
    }
    if (!targets.count(target))
      return Bad(path, absl::StrCat("tensor ", key, ": no Linear module ", target,
                                    " in the model"));
    Part p;
    p.key = key;
    p.shape = e.shape;
    p.data.resize(static_cast<size_t>(NumElements(e.shape)));
    if (absl::Status s = file.ReadF32(e, p.data.data()); !s.ok())
      return Bad(path, absl::StrCat("tensor ", key, ": ", s.message()));
    for (float v : p.data)
      if (!std::isfinite(v))
        return Bad(path, absl::StrCat("tensor ", key, ": non-finite values"));
    auto& slot = parts[target];
    if (slot.count(*role))
      return Bad(path, absl::StrCat("tensor ", key, ": ", RoleName(*role), " of ", target,
                                    " given twice (also as ", slot[*role].key, ")"));
    slot[*role] = std::move(p);
  }

  LoraFile out;
  out.path = path;
  for (auto& [mod, slot] : parts) {
    const auto [out_f, in_f] = targets.at(mod);
    if (slot.count(Role::kDiff))
      return Bad(path, absl::StrCat("tensor ", slot[Role::kDiff].key,
                                    ": full weight diffs are not supported"));
    LoraModule m;
    m.in = in_f;
    m.out = out_f;
    if (slot.count(Role::kDiffB)) {
      Part& b = slot[Role::kDiffB];
      if (b.shape != Shape{out_f})
        return Bad(path, absl::StrCat("tensor ", b.key, ": shape ", ShapeString(b.shape),
                                      ", expected [", out_f, "]"));
      m.bias_delta = b.data;
    }
    const bool has_down = slot.count(Role::kDown), has_up = slot.count(Role::kUp);
    if (!has_down || !has_up) {
      if (has_down || has_up || slot.count(Role::kAlpha) || slot.count(Role::kUpBias))
        return Bad(path, absl::StrCat("module ", mod, ": ", has_down ? "up" : "down",
                                      " matrix missing"));
      out.modules[mod] = std::move(m);  // diff_b only
      continue;
    }
    Part& a = slot[Role::kDown];
    Part& b = slot[Role::kUp];
    if (a.shape.size() != 2 || a.shape[1] != in_f || a.shape[0] < 1)
      return Bad(path, absl::StrCat("tensor ", a.key, ": shape ", ShapeString(a.shape),
                                    ", expected [rank, ", in_f, "] for ", mod));
    const int64_t r = a.shape[0];
    if (b.shape != Shape{out_f, r})
      return Bad(path, absl::StrCat("tensor ", b.key, ": shape ", ShapeString(b.shape),
                                    ", expected [", out_f, ", ", r, "] for ", mod));
    m.rank = r;
    m.down = std::move(a.data);
    m.up = std::move(b.data);
    if (slot.count(Role::kAlpha)) {
      Part& al = slot[Role::kAlpha];
      if (al.data.size() != 1)
        return Bad(path, absl::StrCat("tensor ", al.key, ": alpha must be a scalar, shape ",
                                      ShapeString(al.shape)));
      m.alpha = al.data[0];
    } else if (auto it = alpha_pattern.find(mod);
               it != alpha_pattern.end() && it->is_number()) {
      m.alpha = it->get<double>();
    } else {
      m.alpha = meta_alpha.value_or(static_cast<double>(r));
    }
    if (slot.count(Role::kUpBias)) {
      Part& bb = slot[Role::kUpBias];
      if (bb.shape != Shape{out_f})
        return Bad(path, absl::StrCat("tensor ", bb.key, ": shape ", ShapeString(bb.shape),
                                      ", expected [", out_f, "]"));
      if (m.bias_delta.empty()) m.bias_delta.assign(static_cast<size_t>(out_f), 0.0f);
      const double f = m.alpha / static_cast<double>(r);
      for (int64_t o = 0; o < out_f; ++o)
        m.bias_delta[o] = static_cast<float>(m.bias_delta[o] + bb.data[o] * f);
    }
    out.modules[mod] = std::move(m);
  }
  if (out.modules.empty()) return Bad(path, "no LoRA tensors");
  return out;
}

std::map<std::string, LoraLowRank> CombineLoras(
    const std::vector<std::pair<const LoraFile*, double>>& adapters) {
  std::map<std::string, LoraLowRank> out;
  for (const auto& [file, scale] : adapters) {
    for (const auto& [mod, m] : file->modules) {
      LoraLowRank& l = out[mod];
      l.in = m.in;
      l.out = m.out;
      if (!m.bias_delta.empty()) {
        if (l.bias.empty()) l.bias.assign(static_cast<size_t>(m.out), 0.0f);
        for (int64_t o = 0; o < m.out; ++o)
          l.bias[o] = static_cast<float>(l.bias[o] + scale * m.bias_delta[o]);
      }
      if (m.rank == 0) continue;
      const int64_t r0 = l.rank, r1 = l.rank + m.rank;
      l.down.insert(l.down.end(), m.down.begin(), m.down.end());
      std::vector<float> up(static_cast<size_t>(m.out * r1));
      const double f = scale * m.alpha / static_cast<double>(m.rank);
      for (int64_t o = 0; o < m.out; ++o) {
        for (int64_t j = 0; j < r0; ++j) up[o * r1 + j] = l.up[o * r0 + j];
        for (int64_t j = 0; j < m.rank; ++j)
          up[o * r1 + r0 + j] = static_cast<float>(f * m.up[o * m.rank + j]);
      }
      l.up = std::move(up);
      l.rank = r1;
    }
  }
  // A bias delta without factors still runs through the low-rank path: one
  // zero rank.
  for (auto& [mod, l] : out) {
    if (l.rank > 0) continue;
    l.rank = 1;
    l.down.assign(static_cast<size_t>(l.in), 0.0f);
    l.up.assign(static_cast<size_t>(l.out), 0.0f);
  }
  return out;
}

// "NAME[:SCALE[:EXPERT]]" (EXPERT: all | high | low) -> LoraRef.
absl::StatusOr<std::vector<LoraRef>> ParseLoraSpecs(const std::string& list,
                                                   const std::string& flag) {
  std::vector<LoraRef> out;
  if (list.empty()) return out;
  for (const std::string& spec : std::vector<std::string>(absl::StrSplit(list, ','))) {
    std::vector<std::string> parts = absl::StrSplit(spec, ':');
    LoraRef r;
    r.name = parts[0];
    if (parts.size() > 3 || r.name.empty())
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " '", spec, "': expected NAME[:SCALE[:EXPERT]]"));
    if (parts.size() > 1 && !absl::SimpleAtod(parts[1], &r.scale))
      return absl::InvalidArgumentError(
          absl::StrCat(flag, " '", spec, "': scale '", parts[1], "' is not a number"));
    if (parts.size() > 2) {
      if (parts[2] == "high") r.expert = 0;
      else if (parts[2] == "low") r.expert = 1;
      else if (parts[2] != "all")
        return absl::InvalidArgumentError(
            absl::StrCat(flag, " '", spec, "': expert '", parts[2], "' must be all, high or low"));
    }
    out.push_back(r);
  }
  return out;
}

std::vector<std::string> LoraLibrary::List() const {
  std::vector<std::string> names;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir_, ec), end; !ec && it != end;
       it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (EndsWith(n, ".safetensors") && n.size() > 12 && it->is_regular_file(ec))
      names.push_back(n.substr(0, n.size() - 12));
  }
  std::sort(names.begin(), names.end());
  return names;
}

absl::StatusOr<std::shared_ptr<const LoraFile>> LoraLibrary::Load(const std::string& name,
                                                                 const WanConfig& config) {
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == ".." ||
      name.find('\0') != std::string::npos)
    return absl::InvalidArgumentError(
        absl::StrCat("lora name '", name, "' must be a file name of the LoRA directory"));
  if (dir_.empty())
    return absl::NotFoundError(absl::StrCat(
        "lora '", name, "': this worker serves no LoRAs (no --lora-dir)"));
  const std::string path = absl::StrCat(dir_, "/", name, ".safetensors");
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    return absl::NotFoundError(absl::StrCat("lora '", name, "': no file ", path));
  const int64_t mtime = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  const std::string hash = config.Hash();
  if (auto it = cache_.find(name); it != cache_.end() && it->second.size == st.st_size &&
                                   it->second.mtime_ns == mtime &&
                                   it->second.config_hash == hash)
    return it->second.file;
  DN_ASSIGN_OR_RETURN(LoraFile parsed, ParseLoraFile(path, config));
  Cached c;
  c.size = st.st_size;
  c.mtime_ns = mtime;
  c.config_hash = hash;
  c.file = std::make_shared<const LoraFile>(std::move(parsed));
  cache_[name] = c;
  return c.file;
}

}  // namespace dn::worker
