// File: base/flags.h
//
// Per-subcommand command-line flags. The `denoised` binary has many
// subcommands with different flags, so each one declares its own FlagSet
// instead of global absl flags.
//
//   dn::FlagSet flags("denoised run", "Runs the engine without the service.");
//   std::string model;
//   int ranks = 1;
//   flags.String("model", &model, "checkpoint folder");
//   flags.Int("ranks", &ranks, "number of rank processes");
//   if (int rc; !flags.ParseOrExit(argc, argv, &rc)) return rc;
//
// Accepted forms: --name=value, --name value, --bool, --bool=true|false,
// --no-bool. --help prints the usage. Unknown flags are an error.
#ifndef DN_BASE_FLAGS_H_
#define DN_BASE_FLAGS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace dn {

class FlagSet {
 public:
  FlagSet(std::string command, std::string summary);

  void String(const std::string& name, std::string* out, std::string help);
  void Int(const std::string& name, int* out, std::string help);
  void Int64(const std::string& name, int64_t* out, std::string help);
  void Uint64(const std::string& name, uint64_t* out, std::string help);
  void Double(const std::string& name, double* out, std::string help);
  void Bool(const std::string& name, bool* out, std::string help);
  // A boolean that stays unset (nullopt) unless given: --name, --name=B,
  // --no-name.
  void OptionalBool(const std::string& name, std::optional<bool>* out,
                    std::string help);

  // Parses argv[1..argc) (argv[0] is the subcommand name). Positional
  // arguments go to `positional` (an error if it is null).
  absl::Status Parse(int argc, char** argv,
                     std::vector<std::string>* positional = nullptr);
  // Parse, printing usage/errors. Returns false when the caller should return
  // *exit_code (0 after --help, 2 on a usage error).
  bool ParseOrExit(int argc, char** argv, int* exit_code,
                   std::vector<std::string>* positional = nullptr);
  bool help_requested() const { return help_requested_; }
  std::string Usage() const;

 private:
  struct Flag {
    std::string name;
    std::string help;
    std::string default_text;
    bool is_bool = false;
    std::function<absl::Status(const std::string&)> set;
  };
  void Add(Flag flag);
  const Flag* Find(const std::string& name) const;

  std::string command_;
  std::string summary_;
  std::vector<Flag> flags_;
  bool help_requested_ = false;
};

}  // namespace dn

#endif  // DN_BASE_FLAGS_H_
