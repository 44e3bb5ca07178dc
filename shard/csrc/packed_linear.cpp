// Linear layers on oneDNN weights packed once at load (the CPU wheel's `mkldnn::`
// operators, reached through the dispatcher since the wheel ships no header for them).
// A plain bf16 weight is re-laid out for AMX/AVX-512 inside every `linear` call; packing
// it once moves that work to load time. Tensors come from tch as `at::Tensor*`; every
// function catches C++ exceptions and reports them through `err`.
#include <ATen/ATen.h>

#include "guarded.h"
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <cstdio>
#include <exception>

namespace {

using tessera::guarded;

const c10::OperatorHandle& reorder_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_linear_weight", "");
  return op;
}

const c10::OperatorHandle& linear_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return op;
}

}  // namespace

extern "C" {

// Packs a `[out, in]` weight for inputs of about `batch` rows; stores a new tensor in
// `*out`.
int tessera_pack_linear_weight(const at::Tensor* weight, int64_t batch, at::Tensor** out,
                               char* err, size_t len) {
  return guarded(err, len, [&] {
    torch::jit::Stack stack;
    stack.emplace_back(*weight);
    stack.emplace_back(batch);
    reorder_op().callBoxed(&stack);
    *out = new at::Tensor(stack.at(0).toTensor());
  });
}

// `x @ packed^T` for a `[rows, in]` input; stores a new `[rows, out]` tensor in `*out`.
int tessera_packed_linear(const at::Tensor* x, const at::Tensor* packed, at::Tensor** out,
                          char* err, size_t len) {
  return guarded(err, len, [&] {
    torch::jit::Stack stack;
    stack.emplace_back(*x);
    stack.emplace_back(*packed);
    stack.emplace_back(c10::IValue());
    stack.emplace_back(std::string("none"));
    stack.emplace_back(c10::List<std::optional<at::Scalar>>());
    stack.emplace_back(c10::IValue());
    linear_op().callBoxed(&stack);
    *out = new at::Tensor(stack.at(0).toTensor());
  });
}

}  // extern "C"
