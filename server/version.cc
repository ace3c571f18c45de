#include "server/version.h"

namespace dn {
const char* Version() { return DENOISED_VERSION; }
}  // namespace dn
