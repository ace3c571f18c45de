#include "worker/prompt_table.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "worker/noise.h"
#include "worker/safetensors.h"

namespace dn::worker {

namespace {

// Stream of the stand-in vectors (worker/noise.h): "prompt".
constexpr uint64_t kPromptStream = 0x70726f6d7074ull;
// Upper bounds on a table (files are untrusted input).
constexpr int kMaxTokens = 4096;
constexpr int kMaxTextDim = 1 << 16;

bool ValidWord(const std::string& w) {
  if (w.empty()) return false;
  for (unsigned char c : w) {
    if (std::isspace(c) || std::isupper(c) || c < 0x21) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<PromptTable> PromptTable::FromWords(
    std::vector<std::pair<std::string, std::vector<float>>> words, int tokens,
    std::string grammar) {
  if (tokens < 1 || tokens > kMaxTokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt table: tokens must be in [1, ", kMaxTokens, "], got ", tokens));
  }
  if (words.empty()) {
    return absl::InvalidArgumentError("prompt table: no words");
  }
  PromptTable t;
  t.tokens_ = tokens;
  t.grammar_ = std::move(grammar);
  std::set<std::string> seen;
  for (auto& [word, vec] : words) {
    if (!ValidWord(word)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt table: word '", word,
          "' is not lower-case without whitespace (no prompt could use it)"));
    }
    if (!seen.insert(word).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt table: word '", word, "' appears twice"));
    }
    if (vec.empty() || vec.size() > static_cast<size_t>(kMaxTextDim)) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt table: word '", word, "' has ", vec.size(),
                       " values (want 1..", kMaxTextDim, ")"));
    }
    if (t.text_dim_ == 0) t.text_dim_ = static_cast<int>(vec.size());
    if (vec.size() != static_cast<size_t>(t.text_dim_)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt table: word '", word, "' has ", vec.size(),
          " values, word '", t.words_.front(), "' has ", t.text_dim_));
    }
    t.words_.push_back(word);
    t.vectors_.push_back(std::move(vec));
  }
  return t;
}

absl::StatusOr<PromptTable> PromptTable::Load(const std::string& path) {
  auto file_or = SafetensorsFile::Open(path);
  if (!file_or.ok()) {
    return absl::Status(file_or.status().code(),
                        absl::StrCat("prompt table ", path, ": ",
                                     file_or.status().message()));
  }
  const SafetensorsFile& file = **file_or;
  auto err = [&](const std::string& what) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt table ", path, ": ", what));
  };
  const auto& md = file.header().metadata;
  auto tok = md.find("tokens");
  int tokens = 0;
  if (tok == md.end()) return err("__metadata__ has no \"tokens\" (T)");
  if (!absl::SimpleAtoi(tok->second, &tokens)) {
    return err(absl::StrCat("__metadata__ \"tokens\" is not an integer: '",
                            tok->second, "'"));
  }
  auto gr = md.find("grammar");
  std::vector<std::pair<std::string, std::vector<float>>> words;
  for (const SafetensorsEntry& e : file.tensors()) {
    if (e.shape.size() != 1) {
      return err(absl::StrCat("tensor '", e.name, "' has shape ",
                              ShapeString(e.shape), ", want [text_dim]"));
    }
    if (e.shape[0] < 1 || e.shape[0] > kMaxTextDim) {
      return err(absl::StrCat("tensor '", e.name, "' has ", e.shape[0],
                              " values (want 1..", kMaxTextDim, ")"));
    }
    std::vector<float> v(static_cast<size_t>(e.shape[0]));
    DN_RETURN_IF_ERROR(file.ReadF32(e, v.data()));
    words.emplace_back(e.name, std::move(v));
  }
  // Optional "vocabulary": the words in a meaningful order (safetensors
  // writers often store tensors sorted by name); it must name every tensor.
  if (auto voc = md.find("vocabulary"); voc != md.end()) {
    const std::vector<std::string> order = Tokenize(voc->second);
    std::vector<std::pair<std::string, std::vector<float>>> sorted;
    for (const std::string& w : order) {
      auto it = std::find_if(words.begin(), words.end(),
                             [&](const auto& e) { return e.first == w; });
      if (it == words.end() || it->second.empty()) {
        return err(absl::StrCat("__metadata__ \"vocabulary\" names '", w,
                                "', which has no tensor (or is named twice)"));
      }
      sorted.emplace_back(w, std::move(it->second));
    }
    if (sorted.size() != words.size()) {
      return err(absl::StrCat("__metadata__ \"vocabulary\" lists ",
                              sorted.size(), " words, the file has ",
                              words.size(), " tensors"));
    }
    words = std::move(sorted);
  }
  absl::StatusOr<PromptTable> t = FromWords(
      std::move(words), tokens, gr == md.end() ? std::string() : gr->second);
  if (!t.ok()) return err(std::string(t.status().message()));
  return t;
}

absl::StatusOr<PromptTable> PromptTable::Random(
    const std::vector<std::string>& vocabulary, int tokens, int text_dim,
    uint64_t seed, std::string grammar) {
  if (text_dim < 1 || text_dim > kMaxTextDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt table: text_dim ", text_dim, " out of range"));
  }
  std::vector<std::pair<std::string, std::vector<float>>> words;
  for (size_t i = 0; i < vocabulary.size(); ++i) {
    std::vector<float> v(static_cast<size_t>(text_dim));
    FillNormal(seed, kPromptStream, i * static_cast<uint64_t>(text_dim), 0.0f,
               1.0f, v.data(), v.size());
    words.emplace_back(vocabulary[i], std::move(v));
  }
  return FromWords(std::move(words), tokens, std::move(grammar));
}

absl::Status PromptTable::Save(const std::string& path) const {
  std::vector<SafetensorsTensorRef> refs;
  for (size_t i = 0; i < words_.size(); ++i) {
    refs.push_back({words_[i], DType::kF32, {text_dim_}, vectors_[i].data()});
  }
  std::map<std::string, std::string> md = {{"tokens", std::to_string(tokens_)},
                                           {"vocabulary", VocabularyString()}};
  if (!grammar_.empty()) md["grammar"] = grammar_;
  return WriteSafetensors(path, refs, md);
}

std::vector<std::string> PromptTable::Tokenize(std::string_view prompt) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : prompt) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (std::isspace(c)) {
      if (!cur.empty()) out.push_back(std::move(cur));
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(std::tolower(c)));
    }
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

std::string PromptTable::VocabularyString() const {
  return absl::StrJoin(words_, " ");
}

absl::StatusOr<Tensor> PromptTable::Embed(std::string_view prompt_view) const {
  const std::string prompt(prompt_view);  // (Debian's absl::string_view is not std's)
  const std::vector<std::string> words = Tokenize(prompt);
  auto hint = [&] {
    return absl::StrCat(" (vocabulary: ", VocabularyString(),
                        grammar_.empty() ? "" : "; grammar: ", grammar_, ")");
  };
  if (words.size() > static_cast<size_t>(tokens_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt \"", prompt, "\" has ", words.size(),
                     " words; the model takes at most ", tokens_, hint()));
  }
  Tensor t = Tensor::Host({tokens_, text_dim_});  // zero rows = padding
  float* out = t.data_as<float>();
  for (size_t i = 0; i < words.size(); ++i) {
    size_t k = 0;
    while (k < words_.size() && words_[k] != words[i]) ++k;
    if (k == words_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt \"", prompt, "\": unknown word '", words[i], "'", hint()));
    }
    std::memcpy(out + i * static_cast<size_t>(text_dim_), vectors_[k].data(),
                sizeof(float) * static_cast<size_t>(text_dim_));
  }
  return t;
}

std::vector<std::string> DemoStandInVocabulary() {
  return {"red",    "green",  "blue",   "yellow", "white", "square", "circle",
          "triangle", "moving", "left", "right",  "up",     "down"};
}

}  // namespace dn::worker
