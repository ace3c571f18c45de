// File: server/demo.h
//
// `denoised demo`: the whole service on one machine, as real processes of
// this binary: a coordinator on free 127.0.0.1 ports, one worker group of
// --ranks CPU ranks of the built-in "tiny" preset, one request sent through
// the C++ client with a progress bar, the result written as safetensors, a
// few metrics scraped from the coordinator and the ranks, then a clean
// shutdown (no orphan processes). It narrates each step for a new user.
#ifndef DN_SERVER_DEMO_H_
#define DN_SERVER_DEMO_H_

namespace dn::server {

// `denoised demo [--ranks 2] [--steps 20] [--keep-running] [--out-dir DIR]`.
int DemoMain(int argc, char** argv);

}  // namespace dn::server

#endif  // DN_SERVER_DEMO_H_
