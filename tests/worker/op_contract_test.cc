// The op contract shared by the backends (worker/op_contract.h): each rule
// accepts what the model passes and rejects a violation with a message that
// names the op and the tensor or argument. Checked for the CPU flavour (f32
// in host memory) and the CUDA flavour (bf16 in CUDA memory; the tensors are
// only labelled CUDA, the contract never reads their data).
#include "worker/op_contract.h"

#include <algorithm>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dn::worker {
namespace {

using ::testing::HasSubstr;

struct Flavour {
  const char* backend;
  Device device;
  DType compute;
};
void PrintTo(const Flavour& f, std::ostream* os) { *os << f.backend; }

class OpContractTest : public ::testing::TestWithParam<Flavour> {
 protected:
  OpContractTest()
      : c_(GetParam().backend, GetParam().device, GetParam().compute) {}
  // A tensor of the backend's memory: activations in the compute dtype.
  Tensor Act(Shape shape) const { return Make(std::move(shape), GetParam().compute); }
  Tensor F32(Shape shape) const { return Make(std::move(shape), DType::kF32); }
  Tensor Make(Shape shape, DType dtype) const {
    const size_t bytes =
        std::max<size_t>(1, static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype));
    std::shared_ptr<void> storage(new char[bytes], [](void* p) { delete[] static_cast<char*>(p); });
    return Tensor(std::move(storage), 0, GetParam().device, dtype, std::move(shape));
  }
  // The error says which backend, op and tensor/argument.
  void ExpectNames(const absl::Status& st, const std::string& op, const std::string& what,
                   absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
    EXPECT_EQ(st.code(), code) << st;
    EXPECT_THAT(std::string(st.message()),
                HasSubstr(std::string(GetParam().backend) + " " + op + ": "))
        << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(what)) << st;
  }

  OpContract c_;
};

TEST_P(OpContractTest, ResidencyAndDtypeNameTheTensor) {
  EXPECT_TRUE(c_.Resident(Act({2}), "Copy", "src").ok());
  ExpectNames(c_.Resident(Tensor(), "CopyToHost", "src"), "CopyToHost", "'src' is undefined");
  // A tensor of the other device.
  const Device other = GetParam().device == Device::kCpu ? Device::kCuda : Device::kCpu;
  std::shared_ptr<void> storage(new char[8], [](void* p) { delete[] static_cast<char*>(p); });
  const Tensor elsewhere(storage, 0, other, GetParam().compute, {2});
  ExpectNames(c_.Resident(elsewhere, "FillNormal", "dst"), "FillNormal",
              GetParam().device == Device::kCpu ? "not in host memory" : "not in CUDA memory");
  // Activations in another dtype: the message says what the backend computes in.
  const DType wrong = GetParam().compute == DType::kF32 ? DType::kBF16 : DType::kF32;
  const absl::Status st = c_.Silu(Make({4}, wrong), Act({4}));
  ExpectNames(st, "Silu", "tensor 'x'");
  EXPECT_THAT(std::string(st.message()),
              HasSubstr(std::string("computes in ") + DTypeName(GetParam().compute)));
  EXPECT_TRUE(c_.Copy(Act({2, 3}), F32({6})).ok());
  ExpectNames(c_.Copy(Act({2, 3}), F32({5})), "Copy", "'dst' has shape [5], expected 6 elements");
}

TEST_P(OpContractTest, Linear) {
  const Tensor w = Act({8, 4}), bias = Act({8});
  EXPECT_TRUE(c_.Linear(Act({2, 3, 4}), w, &bias, Act({2, 3, 8})).ok());
  EXPECT_TRUE(c_.Linear(Act({6, 4}), w, nullptr, Act({6, 8})).ok());
  ExpectNames(c_.Linear(Act({6, 5}), w, nullptr, Act({6, 8})), "Linear", "'x'");
  ExpectNames(c_.Linear(Act({6, 4}), Act({8, 4, 1}), nullptr, Act({6, 8})), "Linear", "'w'");
  ExpectNames(c_.Linear(Act({6, 4}), w, nullptr, Act({5, 8})), "Linear", "'y'");
  const Tensor short_bias = Act({7});
  ExpectNames(c_.Linear(Act({6, 4}), w, &short_bias, Act({6, 8})), "Linear", "'bias'");
  const Tensor f32_bias = F32({8});
  if (GetParam().compute != DType::kF32)
    ExpectNames(c_.Linear(Act({6, 4}), w, &f32_bias, Act({6, 8})), "Linear", "'bias'");
  // K = 0 is a shape, not a division by zero.
  EXPECT_TRUE(c_.Linear(Act({0, 0}), Act({8, 0}), nullptr, Act({0, 8})).ok());
}

TEST_P(OpContractTest, ModulationAndNorms) {
  // AddModulation: per-row projection [B, k*D] or broadcast [B, D].
  EXPECT_TRUE(c_.AddModulation(F32({6, 16}), Act({2, 96}), F32({2, 6, 16})).ok());
  EXPECT_TRUE(c_.AddModulation(F32({6, 16}), Act({2, 16}), F32({2, 6, 16})).ok());
  ExpectNames(c_.AddModulation(F32({6, 16}), Act({2, 17}), F32({2, 6, 16})),
              "AddModulation", "'proj'");
  ExpectNames(c_.AddModulation(F32({5, 16}), Act({2, 16}), F32({2, 6, 16})),
              "AddModulation", "'table'");
  // LayerNormModulate: every index inside the table's k rows (the CUDA
  // kernel would read past the table otherwise).
  const Tensor x = Act({2, 10, 16}), mod = F32({2, 6, 16});
  EXPECT_TRUE(c_.LayerNormModulate(x, mod, 0, 1, Act({2, 10, 16})).ok());
  ExpectNames(c_.LayerNormModulate(x, mod, 6, 1, Act({2, 10, 16})), "LayerNormModulate",
              "shift_index 6 outside the 6 rows of mod");
  ExpectNames(c_.LayerNormModulate(x, mod, 0, -1, Act({2, 10, 16})), "LayerNormModulate",
              "scale_index -1");
  ExpectNames(c_.LayerNormModulate(x, F32({2, 6, 15}), 0, 1, Act({2, 10, 16})),
              "LayerNormModulate", "'mod'");
  ExpectNames(c_.LayerNormModulate(x, mod, 0, 1, Act({2, 10, 15})), "LayerNormModulate", "'y'");
  // GatedResidual: the same for the gate row.
  EXPECT_TRUE(c_.GatedResidual(x, Act({2, 10, 16}), mod, 5).ok());
  ExpectNames(c_.GatedResidual(x, Act({2, 10, 16}), mod, 6), "GatedResidual",
              "gate_index 6 outside");
  ExpectNames(c_.GatedResidual(x, Act({2, 10, 15}), mod, 2), "GatedResidual", "'y'");
  // LayerNormAffine / RmsNorm: f32 weights of D.
  EXPECT_TRUE(c_.LayerNormAffine(Act({5, 16}), F32({16}), F32({16}), Act({5, 16})).ok());
  ExpectNames(c_.LayerNormAffine(Act({5, 16}), F32({16}), F32({8}), Act({5, 16})),
              "LayerNormAffine", "'bias'");
  EXPECT_TRUE(c_.RmsNorm(Act({5, 16}), F32({16}), Act({5, 16})).ok());
  ExpectNames(c_.RmsNorm(Act({5, 16}), Make({16}, DType::kBF16), Act({5, 16})), "RmsNorm",
              "'weight'");
  EXPECT_TRUE(c_.AddInPlace(Act({3, 4}), Act({12})).ok());
  ExpectNames(c_.AddInPlace(Act({3, 4}), Act({11})), "AddInPlace", "'y'");
}

TEST_P(OpContractTest, RopeAndAttention) {
  // D 16 = 2 heads of 8 (4 RoPE pairs); rope [S, 4, 2].
  const Tensor x = Act({1, 6, 16});
  EXPECT_TRUE(c_.RmsNormRope(x, F32({16}), F32({6, 4, 2}), 2, Act({1, 6, 16})).ok());
  ExpectNames(c_.RmsNormRope(x, F32({16}), F32({6, 4, 2}), 3, Act({1, 6, 16})), "RmsNormRope",
              "heads 3 must divide D 16");
  ExpectNames(c_.RmsNormRope(Act({1, 6, 18}), F32({18}), F32({6, 1, 2}), 6, Act({1, 6, 18})),
              "RmsNormRope", "even head dims");
  ExpectNames(c_.RmsNormRope(x, F32({16}), F32({5, 4, 2}), 2, Act({1, 6, 16})), "RmsNormRope",
              "'rope'");
  // Attention: q [B, Sq, H, d], k/v [B, Skv, H, d], kv_len in [1, Skv].
  const Tensor q = Act({1, 6, 2, 8}), k = Act({1, 9, 2, 8});
  EXPECT_TRUE(c_.Attention(q, k, Act({1, 9, 2, 8}), 9, Act({1, 6, 2, 8})).ok());
  EXPECT_TRUE(c_.Attention(q, k, Act({1, 9, 2, 8}), 1, Act({1, 6, 2, 8})).ok());
  ExpectNames(c_.Attention(q, k, Act({1, 9, 2, 8}), 10, Act({1, 6, 2, 8})), "Attention",
              "kv_len 10 outside [1, 9]");
  ExpectNames(c_.Attention(q, k, Act({1, 9, 2, 8}), 0, Act({1, 6, 2, 8})), "Attention",
              "kv_len 0");
  ExpectNames(c_.Attention(q, Act({1, 9, 3, 8}), Act({1, 9, 3, 8}), 9, Act({1, 6, 2, 8})),
              "Attention", "'k'");
  ExpectNames(c_.Attention(q, k, Act({1, 8, 2, 8}), 8, Act({1, 6, 2, 8})), "Attention", "'v'");
  ExpectNames(c_.Attention(q, k, Act({1, 9, 2, 8}), 9, Act({1, 6, 2, 7})), "Attention", "'o'");
}

TEST_P(OpContractTest, UlyssesRelayouts) {
  // 4 heads of 8 on 2 ranks, shard S = 5.
  const Tensor seq = Act({1, 5, 4, 8}), head = Act({1, 10, 2, 8});
  EXPECT_TRUE(c_.PackQkv(seq, seq, seq, 2, Act({2, 3, 1, 5, 2, 8})).ok());
  EXPECT_TRUE(c_.UnpackQkv(Act({2, 3, 1, 5, 2, 8}), 2, head, head, head).ok());
  EXPECT_TRUE(c_.PackOut(head, 2, Act({2, 1, 5, 2, 8})).ok());
  EXPECT_TRUE(c_.UnpackOut(Act({2, 1, 5, 2, 8}), 2, seq).ok());
  // Heads that do not divide by the world size (FAILED_PRECONDITION, as the
  // Ulysses layout says).
  ExpectNames(c_.PackQkv(seq, seq, seq, 3, Act({3, 3, 1, 5, 1, 8})), "PackQkv",
              "not divisible by the world size", absl::StatusCode::kFailedPrecondition);
  ExpectNames(c_.PackQkv(seq, Act({1, 5, 4, 7}), seq, 2, Act({2, 3, 1, 5, 2, 8})), "PackQkv",
              "'k'");
  ExpectNames(c_.PackQkv(seq, seq, seq, 2, Act({2, 3, 1, 5, 2, 7})), "PackQkv", "'send'");
  ExpectNames(c_.UnpackQkv(Act({2, 3, 1, 5, 2, 8}), 2, Act({1, 9, 2, 8}), head, head),
              "UnpackQkv", "[B, P*S, h, d] with P = 2");
  ExpectNames(c_.UnpackQkv(Act({2, 3, 1, 5, 2, 8}), 0, head, head, head), "UnpackQkv", "'q'");
  ExpectNames(c_.PackOut(head, 2, Act({2, 1, 5, 2, 7})), "PackOut", "'send'");
  ExpectNames(c_.UnpackOut(Act({2, 1, 5, 2, 8}), 2, Act({1, 5, 4})), "UnpackOut", "'o'");
  // The fused q/k pack: the RmsNormRope rules and the PackQkv layout at once.
  const Tensor q = Act({1, 5, 32});
  EXPECT_TRUE(c_.RmsNormRopePackQkv(q, q, q, F32({32}), F32({32}), F32({5, 4, 2}), 4, 2,
                                    Act({2, 3, 1, 5, 2, 8}))
                  .ok());
  EXPECT_TRUE(c_.RmsNormRopePackQkv(q, q, q, F32({32}), F32({32}), F32({5, 4, 2}), 4, 1,
                                    Act({1, 3, 1, 5, 4, 8}))
                  .ok());
  ExpectNames(c_.RmsNormRopePackQkv(q, q, q, F32({32}), F32({32}), F32({5, 4, 2}), 4, 3,
                                    Act({3, 3, 1, 5, 1, 8})),
              "RmsNormRopePackQkv", "world size", absl::StatusCode::kFailedPrecondition);
  ExpectNames(c_.RmsNormRopePackQkv(q, q, q, F32({32}), F32({31}), F32({5, 4, 2}), 4, 2,
                                    Act({2, 3, 1, 5, 2, 8})),
              "RmsNormRopePackQkv", "'k_weight'");
  ExpectNames(c_.RmsNormRopePackQkv(q, q, Act({1, 5, 31}), F32({32}), F32({32}),
                                    F32({5, 4, 2}), 4, 2, Act({2, 3, 1, 5, 2, 8})),
              "RmsNormRopePackQkv", "'v'");
  ExpectNames(c_.RmsNormRopePackQkv(q, q, q, F32({32}), F32({32}), F32({5, 4, 2}), 4, 2,
                                    Act({2, 3, 1, 5, 2, 9})),
              "RmsNormRopePackQkv", "'send'");
}

INSTANTIATE_TEST_SUITE_P(Backends, OpContractTest,
                         ::testing::Values(Flavour{"cpu", Device::kCpu, DType::kF32},
                                           Flavour{"cuda", Device::kCuda, DType::kBF16}),
                         [](const ::testing::TestParamInfo<Flavour>& info) {
                           return std::string(info.param.backend);
                         });

}  // namespace
}  // namespace dn::worker
