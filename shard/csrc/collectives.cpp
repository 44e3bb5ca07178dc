// A small C API over libtorch's c10d: a TCPStore rendezvous and a process group
// (Gloo on CPU; NCCL on CUDA when built with TESSERA_NCCL), with the collectives the
// tensor-parallel engine needs. Tensors come from tch as `at::Tensor*`. Every function
// catches C++ exceptions and reports them through `err` (never unwinds into Rust).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef TESSERA_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <ATen/ATen.h>

#include "guarded.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

struct tessera_group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

namespace {

using tessera::guarded;

bool is_loopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "::1";
}

}  // namespace

extern "C" {

// Joins the group: rank 0 hosts the TCPStore at host:port, every rank connects to it,
// then the process group is created. Blocks until all `world` ranks arrive or
// `timeout_ms` passes. Returns null on failure with the reason in `err`.
tessera_group* tessera_group_new(const char* host, uint16_t port, int rank, int world,
                                 int64_t timeout_ms, int nccl, char* err, size_t err_len) {
  tessera_group* group = nullptr;
  guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = rank == 0;
    options.numWorkers = static_cast<size_t>(world);
    options.waitWorkers = true;
    options.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>("tessera", store);
    c10::intrusive_ptr<c10d::Backend> backend;
    if (nccl != 0) {
#ifdef TESSERA_NCCL
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, world, nccl_options);
#else
      throw std::runtime_error("this build has no NCCL (build with the cuda feature)");
#endif
    } else {
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* interface = std::getenv("GLOO_SOCKET_IFNAME");
      if (interface != nullptr && *interface != '\0') {
        gloo_options->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForInterface(interface));
      } else if (is_loopback(host)) {
        gloo_options->devices.push_back(
            c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, world, gloo_options);
    }
    group = new tessera_group{store, backend, timeout};
  });
  return group;
}

void tessera_group_free(tessera_group* group) { delete group; }

// In place: `tensor` becomes the sum over all ranks.
int tessera_all_reduce_sum(tessera_group* group, at::Tensor* tensor, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = group->timeout;
    group->backend->allreduce(tensors, options)->wait(group->timeout);
  });
}

// Every rank's `input` (same shape everywhere), concatenated along `dim` in rank order,
// as a new tensor in `*output`.
int tessera_all_gather(tessera_group* group, at::Tensor* input, int64_t dim, at::Tensor** output,
                       char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> inputs{*input};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int i = 0; i < group->backend->getSize(); ++i) {
      outputs[0].push_back(at::empty_like(*input));
    }
    c10d::AllgatherOptions options;
    options.timeout = group->timeout;
    group->backend->allgather(outputs, inputs, options)->wait(group->timeout);
    *output = new at::Tensor(at::cat(outputs[0], dim));
  });
}

// In place: every rank's `tensor` becomes rank `root`'s.
int tessera_broadcast(tessera_group* group, at::Tensor* tensor, int root, char* err,
                      size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = group->timeout;
    group->backend->broadcast(tensors, options)->wait(group->timeout);
  });
}

int tessera_barrier(tessera_group* group, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::BarrierOptions options;
    options.timeout = group->timeout;
    group->backend->barrier(options)->wait(group->timeout);
  });
}

}  // extern "C"
