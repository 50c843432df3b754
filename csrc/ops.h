// Entry points of freezert._C. Pointers arrive as integers; _native.py has already checked
// dtype, device, shape, contiguity and index bounds before any of these is called.
#pragma once

#include <cstdint>
#include <string>

namespace freezert {

// ---- CPU (csrc/cpu) ----
void hash_rows_cpu(uintptr_t x, int64_t rows, int64_t row_bytes, uint64_t seed, uintptr_t out);
void encode_scatter_cpu(uintptr_t src, int src_elem, uintptr_t index, int64_t batch, int64_t dim,
                        uintptr_t store, int store_elem, uintptr_t scales, int64_t n_rows);
void gather_decode_cpu(uintptr_t store, int store_elem, uintptr_t scales, uintptr_t index,
                       int64_t batch, int64_t dim, int64_t n_rows, uintptr_t out, int out_elem);

#ifdef FREEZERT_WITH_CUDA
// ---- CUDA (csrc/cuda) ----
// Device count seen by this module's (static) CUDA runtime; 0 when no driver/device.
int cuda_device_count();
std::string cuda_status();  // "" when usable, else why not
int cuda_runtime_version();
void hash_rows_cuda(uintptr_t x, int64_t rows, int64_t row_bytes, uint64_t seed, uintptr_t out,
                    int device, uintptr_t stream);
// store/scales may be pinned host memory (read or written through their UVA device pointer).
void encode_scatter_cuda(uintptr_t src, int src_elem, uintptr_t index, int64_t batch, int64_t dim,
                         uintptr_t store, int store_elem, uintptr_t scales, int64_t n_rows,
                         bool store_on_host, int device, uintptr_t stream);
void gather_decode_cuda(uintptr_t store, int store_elem, uintptr_t scales, uintptr_t index,
                        int64_t batch, int64_t dim, int64_t n_rows, uintptr_t out, int out_elem,
                        bool store_on_host, int device, uintptr_t stream);
#endif

}  // namespace freezert
