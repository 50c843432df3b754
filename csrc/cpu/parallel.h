// Minimal fork-join over std::thread: the kernels are memory bound, so split only large work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace freezert {

// Calls fn(begin, end) on disjoint ranges covering [0, n); threads only when work is large.
template <class Fn>
void parallel_for(int64_t n, int64_t work_per_item, Fn&& fn) {
  constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;  // ~256 KiB touched per thread
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t total = n * std::max<int64_t>(1, work_per_item);
  const int64_t nthreads = std::min<int64_t>({hw, n, std::max<int64_t>(1, total / kMinWorkPerThread)});
  if (nthreads <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(nthreads);
  for (int64_t t = 1; t < nthreads; ++t) {
    const int64_t b = t * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    threads.emplace_back([&, t, b, e] {
      try { fn(b, e); } catch (...) { errors[t] = std::current_exception(); }
    });
  }
  try { fn(int64_t(0), std::min(n, chunk)); } catch (...) { errors[0] = std::current_exception(); }
  for (auto& th : threads) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
}

}  // namespace freezert
