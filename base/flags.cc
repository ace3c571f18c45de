#include "base/flags.h"

#include <cstdio>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dn {

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::Add(Flag flag) { flags_.push_back(std::move(flag)); }

void FlagSet::String(const std::string& name, std::string* out,
                     std::string help) {
  Add({name, std::move(help), *out, false, [out](const std::string& v) {
         *out = v;
         return absl::OkStatus();
       }});
}

void FlagSet::Int(const std::string& name, int* out, std::string help) {
  Add({name, std::move(help), std::to_string(*out), false,
       [out, name](const std::string& v) {
         if (!absl::SimpleAtoi(v, out))
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": not an integer: '", v, "'"));
         return absl::OkStatus();
       }});
}

void FlagSet::Int64(const std::string& name, int64_t* out, std::string help) {
  Add({name, std::move(help), std::to_string(*out), false,
       [out, name](const std::string& v) {
         if (!absl::SimpleAtoi(v, out))
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": not an integer: '", v, "'"));
         return absl::OkStatus();
       }});
}

void FlagSet::Uint64(const std::string& name, uint64_t* out,
                     std::string help) {
  Add({name, std::move(help), std::to_string(*out), false,
       [out, name](const std::string& v) {
         if (!absl::SimpleAtoi(v, out))
           return absl::InvalidArgumentError(absl::StrCat(
               "--", name, ": not a non-negative integer: '", v, "'"));
         return absl::OkStatus();
       }});
}

void FlagSet::Double(const std::string& name, double* out, std::string help) {
  std::ostringstream def;
  def << *out;
  Add({name, std::move(help), def.str(), false,
       [out, name](const std::string& v) {
         if (!absl::SimpleAtod(v, out))
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": not a number: '", v, "'"));
         return absl::OkStatus();
       }});
}

void FlagSet::Bool(const std::string& name, bool* out, std::string help) {
  Add({name, std::move(help), *out ? "true" : "false", true,
       [out, name](const std::string& v) {
         if (!absl::SimpleAtob(v, out))
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": not a boolean: '", v, "'"));
         return absl::OkStatus();
       }});
}

void FlagSet::OptionalBool(const std::string& name, std::optional<bool>* out,
                           std::string help) {
  Add({name, std::move(help),
       out->has_value() ? (**out ? "true" : "false") : "unset", true,
       [out, name](const std::string& v) {
         bool b = false;
         if (!absl::SimpleAtob(v, &b))
           return absl::InvalidArgumentError(
               absl::StrCat("--", name, ": not a boolean: '", v, "'"));
         *out = b;
         return absl::OkStatus();
       }});
}

const FlagSet::Flag* FlagSet::Find(const std::string& name) const {
  for (const Flag& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

absl::Status FlagSet::Parse(int argc, char** argv,
                            std::vector<std::string>* positional) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      if (positional == nullptr)
        return absl::InvalidArgumentError(
            absl::StrCat("unexpected argument '", arg, "'"));
      positional->push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* flag = Find(name);
    if (flag == nullptr && !has_value && name.rfind("no-", 0) == 0) {
      const Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->is_bool) {
        absl::Status s = negated->set("false");
        if (!s.ok()) return s;
        continue;
      }
    }
    if (flag == nullptr)
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " (see --help)"));
    if (!has_value) {
      if (flag->is_bool) {
        value = "true";
      } else {
        if (i + 1 >= argc)
          return absl::InvalidArgumentError(
              absl::StrCat("flag --", name, " needs a value"));
        value = argv[++i];
      }
    }
    absl::Status s = flag->set(value);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

bool FlagSet::ParseOrExit(int argc, char** argv, int* exit_code,
                          std::vector<std::string>* positional) {
  absl::Status s = Parse(argc, argv, positional);
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", command_.c_str(),
                 std::string(s.message()).c_str());
    *exit_code = 2;
    return false;
  }
  if (help_requested_) {
    std::fputs(Usage().c_str(), stdout);
    *exit_code = 0;
    return false;
  }
  return true;
}

std::string FlagSet::Usage() const {
  std::ostringstream out;
  out << "usage: " << command_ << " [flags]\n\n" << summary_ << "\n\nflags:\n";
  for (const Flag& f : flags_) {
    out << "  --" << f.name;
    if (!f.is_bool) out << "=VALUE";
    out << "\n      " << f.help;
    if (!f.default_text.empty()) out << " (default: " << f.default_text << ")";
    out << "\n";
  }
  return out.str();
}

}  // namespace dn
