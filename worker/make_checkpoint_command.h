// File: worker/make_checkpoint_command.h
//
// `denoised make-checkpoint`: writes a diffusers-layout checkpoint folder of
// a preset architecture with seeded random weights (the same numbers
// MakePresetWeights gives), for tests, demos and benchmarks without a real
// model download.
#ifndef DN_WORKER_MAKE_CHECKPOINT_COMMAND_H_
#define DN_WORKER_MAKE_CHECKPOINT_COMMAND_H_

namespace dn::worker {

// argv[0] is "make-checkpoint". Returns the process exit code.
int MakeCheckpointCommand(int argc, char** argv);

}  // namespace dn::worker

#endif  // DN_WORKER_MAKE_CHECKPOINT_COMMAND_H_
