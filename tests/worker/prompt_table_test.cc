// The prompt table and its tokenisation (worker/prompt_table.h,
// tools/README.md): words -> [T, text_dim] rows, zero padding, errors.
#include "worker/prompt_table.h"

#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/safetensors.h"

namespace dn::worker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A table with vector(word i)[j] = 100 * (i + 1) + j, T = 4, text_dim 3.
PromptTable SmallTable() {
  std::vector<std::pair<std::string, std::vector<float>>> words;
  const std::vector<std::string> vocab = {"red", "blue", "square", "circle",
                                          "moving", "left", "right"};
  for (size_t i = 0; i < vocab.size(); ++i) {
    std::vector<float> v;
    for (int j = 0; j < 3; ++j) v.push_back(100.0f * (i + 1) + j);
    words.emplace_back(vocab[i], v);
  }
  return *PromptTable::FromWords(words, 4, kDemoGrammar);
}

std::vector<float> Row(const Tensor& t, int r) {
  const float* p = t.data_as<float>() + r * t.dim(1);
  return std::vector<float>(p, p + t.dim(1));
}

class TempFile {
 public:
  TempFile() {
    char tmpl[] = "/tmp/dn-prompt-table-XXXXXX";
    const int fd = mkstemp(tmpl);
    if (fd >= 0) close(fd);
    path_ = tmpl;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(PromptTableTest, TokenizeLowerCasesAndSplitsOnWhitespace) {
  EXPECT_THAT(PromptTable::Tokenize("  Red\tSQUARE \n moving  Left "),
              ElementsAre("red", "square", "moving", "left"));
  EXPECT_TRUE(PromptTable::Tokenize("").empty());
  EXPECT_TRUE(PromptTable::Tokenize(" \t\n").empty());
}

TEST(PromptTableTest, EmbedsWordsInPromptOrderPaddedWithZeroRows) {
  const PromptTable t = SmallTable();
  absl::StatusOr<Tensor> e = t.Embed("Red Square moving LEFT");
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ(e->shape(), (Shape{4, 3}));
  EXPECT_THAT(Row(*e, 0), ElementsAre(100, 101, 102));  // red
  EXPECT_THAT(Row(*e, 1), ElementsAre(300, 301, 302));  // square
  EXPECT_THAT(Row(*e, 2), ElementsAre(500, 501, 502));  // moving
  EXPECT_THAT(Row(*e, 3), ElementsAre(600, 601, 602));  // left

  absl::StatusOr<Tensor> short_prompt = t.Embed("circle blue");
  ASSERT_TRUE(short_prompt.ok()) << short_prompt.status();
  EXPECT_THAT(Row(*short_prompt, 0), ElementsAre(400, 401, 402));
  EXPECT_THAT(Row(*short_prompt, 1), ElementsAre(200, 201, 202));
  EXPECT_THAT(Row(*short_prompt, 2), ElementsAre(0, 0, 0));
  EXPECT_THAT(Row(*short_prompt, 3), ElementsAre(0, 0, 0));
}

TEST(PromptTableTest, EmptyPromptIsTZeroRows) {
  const PromptTable t = SmallTable();
  for (const char* p : {"", "   "}) {
    absl::StatusOr<Tensor> e = t.Embed(p);
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_EQ(e->shape(), (Shape{4, 3}));
    for (int64_t i = 0; i < e->numel(); ++i) {
      ASSERT_EQ(e->data_as<float>()[i], 0.0f) << "prompt '" << p << "'";
    }
  }
}

TEST(PromptTableTest, UnknownWordIsAnErrorListingTheVocabulary) {
  const PromptTable t = SmallTable();
  absl::StatusOr<Tensor> e = t.Embed("purple square moving left");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string msg(e.status().message());
  EXPECT_THAT(msg, HasSubstr("unknown word 'purple'"));
  for (const char* w : {"red", "blue", "square", "circle", "moving", "left", "right"}) {
    EXPECT_THAT(msg, HasSubstr(w));
  }
  EXPECT_THAT(msg, HasSubstr("red blue square circle moving left right"));
  EXPECT_THAT(msg, HasSubstr(kDemoGrammar));
}

TEST(PromptTableTest, MoreWordsThanTokensIsAnError) {
  const PromptTable t = SmallTable();
  EXPECT_TRUE(t.Embed("red square moving left").ok());
  absl::StatusOr<Tensor> e = t.Embed("red square moving left right");
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("5 words"));
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("at most 4"));
}

TEST(PromptTableTest, SaveAndLoadRoundTrip) {
  const PromptTable t = SmallTable();
  TempFile f;
  ASSERT_TRUE(t.Save(f.path()).ok());
  absl::StatusOr<PromptTable> back = PromptTable::Load(f.path());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tokens(), 4);
  EXPECT_EQ(back->text_dim(), 3);
  EXPECT_EQ(back->grammar(), kDemoGrammar);
  EXPECT_EQ(back->vocabulary(), t.vocabulary());
  absl::StatusOr<Tensor> a = t.Embed("blue circle moving right");
  absl::StatusOr<Tensor> b = back->Embed("blue circle moving right");
  ASSERT_TRUE(a.ok() && b.ok());
  for (int r = 0; r < 4; ++r) EXPECT_EQ(Row(*a, r), Row(*b, r));
}

TEST(PromptTableTest, LoadRejectsBadFilesNamingTheProblem) {
  const std::vector<float> v3 = {1, 2, 3}, v2 = {1, 2};
  const Shape s3 = {3}, s2 = {2}, m = {1, 3};
  struct Case {
    std::vector<SafetensorsTensorRef> tensors;
    std::map<std::string, std::string> metadata;
    const char* want;
  };
  const std::vector<Case> cases = {
      {{{"red", DType::kF32, s3, v3.data()}}, {}, "\"tokens\""},
      {{{"red", DType::kF32, s3, v3.data()}}, {{"tokens", "four"}}, "four"},
      {{{"red", DType::kF32, s3, v3.data()}}, {{"tokens", "0"}}, "tokens"},
      {{{"red", DType::kF32, m, v3.data()}}, {{"tokens", "4"}}, "'red'"},
      {{{"Red", DType::kF32, s3, v3.data()}}, {{"tokens", "4"}}, "'Red'"},
      {{{"red", DType::kF32, s3, v3.data()}, {"blue", DType::kF32, s2, v2.data()}},
       {{"tokens", "4"}},
       "'blue' has 2 values, word 'red' has 3"},
  };
  for (const Case& c : cases) {
    TempFile f;
    ASSERT_TRUE(WriteSafetensors(f.path(), c.tensors, c.metadata).ok());
    absl::StatusOr<PromptTable> t = PromptTable::Load(f.path());
    ASSERT_FALSE(t.ok()) << c.want;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(c.want));
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(f.path()));
  }
  // "vocabulary" must name exactly the tensors.
  for (const char* voc : {"red blue", "red", "red red"}) {
    TempFile f;
    ASSERT_TRUE(WriteSafetensors(f.path(), {{"red", DType::kF32, s3, v3.data()},
                                            {"green", DType::kF32, s3, v3.data()}},
                                 {{"tokens", "4"}, {"vocabulary", voc}})
                    .ok());
    absl::StatusOr<PromptTable> t = PromptTable::Load(f.path());
    ASSERT_FALSE(t.ok()) << voc;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr("\"vocabulary\""));
  }
  absl::StatusOr<PromptTable> missing = PromptTable::Load("/nonexistent/prompts.safetensors");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("/nonexistent/prompts.safetensors"));
}

TEST(PromptTableTest, VocabularyMetadataOrdersTheWords) {
  // Tensors stored sorted by name (as Python's safetensors writes them); the
  // metadata gives the order messages use.
  const std::vector<float> a = {1, 1}, b = {2, 2}, c = {3, 3};
  TempFile f;
  ASSERT_TRUE(WriteSafetensors(f.path(),
                               {{"blue", DType::kF32, {2}, a.data()},
                                {"red", DType::kF32, {2}, b.data()},
                                {"square", DType::kF32, {2}, c.data()}},
                               {{"tokens", "2"}, {"vocabulary", "red blue square"}})
                  .ok());
  absl::StatusOr<PromptTable> t = PromptTable::Load(f.path());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->vocabulary(), ElementsAre("red", "blue", "square"));
  EXPECT_THAT(Row(*t->Embed("red square"), 0), ElementsAre(2, 2));
  EXPECT_THAT(Row(*t->Embed("red square"), 1), ElementsAre(3, 3));
}

TEST(PromptTableTest, RandomStandInIsSeededAndHasTheDemoVocabulary) {
  absl::StatusOr<PromptTable> a = PromptTable::Random(
      DemoStandInVocabulary(), kDemoStandInTokens, 64, 7, kDemoGrammar);
  absl::StatusOr<PromptTable> b = PromptTable::Random(
      DemoStandInVocabulary(), kDemoStandInTokens, 64, 7, kDemoGrammar);
  absl::StatusOr<PromptTable> c = PromptTable::Random(
      DemoStandInVocabulary(), kDemoStandInTokens, 64, 8, kDemoGrammar);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->tokens(), 4);
  EXPECT_EQ(a->text_dim(), 64);
  const Tensor ea = *a->Embed("yellow triangle moving down");
  const Tensor eb = *b->Embed("yellow triangle moving down");
  const Tensor ec = *c->Embed("yellow triangle moving down");
  EXPECT_EQ(Row(ea, 0), Row(eb, 0));
  EXPECT_NE(Row(ea, 0), Row(ec, 0));
  EXPECT_NE(Row(ea, 0), Row(ea, 1));  // different words, different vectors
}

}  // namespace
}  // namespace dn::worker
