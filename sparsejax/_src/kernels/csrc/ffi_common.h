// Copyright 2026 The sparsejax Authors. Licensed under the Apache License 2.0.
//
// Shared by the native XLA FFI extensions (condensed_ffi.cc, sparse_train_ffi.cc,
// select_ffi.cc): the work-claiming parallel loop on XLA's intra-op pool, and the
// `registrations()` dict each Python module hands to jax.ffi.register_ffi_target.
// Include after <Python.h> and "xla/ffi/api/ffi.h".

#ifndef SPARSEJAX_FFI_COMMON_H_
#define SPARSEJAX_FFI_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <thread>
#include <utility>

namespace sparsejax_ffi {

// Shared between the caller and helper tasks; helpers keep it alive.
struct WorkState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n_items = 0;
  std::function<void(int64_t)> fn;
};

inline void RunItems(WorkState& s) {
  for (;;) {
    const int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= s.n_items) return;
    s.fn(i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs fn(0 .. n_items-1) on the caller and up to n_threads - 1 helpers scheduled on
// XLA's intra-op pool. Items are claimed from an atomic counter, so the caller never
// waits for an item nobody claimed (no deadlock when the pool is busy): items claimed by
// helpers have started and finish promptly.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n_threads, int64_t n_items,
                        std::function<void(int64_t)> fn) {
  if (n_items <= 0) return;
  if (n_threads <= 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  auto state = std::make_shared<WorkState>();
  state->n_items = n_items;
  state->fn = std::move(fn);
  for (int64_t t = 1; t < std::min(n_threads, n_items); ++t) {
    pool.Schedule([state]() { RunItems(*state); });
  }
  RunItems(*state);
  while (state->done.load(std::memory_order_acquire) < state->n_items) {
    std::this_thread::yield();
  }
}

// A new dict {target name: PyCapsule(handler)}, or nullptr with a Python error set.
inline PyObject* RegistrationDict(std::initializer_list<std::pair<const char*, void*>> targets) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& [name, handler] : targets) {
    PyObject* capsule = PyCapsule_New(handler, nullptr, nullptr);
    const int rc = capsule == nullptr ? -1 : PyDict_SetItemString(dict, name, capsule);
    Py_XDECREF(capsule);
    if (rc != 0) {
      Py_DECREF(dict);
      return nullptr;
    }
  }
  return dict;
}

}  // namespace sparsejax_ffi

#endif  // SPARSEJAX_FFI_COMMON_H_
