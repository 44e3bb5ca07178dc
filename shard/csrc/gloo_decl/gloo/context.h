// Declarations only; see README.md in this folder.
#pragma once

#include <chrono>

namespace gloo {

// Named by an inline member of ProcessGroupGloo that we never call.
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo
