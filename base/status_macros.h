// File: base/status_macros.h
//
// The project's error-propagation macros, shaped like absl's 2026 status
// macros (which Debian's absl 20220623 lacks). Every module boundary passes
// absl::Status / absl::StatusOr; nothing throws across modules.
//
//   DN_RETURN_IF_ERROR(DoThing());
//   DN_ASSIGN_OR_RETURN(auto value, MakeValue());
//   DN_ASSIGN_OR_RETURN(existing_var, MakeValue());
#ifndef DN_BASE_STATUS_MACROS_H_
#define DN_BASE_STATUS_MACROS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DN_STATUS_CONCAT_INNER_(a, b) a##b
#define DN_STATUS_CONCAT_(a, b) DN_STATUS_CONCAT_INNER_(a, b)

// Evaluates `expr` (an absl::Status); returns it from the enclosing function
// when it is not OK.
#define DN_RETURN_IF_ERROR(expr)                                  \
  do {                                                            \
    ::absl::Status dn_status_ = (expr);                           \
    if (!dn_status_.ok()) return dn_status_;                      \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); on error returns its status,
// otherwise moves the value into `lhs` (a declaration or an lvalue).
#define DN_ASSIGN_OR_RETURN(lhs, rexpr) \
  DN_ASSIGN_OR_RETURN_IMPL_(DN_STATUS_CONCAT_(dn_statusor_, __LINE__), lhs, rexpr)

#define DN_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                              \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // DN_BASE_STATUS_MACROS_H_
