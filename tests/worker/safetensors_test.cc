#include "worker/safetensors.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/worker/io_test_util.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;
using testing_util::ReadFile;
using testing_util::TempDir;
using testing_util::WriteFile;

// A safetensors byte image: length prefix + header text + data bytes.
std::string Image(const std::string& header, size_t data_bytes,
                  uint64_t declared_len = ~uint64_t{0}) {
  const uint64_t len = declared_len == ~uint64_t{0} ? header.size() : declared_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out += header;
  out.append(data_bytes, '\x01');
  return out;
}

absl::Status Parse(const std::string& bytes) {
  return ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()),
                                bytes.size())
      .status();
}

TEST(SafetensorsTest, RoundTripsF32Bf16F16WithMetadata) {
  TempDir dir;
  const std::vector<float> a = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<float> b = {0.1f, 0.2f, -0.3f, 1234.5f};
  const std::vector<float> c = {0.5f, -65504.0f, 6.1e-5f};
  std::vector<uint8_t> b16(b.size() * 2), c16(c.size() * 2);
  ConvertFromF32(DType::kBF16, b.data(), b.size(), b16.data());
  ConvertFromF32(DType::kF16, c.data(), c.size(), c16.data());
  const float scalar = 42.0f;
  const std::string path = dir / "x.safetensors";
  ASSERT_TRUE(WriteSafetensors(path,
                               {{"a", DType::kF32, {2, 3}, a.data()},
                                {"b.bf16", DType::kBF16, {4}, b16.data()},
                                {"empty", DType::kF32, {0, 5}, nullptr},
                                {"c", DType::kF16, {1, 3, 1}, c16.data()},
                                {"scalar", DType::kF32, {}, &scalar}},
                               {{"format", "pt"}, {"note", "h\xc3\xa9llo"}})
                  .ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const SafetensorsHeader& h = (*file)->header();
  EXPECT_EQ(h.data_offset % 8, 0u);
  EXPECT_EQ(h.metadata.at("format"), "pt");
  EXPECT_EQ(h.metadata.at("note"), "h\xc3\xa9llo");
  ASSERT_EQ(h.tensors.size(), 5u);
  // Stored in the given order.
  EXPECT_EQ(h.tensors[0].name, "a");
  EXPECT_EQ(h.tensors[1].name, "b.bf16");
  EXPECT_EQ(h.tensors.back().name, "scalar");

  const SafetensorsEntry* ea = (*file)->Find("a");
  ASSERT_NE(ea, nullptr);
  EXPECT_EQ(ea->dtype, DType::kF32);
  EXPECT_EQ(ea->shape, (Shape{2, 3}));
  std::vector<float> got(6);
  ASSERT_TRUE((*file)->ReadF32(*ea, got.data()).ok());
  EXPECT_EQ(got, a);

  const SafetensorsEntry* eb = (*file)->Find("b.bf16");
  ASSERT_NE(eb, nullptr);
  EXPECT_EQ(eb->dtype, DType::kBF16);
  got.resize(4);
  ASSERT_TRUE((*file)->ReadF32(*eb, got.data()).ok());
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(got[i], BF16ToF32(F32ToBF16(b[i])));
    EXPECT_NEAR(got[i], b[i], std::fabs(b[i]) * (1.0f / 128));
  }

  const SafetensorsEntry* ec = (*file)->Find("c");
  ASSERT_NE(ec, nullptr);
  EXPECT_EQ(ec->dtype, DType::kF16);
  EXPECT_EQ(ec->shape, (Shape{1, 3, 1}));
  got.resize(3);
  ASSERT_TRUE((*file)->ReadF32(*ec, got.data()).ok());
  EXPECT_EQ(got[0], 0.5f);
  EXPECT_EQ(got[1], -65504.0f);
  EXPECT_NEAR(got[2], 6.1e-5f, 1e-7f);

  const SafetensorsEntry* ee = (*file)->Find("empty");
  ASSERT_NE(ee, nullptr);
  EXPECT_EQ(ee->nbytes(), 0u);
  const SafetensorsEntry* es = (*file)->Find("scalar");
  ASSERT_NE(es, nullptr);
  EXPECT_TRUE(es->shape.empty());
  float s = 0;
  ASSERT_TRUE((*file)->ReadF32(*es, &s).ok());
  EXPECT_EQ(s, 42.0f);
  EXPECT_EQ((*file)->Find("nope"), nullptr);
}

TEST(SafetensorsTest, LargeTensorSurvivesPageRelease) {
  // ReadF32 drops the pages it read; reading again must still work.
  TempDir dir;
  std::vector<float> big(300000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i) * 0.5f;
  const std::string path = dir / "big.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"big", DType::kF32, {300000}, big.data()}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> got(big.size());
  for (int round = 0; round < 2; ++round) {
    ASSERT_TRUE((*file)->ReadF32(*(*file)->Find("big"), got.data()).ok());
    EXPECT_EQ(got, big);
  }
}

TEST(SafetensorsTest, DTypeConversionMatchesTensorHelpers) {
  const std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.5f, 3.14159f,
                                     65504.0f, 1e-8f, -7e5f, 0.333333f};
  for (DType dt : {DType::kBF16, DType::kF16}) {
    // Unaligned destination and source.
    std::vector<uint8_t> raw(values.size() * 2 + 1);
    ConvertFromF32(dt, values.data(), values.size(), raw.data() + 1);
    std::vector<float> back(values.size());
    ConvertToF32(dt, raw.data() + 1, values.size(), back.data());
    for (size_t i = 0; i < values.size(); ++i) {
      const float expected = dt == DType::kBF16 ? BF16ToF32(F32ToBF16(values[i]))
                                                : F16ToF32(F32ToF16(values[i]));
      EXPECT_EQ(std::memcmp(&back[i], &expected, 4), 0)
          << DTypeName(dt) << " " << values[i];
    }
  }
  // Known encodings, little-endian.
  const float one = 1.0f;
  uint8_t bytes[2];
  ConvertFromF32(DType::kBF16, &one, 1, bytes);
  EXPECT_EQ(bytes[0], 0x80);
  EXPECT_EQ(bytes[1], 0x3f);
  ConvertFromF32(DType::kF16, &one, 1, bytes);
  EXPECT_EQ(bytes[0], 0x00);
  EXPECT_EQ(bytes[1], 0x3c);
}

struct BadCase {
  const char* what;
  std::string bytes;
  const char* message;
};

TEST(SafetensorsTest, MalformedHeadersGiveClearErrors) {
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<BadCase> cases = {
      {"empty file", "", "shorter than the 8-byte"},
      {"short file", std::string(5, '\0'), "shorter than the 8-byte"},
      {"length past end", Image("{}", 0, 100), "exceeds the 2 bytes"},
      {"huge length", Image("{}", 0, uint64_t{1} << 62), "exceeds the limit"},
      {"tiny length", Image("{", 0), "too short"},
      {"not an object", Image("[1, 2]", 0), "does not start with '{'"},
      {"bad json", Image("{\"t\": {", 0), "not valid JSON"},
      {"trailing garbage", Image("{} x", 0), "not valid JSON"},
      {"entry not object", Image(R"({"t": 3})", 0), "tensor 't': expected an object"},
      {"missing dtype", Image(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", 4),
       "tensor 't': missing 'dtype'"},
      {"unsupported dtype",
       Image(R"({"w.x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8),
       "tensor 'w.x' has dtype 'I64'; only F32, BF16 and F16"},
      {"F64", Image(R"({"q":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8),
       "tensor 'q' has dtype 'F64'"},
      {"dtype not string", Image(R"({"t":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4),
       "'dtype' must be a string"},
      {"missing shape", Image(R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", 4),
       "missing 'shape'"},
      {"negative shape", Image(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
       "shape entries must be non-negative integers, got negative integer"},
      {"float shape", Image(R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4),
       "non-negative integers, got non-integer number"},
      {"overflowing shape",
       Image(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}})", 4),
       "shape [4294967296] times 4294967296 has more than"},
      // ...followed by a value nested 100000 deep: the message must not
      // render it (json::dump recurses once per level: a stack overflow).
      {"overflowing shape, deep tail",
       Image(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,)" + std::string(100000, '[') +
                 std::string(100000, ']') + R"(],"data_offsets":[0,4]}})",
             4),
       "has more than"},
      {"missing offsets", Image(R"({"t":{"dtype":"F32","shape":[1]}})", 4),
       "missing 'data_offsets'"},
      {"offsets not pair", Image(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4),
       "'data_offsets' must be [begin, end]"},
      {"end before begin", Image(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4),
       "end before begin"},
      {"past the end", Image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4),
       "past the end of the data section (4 bytes)"},
      {"size mismatch", Image(R"({"t":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}})", 8),
       "hold 8 bytes but BF16 [3] needs 6"},
      {"overlap",
       Image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
             R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
       "tensor 'b' data_offsets [4, 12] overlap tensor 'a'"},
      {"gap",
       Image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
       "gap in the data section: bytes [4, 8)"},
      {"uncovered tail", Image("{" + ok_entry + "}", 12), "tensors cover 8 bytes of the 12"},
      {"duplicate", Image("{" + ok_entry + "," + ok_entry + "}", 8), "names 't' twice"},
      {"unknown field",
       Image(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", 4),
       "unknown field 'x'"},
      {"metadata not strings", Image(R"({"__metadata__":{"k":1}})", 0),
       "__metadata__ value 'k' must be a string"},
      {"metadata not object", Image(R"({"__metadata__":[]})", 0),
       "__metadata__ must be an object"},
      {"empty name", Image(R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4),
       "empty tensor name"},
      {"hostile name", Image("{\"\\u0001\\n\":3}", 0), "tensor '\\x01\\x0a'"},
      {"bad utf8", Image("{\"\xff\":3}", 0), "not valid JSON"},
  };
  for (const BadCase& c : cases) {
    const absl::Status s = Parse(c.bytes);
    EXPECT_FALSE(s.ok()) << c.what;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.message)) << c.what;
  }
}

TEST(SafetensorsTest, AcceptsValidEdgeCases) {
  // Empty header object, null metadata, padding spaces, zero-size tensors.
  EXPECT_TRUE(Parse(Image("{}", 0)).ok());
  EXPECT_TRUE(Parse(Image("{}      ", 0)).ok());
  EXPECT_TRUE(Parse(Image(R"({"__metadata__":null})", 0)).ok());
  const std::string image =
      Image(R"({"z":{"dtype":"F16","shape":[0],"data_offsets":[0,0]},)"
            R"("b":{"dtype":"BF16","shape":[1,1],"data_offsets":[4,6]},)"
            R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
            6);
  auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(image.data()),
                                  image.size());
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors.size(), 3u);
  // Ordered by data offset (the empty tensor [0, 0) first).
  EXPECT_EQ(h->tensors[0].name, "z");
  EXPECT_EQ(h->tensors[1].name, "a");
  EXPECT_EQ(h->tensors[2].name, "b");
  EXPECT_EQ(h->tensors[2].shape, (Shape{1, 1}));
  EXPECT_EQ(h->data_size, 6u);
}

TEST(SafetensorsTest, TruncatedAndMutatedFilesNeverCrash) {
  TempDir dir;
  std::vector<float> v(37);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  std::vector<uint8_t> h16(10 * 2);
  const std::string path = dir / "ok.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"a.weight", DType::kF32, {37}, v.data()},
                                      {"b", DType::kBF16, {2, 5}, h16.data()}},
                               {{"format", "pt"}})
                  .ok());
  const std::string good = ReadFile(path);
  ASSERT_TRUE(Parse(good).ok());
  // Every truncation is rejected.
  for (size_t len = 0; len < good.size(); ++len)
    EXPECT_FALSE(Parse(good.substr(0, len)).ok()) << "length " << len;
  // Byte mutations of the header: any result but a crash.
  uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&]() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  const size_t header_end = 8 + static_cast<size_t>(good[0] & 0xff) +
                            (static_cast<size_t>(good[1] & 0xff) << 8);
  int accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string m = good;
    const int flips = 1 + static_cast<int>(next() % 3);
    for (int f = 0; f < flips; ++f)
      m[next() % header_end] = static_cast<char>(next() & 0xff);
    auto h = ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(m.data()), m.size());
    if (h.ok()) {
      ++accepted;
      // Whatever was accepted lies inside the file.
      for (const SafetensorsEntry& e : h->tensors)
        EXPECT_LE(h->data_offset + e.end, m.size());
    }
  }
  SUCCEED() << accepted << " mutations accepted";

  // A truncated file on disk: error names the path.
  const std::string cut = dir / "cut.safetensors";
  WriteFile(cut, good.substr(0, good.size() - 3));
  auto file = SafetensorsFile::Open(cut);
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(cut));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("past the end"));
  EXPECT_FALSE(SafetensorsFile::Open(dir / "missing.safetensors").ok());
  EXPECT_FALSE(SafetensorsFile::Open(dir.path()).ok());  // a folder
}

TEST(SafetensorsTest, WriterChecksItsInput) {
  TempDir dir;
  float x[2] = {1, 2};
  EXPECT_FALSE(WriteSafetensors(dir / "a.safetensors",
                                {{"a", DType::kF32, {2}, x}, {"a", DType::kF32, {2}, x}})
                   .ok());
  EXPECT_FALSE(WriteSafetensors(dir / "b.safetensors", {{"", DType::kF32, {2}, x}}).ok());
  auto w = SafetensorsWriter::Create(dir / "c.safetensors",
                                     {{"a", DType::kF32, {2}}, {"b", DType::kF32, {1}}});
  ASSERT_TRUE(w.ok());
  EXPECT_FALSE((*w)->WriteNext(x, 4).ok());  // wrong size
  ASSERT_TRUE((*w)->WriteNext(x, 8).ok());
  EXPECT_FALSE((*w)->Finish().ok());  // "b" not written
  // Nothing is left under the final name after a failed write.
  w->reset();
  EXPECT_FALSE(std::filesystem::exists(dir / "c.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir / "c.safetensors.tmp"));
}

}  // namespace
}  // namespace dn::worker
