#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "comm/store.h"
#include "tests/comm/rank_launcher.h"

namespace dn::comm {
namespace {

using std::chrono::milliseconds;
using testing::TempDir;

std::vector<char> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

TEST(FileStoreTest, SetThenGet) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_TRUE((*store)->Set("pg/0", Bytes("hello")).ok());
  std::vector<char> binary = {'\0', '\x01', '\xff', '/', '%'};
  ASSERT_TRUE((*store)->Set("weird key/%2F..", binary).ok());
  auto v = (*store)->Get("pg/0", milliseconds(100));
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, Bytes("hello"));
  auto w = (*store)->Get("weird key/%2F..", milliseconds(100));
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(*w, binary);
  // Distinct keys stay distinct after encoding.
  auto missing = (*store)->Get("pg%2F0", milliseconds(10));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kDeadlineExceeded);
  // An empty value is a value.
  ASSERT_TRUE((*store)->Set("empty", {}).ok());
  auto e = (*store)->Get("empty", milliseconds(10));
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->empty());
}

TEST(FileStoreTest, GetTimesOutNamingTheKey) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok());
  auto v = (*store)->Get("group7/rank3", milliseconds(50));
  ASSERT_EQ(v.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(v.status().message().find("group7/rank3"), std::string::npos)
      << v.status();
}

TEST(FileStoreTest, GetWaitsForALaterSetFromAnotherStore) {
  TempDir dir;
  auto reader = MakeFileStore(dir.path());
  auto writer = MakeFileStore(dir.path() + "/");  // same folder, other object
  ASSERT_TRUE(reader.ok() && writer.ok());
  std::thread t([&] {
    std::this_thread::sleep_for(milliseconds(100));
    ASSERT_TRUE((*writer)->Set("late", Bytes("value")).ok());
  });
  auto v = (*reader)->Get("late", milliseconds(10000));
  t.join();
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, Bytes("value"));
}

TEST(FileStoreTest, LargeValueIsReadWhole) {
  TempDir dir;
  auto store = MakeFileStore(dir.path());
  ASSERT_TRUE(store.ok());
  std::vector<char> big(1 << 20);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  ASSERT_TRUE((*store)->Set("big", big).ok());
  auto v = (*store)->Get("big", milliseconds(100));
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, big);
}

TEST(FileStoreTest, CreatesNestedFolderAndRejectsAFile) {
  TempDir dir;
  auto nested = MakeFileStore(dir.path() + "/a/b/c");
  ASSERT_TRUE(nested.ok()) << nested.status();
  EXPECT_TRUE(std::filesystem::is_directory(dir.path() + "/a/b/c"));
  ASSERT_TRUE((*nested)->Set("k", Bytes("v")).ok());
  // Only the value file stays behind: temporary files are renamed away.
  int files = 0;
  for (const auto& entry :
       std::filesystem::directory_iterator(dir.path() + "/a/b/c")) {
    (void)entry;
    ++files;
  }
  EXPECT_EQ(files, 1);
  // A path through a regular file cannot be a store.
  auto bad = MakeFileStore(dir.path() + "/a/b/c/k");
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(MakeFileStore("").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dn::comm
