// File: tests/fuzz/wan_config_fuzz.cc
//
// libFuzzer target: worker::WanConfig::FromJson on arbitrary text. A config
// that parses must survive ToJson -> FromJson unchanged (same canonical JSON).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "worker/wan_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<dn::worker::WanConfig> c = dn::worker::WanConfig::FromJson(text);
  if (!c.ok()) return 0;
  const std::string canonical = c->ToJson();
  absl::StatusOr<dn::worker::WanConfig> again =
      dn::worker::WanConfig::FromJson(canonical);
  if (!again.ok() || again->ToJson() != canonical) abort();
  return 0;
}
