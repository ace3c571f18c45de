// File: server/demo.h
//
// `denoised demo`: the whole service on one machine, as real processes of
// this binary: a coordinator on free 127.0.0.1 ports, one worker group of
// --ranks CPU ranks serving the demo model (tools/demo_model, a small
// pixel-space Wan2.1 trained on coloured shapes; found as server/demo_model.h
// says, or a random-weight stand-in with a warning when none is found), one
// request for --prompt (embedded through the model's prompt table) sent
// through the C++ client with a progress bar, the clip written as an
// animated GIF, a PNG contact sheet and safetensors, a few metrics scraped
// from the coordinator and the ranks, then a clean shutdown (no orphan
// processes). It narrates each step for a new user.
#ifndef DN_SERVER_DEMO_H_
#define DN_SERVER_DEMO_H_

namespace dn::server {

// `denoised demo [--prompt "red square moving right"] [--ranks 2]
// [--model DIR] [--steps 20] [--keep-running] [--out-dir DIR]`.
int DemoMain(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_DEMO_H_
