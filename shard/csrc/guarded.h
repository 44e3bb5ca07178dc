// Error reporting shared by the C API of the shim: every exported function runs its
// body through `guarded`, which turns a C++ exception into a message in `err` and a
// non-zero status (nothing unwinds into Rust).
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdio>
#include <exception>

namespace tessera {

inline void report(char* err, size_t len, const char* message) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", message);
  }
}

template <typename F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    report(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    report(err, len, e.what());
  } catch (...) {
    report(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace tessera
