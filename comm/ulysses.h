// File: comm/ulysses.h
//
// Ulysses sequence parallelism on top of ProcessGroup::AllToAll.
//
// The token sequence of length L is split into P contiguous shards of
// S = ceil(L / P) tokens; rank r owns tokens [r*S, min((r+1)*S, L)). When L
// does not divide by P, the last shard(s) are padded up to S rows: padded rows
// travel through the all-to-all like real ones, sit at the end of the gathered
// sequence (rows [L, P*S)), are excluded from attention as keys (kv_len = L),
// and their outputs are dropped. So results equal the unsharded ones.
//
// Layouts (row-major, elem_size bytes per element, h = H/P heads per rank):
//   sequence-sharded  q/k/v/o : [B, S, H, d]
//   head-sharded      q/k/v/o : [B, P*S, h, d]      (rank r: heads [r*h,(r+1)*h))
//   QKV send/recv buffer      : [P, 3, B, S, h, d]  (destination/source-major;
//                                q, k, v packed so one collective moves all 3)
//   output send/recv buffer   : [P, B, S, h, d]
#ifndef DN_COMM_ULYSSES_H_
#define DN_COMM_ULYSSES_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/process_group.h"

namespace dn::comm {

struct UlyssesLayout {
  int64_t batch = 1;
  int64_t seq_total = 0;  // L, global tokens
  int world = 1;          // P
  int heads = 1;          // H
  int head_dim = 1;       // d
  size_t elem_size = 4;

  // FAILED_PRECONDITION naming heads and world when H % P != 0;
  // INVALID_ARGUMENT for non-positive sizes.
  absl::Status Validate() const;
  int64_t shard() const { return (seq_total + world - 1) / world; }  // S
  int heads_per_rank() const { return heads / world; }               // h
  // Real (unpadded) tokens of rank r: [shard_begin(r), shard_begin(r)+shard_len(r)).
  int64_t shard_begin(int r) const;
  int64_t shard_len(int r) const;
  // Bytes of one peer block of the QKV and output buffers.
  size_t qkv_block_bytes() const;
  size_t out_block_bytes() const;
  // Elements of one [B, S, H, d] tensor, and of one [B, P*S, h, d] tensor.
  int64_t seq_sharded_elems() const;
  int64_t head_sharded_elems() const;
};

// Host-memory relayouts (the CPU backend uses these; CUDA has kernels).
void PackQkvHost(const UlyssesLayout& l, const void* q, const void* k,
                 const void* v, void* send);
void UnpackQkvHost(const UlyssesLayout& l, const void* recv, void* q, void* k,
                   void* v);
void PackOutHost(const UlyssesLayout& l, const void* o, void* send);
void UnpackOutHost(const UlyssesLayout& l, const void* recv, void* o);

// The full exchange for a host-memory group, with buffers preallocated once
// per layout (no allocation per call).
class UlyssesExchange {
 public:
  static absl::StatusOr<std::unique_ptr<UlyssesExchange>> Create(
      ProcessGroup& group, const UlyssesLayout& layout);

  const UlyssesLayout& layout() const { return layout_; }
  // q,k,v [B,S,H,d] -> q_out,k_out,v_out [B,P*S,h,d], one all-to-all.
  absl::Status SeqToHead(const void* q, const void* k, const void* v,
                         void* q_out, void* k_out, void* v_out);
  // o [B,P*S,h,d] -> o_out [B,S,H,d], one all-to-all.
  absl::Status HeadToSeq(const void* o, void* o_out);

 private:
  UlyssesExchange(ProcessGroup& group, const UlyssesLayout& layout);
  ProcessGroup& group_;
  UlyssesLayout layout_;
  std::unique_ptr<char[]> send_;
  std::unique_ptr<char[]> recv_;
};

}  // namespace dn::comm

#endif  // DN_COMM_ULYSSES_H_
