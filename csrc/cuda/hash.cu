// Row content hash (CUDA): one block (or, for short rows, one warp) per row; the word
// contributions are summed mod 2^64, which is order-independent, so the result is the
// same as the CPU kernel's regardless of the reduction tree.
#include "../common.h"
#include "../ops.h"
#include "cuda_util.cuh"

namespace freezert {
namespace {

constexpr int kBlock = 256;
constexpr int kWarpRowsMaxWords = 128;  // rows up to 1 KiB: one warp each

__device__ __forceinline__ uint64_t load_word(const uint8_t* row, int64_t i, int64_t row_bytes,
                                              bool aligned) {
  const int64_t off = 8 * i;
  if (aligned && off + 8 <= row_bytes) return reinterpret_cast<const unsigned long long*>(row)[i];
  uint64_t w = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (off + k < row_bytes) w |= static_cast<uint64_t>(row[off + k]) << (8 * k);
  return w;
}

__device__ __forceinline__ uint64_t warp_sum(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return v;
}

__global__ void hash_block_per_row(const uint8_t* __restrict__ x, int64_t rows, int64_t row_bytes,
                                   uint64_t seed, int64_t* __restrict__ out) {
  __shared__ uint64_t partial[kBlock / 32];
  const int64_t words = (row_bytes + 7) / 8;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const uint8_t* row = x + r * row_bytes;
    const bool aligned = (reinterpret_cast<uintptr_t>(row) & 7) == 0;
    uint64_t h = 0;
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) h += hash_word(load_word(row, i, row_bytes, aligned), i);
    h = warp_sum(h);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = h;
    __syncthreads();
    if (threadIdx.x < 32) {
      uint64_t v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0;
      v = warp_sum(v);
      if (threadIdx.x == 0) out[r] = static_cast<int64_t>(hash_finish(v, row_bytes, seed));
    }
    __syncthreads();  // partial[] is reused by the next row
  }
}

__global__ void hash_warp_per_row(const uint8_t* __restrict__ x, int64_t rows, int64_t row_bytes,
                                  uint64_t seed, int64_t* __restrict__ out) {
  const int64_t words = (row_bytes + 7) / 8;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
       r += warps_per_grid) {
    const uint8_t* row = x + r * row_bytes;
    const bool aligned = (reinterpret_cast<uintptr_t>(row) & 7) == 0;
    uint64_t h = 0;
    for (int64_t i = lane; i < words; i += 32) h += hash_word(load_word(row, i, row_bytes, aligned), i);
    h = warp_sum(h);
    if (lane == 0) out[r] = static_cast<int64_t>(hash_finish(h, row_bytes, seed));
  }
}

}  // namespace

void hash_rows_cuda(uintptr_t x, int64_t rows, int64_t row_bytes, uint64_t seed, uintptr_t out,
                    int device, uintptr_t stream) {
  if (rows <= 0) return;
  DeviceGuard guard(device, "hash_rows");
  const auto* px = reinterpret_cast<const uint8_t*>(x);
  auto* po = reinterpret_cast<int64_t*>(out);
  const int64_t words = (row_bytes + 7) / 8;
  if (words <= kWarpRowsMaxWords) {
    const int64_t warps = kBlock / 32;
    hash_warp_per_row<<<grid_for((rows + warps - 1) / warps), kBlock, 0, as_stream(stream)>>>(px, rows, row_bytes, seed, po);
  } else {
    hash_block_per_row<<<grid_for(rows), kBlock, 0, as_stream(stream)>>>(px, rows, row_bytes, seed, po);
  }
  FRZ_CUDA_CHECK(cudaGetLastError(), "hash_rows");
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls start clean
    return 0;
  }
  return n;
}

std::string cuda_status() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (n == 0) return "no CUDA device";
  return "";
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace freezert
