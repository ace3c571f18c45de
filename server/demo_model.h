// File: server/demo_model.h
//
// Where `denoised demo` finds its model: a folder with the checkpoint
// (config.json + diffusion_pytorch_model.safetensors) and the prompt table
// (prompts.safetensors), tools/demo_model in the source tree. Looked for, in
// order: the --model flag; $DENOISED_DEMO_MODEL; <binary's folder>/../share/
// denoised/demo_model (an installed or container layout: the image has it at
// /opt/denoised/share/denoised/demo_model); the source tree's
// tools/demo_model (compiled in, for build trees). A folder given by the flag
// or the variable must be valid; the other two are skipped when incomplete.
#ifndef DN_SERVER_DEMO_MODEL_H_
#define DN_SERVER_DEMO_MODEL_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace dn::server {

inline constexpr char kDemoModelEnv[] = "DENOISED_DEMO_MODEL";
inline constexpr char kDemoPromptTableFile[] = "prompts.safetensors";
// The model name the demo's worker group registers.
inline constexpr char kDemoModelName[] = "denoised-demo";

struct DemoModelSearch {
  std::string dir;                  // empty: none found
  std::string source;               // how it was found ("--model", ...)
  std::vector<std::string> looked;  // "PATH: why not" for each skipped place
};

// OK when `dir` holds config.json and prompts.safetensors; otherwise says
// which file is missing.
absl::Status CheckDemoModelDir(const std::string& dir);

// The search above. Errors only for an invalid --model / $DENOISED_DEMO_MODEL.
absl::StatusOr<DemoModelSearch> FindDemoModel(const std::string& flag);

// The source tree's tools/demo_model (compiled in).
std::string SourceDemoModelDir();

}  // namespace dn::server

#endif  // DN_SERVER_DEMO_MODEL_H_
