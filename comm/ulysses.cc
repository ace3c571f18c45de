// Ulysses layouts, host relayouts and the host exchange. See comm/ulysses.h
// for the layouts. Every relayout moves contiguous runs of h*d elements (one
// token's heads for one peer), so it is a sequence of memcpy calls.
#include "comm/ulysses.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace dn::comm {

absl::Status UlyssesLayout::Validate() const {
  if (batch <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("ulysses: batch must be positive, got ", batch));
  if (seq_total <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("ulysses: seq_total must be positive, got ", seq_total));
  if (world <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("ulysses: world must be positive, got ", world));
  if (heads <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("ulysses: heads must be positive, got ", heads));
  if (head_dim <= 0)
    return absl::InvalidArgumentError(
        absl::StrCat("ulysses: head_dim must be positive, got ", head_dim));
  if (elem_size == 0)
    return absl::InvalidArgumentError("ulysses: elem_size must be positive");
  if (heads % world != 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "ulysses: heads (", heads, ") is not divisible by the world size (",
        world, "); Ulysses needs heads % world == 0"));
  return absl::OkStatus();
}

int64_t UlyssesLayout::shard_begin(int r) const {
  return std::min<int64_t>(static_cast<int64_t>(r) * shard(), seq_total);
}

int64_t UlyssesLayout::shard_len(int r) const {
  const int64_t begin = static_cast<int64_t>(r) * shard();
  return std::clamp<int64_t>(seq_total - begin, 0, shard());
}

size_t UlyssesLayout::qkv_block_bytes() const { return 3 * out_block_bytes(); }

size_t UlyssesLayout::out_block_bytes() const {
  return static_cast<size_t>(batch) * static_cast<size_t>(shard()) *
         static_cast<size_t>(heads_per_rank()) *
         static_cast<size_t>(head_dim) * elem_size;
}

int64_t UlyssesLayout::seq_sharded_elems() const {
  return batch * shard() * heads * head_dim;
}

int64_t UlyssesLayout::head_sharded_elems() const {
  return batch * world * shard() * heads_per_rank() * head_dim;
}

namespace {

// Geometry shared by the relayouts, in bytes.
struct Geometry {
  explicit Geometry(const UlyssesLayout& l)
      : P(l.world),
        B(l.batch),
        S(l.shard()),
        run(static_cast<size_t>(l.heads_per_rank()) *
            static_cast<size_t>(l.head_dim) * l.elem_size),
        token(static_cast<size_t>(l.heads) * static_cast<size_t>(l.head_dim) *
              l.elem_size) {}
  int P;
  int64_t B, S;
  size_t run;    // h*d elements: one token, one peer's heads
  size_t token;  // H*d elements: one token, all heads
};

// seq-sharded [B,S,H,d] <-> peer blocks [P, B,S,h,d] (the block of peer p
// holds heads [p*h, (p+1)*h)). `block_stride` is the distance between peer
// blocks, `block_offset` where this tensor sits inside each block.
void SeqToBlocks(const Geometry& g, const char* x, char* buf,
                 size_t block_stride, size_t block_offset) {
  for (int p = 0; p < g.P; ++p) {
    char* dst = buf + static_cast<size_t>(p) * block_stride + block_offset;
    const char* src = x + static_cast<size_t>(p) * g.run;
    for (int64_t bs = 0; bs < g.B * g.S; ++bs) {
      std::memcpy(dst + static_cast<size_t>(bs) * g.run,
                  src + static_cast<size_t>(bs) * g.token, g.run);
    }
  }
}

void BlocksToSeq(const Geometry& g, const char* buf, size_t block_stride,
                 size_t block_offset, char* x) {
  for (int p = 0; p < g.P; ++p) {
    const char* src =
        buf + static_cast<size_t>(p) * block_stride + block_offset;
    char* dst = x + static_cast<size_t>(p) * g.run;
    for (int64_t bs = 0; bs < g.B * g.S; ++bs) {
      std::memcpy(dst + static_cast<size_t>(bs) * g.token,
                  src + static_cast<size_t>(bs) * g.run, g.run);
    }
  }
}

// head-sharded [B,P*S,h,d] <-> peer blocks [P, B,S,h,d] (the block of peer p
// holds sequence rows [p*S, (p+1)*S)).
void HeadToBlocks(const Geometry& g, const char* y, char* buf,
                  size_t block_stride, size_t block_offset) {
  const size_t rows = static_cast<size_t>(g.S) * g.run;  // S rows of one peer
  for (int p = 0; p < g.P; ++p) {
    char* dst = buf + static_cast<size_t>(p) * block_stride + block_offset;
    for (int64_t b = 0; b < g.B; ++b) {
      const char* src = y + (static_cast<size_t>(b) * g.P + p) * rows;
      std::memcpy(dst + static_cast<size_t>(b) * rows, src, rows);
    }
  }
}

void BlocksToHead(const Geometry& g, const char* buf, size_t block_stride,
                  size_t block_offset, char* y) {
  const size_t rows = static_cast<size_t>(g.S) * g.run;
  for (int p = 0; p < g.P; ++p) {
    const char* src =
        buf + static_cast<size_t>(p) * block_stride + block_offset;
    for (int64_t b = 0; b < g.B; ++b) {
      char* dst = y + (static_cast<size_t>(b) * g.P + p) * rows;
      std::memcpy(dst, src + static_cast<size_t>(b) * rows, rows);
    }
  }
}

}  // namespace

void PackQkvHost(const UlyssesLayout& l, const void* q, const void* k,
                 const void* v, void* send) {
  const Geometry g(l);
  const size_t tensor = l.out_block_bytes();  // one of q/k/v in a block
  const size_t block = l.qkv_block_bytes();
  char* buf = static_cast<char*>(send);
  SeqToBlocks(g, static_cast<const char*>(q), buf, block, 0);
  SeqToBlocks(g, static_cast<const char*>(k), buf, block, tensor);
  SeqToBlocks(g, static_cast<const char*>(v), buf, block, 2 * tensor);
}

void UnpackQkvHost(const UlyssesLayout& l, const void* recv, void* q, void* k,
                   void* v) {
  const Geometry g(l);
  const size_t tensor = l.out_block_bytes();
  const size_t block = l.qkv_block_bytes();
  const char* buf = static_cast<const char*>(recv);
  BlocksToHead(g, buf, block, 0, static_cast<char*>(q));
  BlocksToHead(g, buf, block, tensor, static_cast<char*>(k));
  BlocksToHead(g, buf, block, 2 * tensor, static_cast<char*>(v));
}

void PackOutHost(const UlyssesLayout& l, const void* o, void* send) {
  const Geometry g(l);
  HeadToBlocks(g, static_cast<const char*>(o), static_cast<char*>(send),
               l.out_block_bytes(), 0);
}

void UnpackOutHost(const UlyssesLayout& l, const void* recv, void* o) {
  const Geometry g(l);
  BlocksToSeq(g, static_cast<const char*>(recv), l.out_block_bytes(), 0,
              static_cast<char*>(o));
}

UlyssesExchange::UlyssesExchange(ProcessGroup& group,
                                 const UlyssesLayout& layout)
    : group_(group), layout_(layout) {}

absl::StatusOr<std::unique_ptr<UlyssesExchange>> UlyssesExchange::Create(
    ProcessGroup& group, const UlyssesLayout& layout) {
  DN_RETURN_IF_ERROR(layout.Validate());
  if (layout.world != group.size())
    return absl::InvalidArgumentError(absl::StrCat(
        "ulysses: layout world (", layout.world,
        ") differs from the process group size (", group.size(), ")"));
  if (group.memory() != MemoryKind::kHost)
    return absl::FailedPreconditionError(absl::StrCat(
        "ulysses: UlyssesExchange moves host memory, but the '",
        group.backend_name(), "' group works on device memory"));
  std::unique_ptr<UlyssesExchange> ex(new UlyssesExchange(group, layout));
  // The QKV buffers are the larger ones; the output exchange reuses them.
  const size_t bytes =
      layout.qkv_block_bytes() * static_cast<size_t>(layout.world);
  ex->send_ = std::make_unique_for_overwrite<char[]>(bytes);
  ex->recv_ = std::make_unique_for_overwrite<char[]>(bytes);
  return ex;
}

absl::Status UlyssesExchange::SeqToHead(const void* q, const void* k,
                                        const void* v, void* q_out,
                                        void* k_out, void* v_out) {
  PackQkvHost(layout_, q, k, v, send_.get());
  DN_RETURN_IF_ERROR(
      group_.AllToAll(send_.get(), recv_.get(), layout_.qkv_block_bytes()));
  UnpackQkvHost(layout_, recv_.get(), q_out, k_out, v_out);
  return absl::OkStatus();
}

absl::Status UlyssesExchange::HeadToSeq(const void* o, void* o_out) {
  PackOutHost(layout_, o, send_.get());
  DN_RETURN_IF_ERROR(
      group_.AllToAll(send_.get(), recv_.get(), layout_.out_block_bytes()));
  UnpackOutHost(layout_, recv_.get(), o_out);
  return absl::OkStatus();
}

}  // namespace dn::comm
