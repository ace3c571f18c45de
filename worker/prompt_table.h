// File: worker/prompt_table.h
//
// The prompt table of a small model that has no text encoder (the demo
// model, tools/demo_model/prompts.safetensors): one f32 embedding vector
// [text_dim] per vocabulary word, named by the word, plus `__metadata__`
// "tokens" (T, the rows of an embedding), optionally "grammar" (a hint such
// as "<colour> <shape> moving <direction>") and "vocabulary" (the words in
// the order messages list them; else the file's tensor order). Tokenisation (tools/README.md):
// lower-case the prompt, split on whitespace; every word must be in the
// table; the embedding is the words' vectors in prompt order padded with zero
// rows to [T, text_dim]. The empty prompt is T zero rows: the unconditional
// (negative) embedding for classifier-free guidance.
#ifndef DN_WORKER_PROMPT_TABLE_H_
#define DN_WORKER_PROMPT_TABLE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "worker/tensor.h"

namespace dn::worker {

class PromptTable {
 public:
  // Reads a prompt table file. Errors name the file, the tensor or the
  // metadata key (a word that is not lower-case without whitespace, tensors
  // of different lengths, a missing or bad "tokens").
  static absl::StatusOr<PromptTable> Load(const std::string& path);
  // From word vectors (in vocabulary order); the same checks as Load.
  static absl::StatusOr<PromptTable> FromWords(
      std::vector<std::pair<std::string, std::vector<float>>> words, int tokens,
      std::string grammar);
  // Seeded N(0, 1) vectors for `vocabulary` (a stand-in table for a model
  // with random weights).
  static absl::StatusOr<PromptTable> Random(
      const std::vector<std::string>& vocabulary, int tokens, int text_dim,
      uint64_t seed, std::string grammar);

  // Writes the table in the format Load reads.
  absl::Status Save(const std::string& path) const;

  // Lower-cased words of `prompt`, split on whitespace.
  static std::vector<std::string> Tokenize(std::string_view prompt);
  // The [T, text_dim] f32 host embedding of `prompt`. Errors
  // (INVALID_ARGUMENT): an unknown word (names it and lists the vocabulary),
  // more than T words.
  absl::StatusOr<Tensor> Embed(std::string_view prompt) const;

  int tokens() const { return tokens_; }
  int text_dim() const { return text_dim_; }
  const std::string& grammar() const { return grammar_; }
  // The words, in table order.
  const std::vector<std::string>& vocabulary() const { return words_; }
  // "red green blue ..." (for messages).
  std::string VocabularyString() const;

 private:
  PromptTable() = default;

  int tokens_ = 0;
  int text_dim_ = 0;
  std::string grammar_;
  std::vector<std::string> words_;
  std::vector<std::vector<float>> vectors_;  // same order as words_
};

// The vocabulary and grammar of the demo model's random-weight stand-in
// (the vocabulary of tools/README.md; the trained model's own
// prompts.safetensors is the source of truth once it exists).
std::vector<std::string> DemoStandInVocabulary();
inline constexpr int kDemoStandInTokens = 4;
inline constexpr char kDemoGrammar[] = "<colour> <shape> moving <direction>";

}  // namespace dn::worker

#endif  // DN_WORKER_PROMPT_TABLE_H_
