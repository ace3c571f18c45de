// The `denoised` executable: one binary, many subcommands.
#include <cstdio>
#include <cstring>
#include <string>

#include "server/health_check_command.h"
#include "server/version.h"

namespace {

using CommandFn = int (*)(int argc, char** argv);

struct Command {
  const char* name;
  const char* summary;
  CommandFn fn;
  bool hidden;  // internal subcommands (rank processes) are not listed
};

// Every subcommand, in the order --help lists them. Each takes argv starting
// at its own name.
const Command kCommands[] = {
    {"version", "print the version", [](int, char**) {
       std::printf("denoised %s\n", dn::Version());
       return 0;
     }, false},
    {"health", "check a server's grpc.health.v1 status (exit 0 iff SERVING)",
     dn::server::HealthCommand, false},
};

void PrintUsage() {
  std::printf(
      "denoised %s: diffusion-transformer denoising over gRPC, sharded across "
      "GPUs\n\nusage: denoised <command> [flags]   (denoised <command> --help "
      "for its flags)\n\ncommands:\n",
      dn::Version());
  for (const Command& c : kCommands)
    if (!c.hidden) std::printf("  %-16s %s\n", c.name, c.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 ||
      std::strcmp(argv[1], "-h") == 0 || std::strcmp(argv[1], "help") == 0) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  // Two-word commands ("bench comm") are matched first.
  if (argc >= 3) {
    const std::string two = std::string(argv[1]) + " " + argv[2];
    for (const Command& c : kCommands)
      if (two == c.name) return c.fn(argc - 2, argv + 2);
  }
  for (const Command& c : kCommands)
    if (std::strcmp(argv[1], c.name) == 0) return c.fn(argc - 1, argv + 1);
  std::fprintf(stderr, "denoised: unknown command '%s'\n\n", argv[1]);
  PrintUsage();
  return 2;
}
