// Runs a Rust callback over index ranges on libtorch's own intra-op thread pool
// (at::parallel_for, OpenMP in the CPU wheel), so that work written in Rust shares the
// threads that libtorch's operators use instead of competing with them for the cores.
#include <ATen/Parallel.h>

#include <cstdint>

extern "C" {

typedef void (*tessera_range_fn)(void* context, int64_t begin, int64_t end);

// Calls `fn(context, begin, end)` on disjoint ranges covering [0, n), each of at least
// `grain` indices where n allows. Returns 0, or 1 if libtorch threw (the callback itself
// must not unwind).
int tessera_parallel_for(int64_t n, int64_t grain, tessera_range_fn fn, void* context) {
  try {
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(context, begin, end); });
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
