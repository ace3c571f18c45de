#include "server/hello_validation.h"

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/group_slices.h"

namespace dn::server {

namespace {

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("Hello.", field, ": ", why));
}

absl::Status CheckLength(const std::string& field, const std::string& value,
                         size_t max) {
  if (value.size() > max) {
    return Invalid(field, absl::StrCat("at most ", max, " characters, got ",
                                       value.size()));
  }
  return absl::OkStatus();
}

absl::Status CheckRange(const std::string& field, int64_t v, int64_t lo,
                        int64_t hi) {
  if (v < lo || v > hi) {
    return Invalid(field, absl::StrCat(v, " is not in [", lo, ", ", hi, "]"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateHello(const ::denoised::v1::internal::Hello& h) {
  if (h.group().empty() || absl::StrContains(h.group(), "/")) {
    return Invalid("group", "must be non-empty without '/'");
  }
  if (absl::Status s = CheckLength("group", h.group(), 128); !s.ok()) return s;
  if (h.world_size() < 1 || h.world_size() > kMaxWorldSize || h.rank() < 0 ||
      h.rank() >= h.world_size()) {
    return Invalid("rank/world_size",
                   absl::StrCat("rank ", h.rank(), " of ", h.world_size(),
                                " (world_size in [1, ", kMaxWorldSize, "])"));
  }
  if (h.cfg_degree() < 0 || h.cfg_degree() > 2 ||
      (h.cfg_degree() == 2 && h.world_size() % 2 != 0)) {
    return Invalid("cfg_degree",
                   absl::StrCat(h.cfg_degree(), " with world_size ", h.world_size(),
                                " (0 or 1: Ulysses only; 2: CFG-parallel, even world_size)"));
  }
  if (absl::Status s = CheckRange("generation", h.generation(), 1,
                                  int64_t{1} << 53);
      !s.ok()) {
    return s;
  }
  const auto& m = h.model();
  const auto& info = m.info();
  if (m.name().empty() || m.config_hash().empty() || info.in_channels() < 1 ||
      info.text_dim() < 1) {
    return Invalid("model", "name, config_hash and info are required");
  }
  for (const auto& [field, value, max] :
       {std::tuple<const char*, const std::string*, size_t>{"model.name", &m.name(), 256},
        {"model.config_hash", &m.config_hash(), 128},
        {"host", &h.host(), 256},
        {"device", &h.device(), 256},
        {"metrics_address", &h.metrics_address(), 256},
        {"server_version", &h.server_version(), 64}}) {
    if (absl::Status s = CheckLength(field, *value, max); !s.ok()) return s;
  }
  for (const auto& [field, v, lo, hi] :
       {std::tuple<const char*, int64_t, int64_t, int64_t>{
            "model.info.in_channels", info.in_channels(), 1, 4096},
        {"model.info.out_channels", info.out_channels(), 0, 4096},
        {"model.info.text_dim", info.text_dim(), 1, 1 << 16},
        {"model.info.num_layers", info.num_layers(), 0, 1024},
        {"model.info.num_heads", info.num_heads(), 0, 1024},
        {"model.info.head_dim", info.head_dim(), 0, 4096},
        {"model.info.max_tokens", info.max_tokens(), 0, int64_t{1} << 40},
        {"model.info.max_axis_tokens", info.max_axis_tokens(), 0, 1 << 24}}) {
    if (absl::Status s = CheckRange(field, v, lo, hi); !s.ok()) return s;
  }
  for (const auto& [field, list] :
       {std::pair<const char*, const google::protobuf::RepeatedField<int32_t>*>{
            "model.info.vae_stride", &info.vae_stride()},
        {"model.info.patch_size", &info.patch_size()}}) {
    if (list->size() != 0 && list->size() != 3) {
      return Invalid(field, absl::StrCat("3 values, got ", list->size()));
    }
    for (int v : *list) {
      if (absl::Status s = CheckRange(field, v, 1, 64); !s.ok()) return s;
    }
  }
  if (h.backend() != "cpu" && h.backend() != "cuda") {
    return Invalid("backend", "must be cpu or cuda");
  }
  return absl::OkStatus();
}

}  // namespace dn::server
