// File: worker/acceleration.h
//
// The fast tier of one request (issue 16 part 3): opt-in approximations that
// trade exactness for speed. The default (all off) is the exact path.
// Proto-free; the request rules check it and the engine applies it.
#ifndef DN_WORKER_ACCELERATION_H_
#define DN_WORKER_ACCELERATION_H_

namespace dn::worker {

struct Acceleration {
  // Self-attention through Backend::AttentionFp8 instead of Attention.
  bool attention_fp8 = false;
  // Step caching (First-Block-Cache): a step whose first block's residual
  // changed, relative to the last computed step, by less than this reuses the
  // cached residual of the other blocks. 0 = off (every step computed).
  double cache_threshold = 0;

  bool exact() const { return !attention_fp8 && cache_threshold <= 0; }
};

}  // namespace dn::worker

#endif  // DN_WORKER_ACCELERATION_H_
