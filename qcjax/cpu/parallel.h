// How qcjax's CPU kernels (matmul.cc, attention.cc) share work out over XLA's intra-op threads.
//
// Items [0, n) are claimed from a shared counter by the calling thread and by helper tasks on XLA's pool. The
// caller never waits for an item nobody has started: it takes every unclaimed item itself, then waits only for items
// another thread is running. So nothing deadlocks when every pool thread is busy (helpers that start late find no work
// and return), and the shared state lives as long as the last helper holding it.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace qcjax {

// Runs worker(i) for every i in [0, items), where each participating thread gets its own worker from make(): a
// callable that may hold that thread's scratch buffers. An exception in make() or a worker (an allocation failure)
// skips the items not yet started and comes back as an Internal error naming `what`; nothing unwinds into XLA. It returns only
// when every item has ended, so the outputs are whole (or the error says they are not).
template <typename Make>
xla::ffi::Error parallel_for(xla::ffi::ThreadPool pool, int64_t items, const char* what, Make make) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::string message;  // the first failure's, written before its item counts as done
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, items, make]() {
    std::optional<decltype(make())> worker;  // made on this thread's first item: a helper that finds none makes none
    for (int64_t i; (i = shared->next.fetch_add(1)) < items;) {
      try {
        if (!shared->failed.load(std::memory_order_relaxed)) {
          if (!worker) worker.emplace(make());
          (*worker)(i);
        }
      } catch (const std::exception& e) {
        if (!shared->failed.exchange(true)) {
          try {
            shared->message = e.what();
          } catch (...) {  // no memory for the message either: it stays empty
          }
        }
      }
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  try {
    for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule(decltype(drain)(drain));  // Schedule owns
  } catch (const std::exception&) {  // fewer helpers: the caller takes what they would have
  }
  drain();
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
  if (shared->failed.load()) return xla::ffi::Error::Internal(std::string(what) + ": a work item failed: " + shared->message);
  return xla::ffi::Error::Success();
}

}  // namespace qcjax
