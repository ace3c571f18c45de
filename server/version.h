// File: server/version.h
#ifndef DN_SERVER_VERSION_H_
#define DN_SERVER_VERSION_H_

namespace dn {
// The server version string, e.g. "0.1.0".
const char* Version();
}  // namespace dn

#endif  // DN_SERVER_VERSION_H_
