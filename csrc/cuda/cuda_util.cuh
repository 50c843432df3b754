// CUDA helpers: error checks that become Python exceptions, a device guard, UVA translation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace freezert {

inline void cuda_check(cudaError_t err, const char* what, const char* where) {
  if (err != cudaSuccess) {
    // A failed runtime call also sets the thread's last error; clear it (non-sticky errors), or the
    // launch check of the next, unrelated call would report this error again.
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("freezert._C.") + where + ": CUDA error in " + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}
#define FRZ_CUDA_CHECK(expr, where) ::freezert::cuda_check((expr), #expr, where)

// Makes `device` current for the call and restores the caller's device afterwards (torch's
// runtime and this module's static runtime share the driver's current context).
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* where) {
    FRZ_CUDA_CHECK(cudaGetDevice(&prev_), where);
    if (prev_ != device) FRZ_CUDA_CHECK(cudaSetDevice(device), where);
  }
  ~DeviceGuard() {
    int cur = prev_;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// Device-side address of pinned (page-locked) host memory; throws for pageable memory.
inline uintptr_t host_to_device_ptr(uintptr_t p, const char* what, const char* where) {
  if (p == 0) return 0;
  cudaPointerAttributes attr{};
  FRZ_CUDA_CHECK(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p)), where);
  if (attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr)
    throw std::invalid_argument(std::string("freezert._C.") + where + ": " + what +
                                " is not pinned host memory visible to the device");
  return reinterpret_cast<uintptr_t>(attr.devicePointer);
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

inline int grid_for(int64_t work_units, int64_t cap = int64_t(1) << 20) {
  return static_cast<int>(work_units < 1 ? 1 : (work_units < cap ? work_units : cap));
}

}  // namespace freezert
