// Feature-cache codecs (CUDA): block-per-row encode (fp8 needs the row amax first) and a
// vectorised gather/decode. The store may be pinned host memory read or written through
// its UVA device pointer (the cache's host tier), so no staging copy is made.
#include "../common.h"
#include "../ops.h"
#include "cuda_util.cuh"

namespace freezert {
namespace {

constexpr int kBlock = 256;

template <class T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Pack {
  T v[N];
};

// ---- encode ----------------------------------------------------------------------------
template <int S, int D>
__global__ void encode_kernel(const typename ElemT<S>::T* __restrict__ src, const int64_t* __restrict__ index,
                              int64_t batch, int64_t dim, typename ElemT<D>::T* store, float* scales,
                              int64_t n_rows) {
  __shared__ float s_amax[kBlock / 32];
  __shared__ int s_nan[kBlock / 32];
  for (int64_t i = blockIdx.x; i < batch; i += gridDim.x) {
    const int64_t r = index[i];
    if (r < 0 || r >= n_rows) continue;  // checked in Python; never write out of bounds
    const auto* in = src + i * dim;
    auto* dst = store + r * dim;
    if constexpr (D == kFP8) {
      float amax = 0.0f;
      int nan = 0;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
        const float a = fabsf(load_f32<S>(in[j]));
        nan |= isnan(a);
        amax = a > amax ? a : amax;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_down_sync(0xFFFFFFFFu, amax, o);
        amax = other > amax ? other : amax;
        nan |= __shfl_down_sync(0xFFFFFFFFu, nan, o);
      }
      if ((threadIdx.x & 31) == 0) { s_amax[threadIdx.x >> 5] = amax; s_nan[threadIdx.x >> 5] = nan; }
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int w = 1; w < (blockDim.x >> 5); ++w) {
          amax = s_amax[w] > amax ? s_amax[w] : amax;
          nan |= s_nan[w];
        }
        s_amax[0] = nan ? __int_as_float(0x7FC00000) : fp8_scale(amax);
      }
      __syncthreads();
      const float scale = s_amax[0];
      if (threadIdx.x == 0) scales[r] = scale;
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = fp8_from_f32(load_f32<S>(in[j]) / scale);
      __syncthreads();  // s_amax is reused by the next row
    } else {
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = store_from_f32<D>(load_f32<S>(in[j]));
    }
  }
}

// ---- gather / decode -------------------------------------------------------------------
template <int S, int D>
__device__ __forceinline__ typename ElemT<D>::T decode_one(typename ElemT<S>::T v, float scale) {
  if constexpr (S == kFP8) return store_from_f32<D>(f32_from_fp8(v) * scale);
  else return store_from_f32<D>(load_f32<S>(v));
}

// blockDim = (threads per row, rows per block); VEC elements per thread step when vectorised.
template <int S, int D, int VEC, bool VECTORISED>
__global__ void gather_kernel(const typename ElemT<S>::T* store, const float* scales,
                              const int64_t* __restrict__ index, int64_t batch, int64_t dim,
                              int64_t n_rows, typename ElemT<D>::T* __restrict__ out) {
  using ST = typename ElemT<S>::T;
  using DT = typename ElemT<D>::T;
  const int64_t rows_per_grid = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; i < batch; i += rows_per_grid) {
    const int64_t r = index[i];
    DT* dst = out + i * dim;
    if (r < 0 || r >= n_rows) {  // checked in Python; poison rather than read out of bounds
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = store_from_f32<D>(__int_as_float(0x7FC00000));
      continue;
    }
    const ST* row = store + r * dim;
    const float scale = S == kFP8 ? scales[r] : 1.0f;
    if constexpr (VECTORISED) {
      for (int64_t j = threadIdx.x * VEC; j < dim; j += static_cast<int64_t>(blockDim.x) * VEC) {
        const Pack<ST, VEC> in = *reinterpret_cast<const Pack<ST, VEC>*>(row + j);
        Pack<DT, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = decode_one<S, D>(in.v[k], scale);
        *reinterpret_cast<Pack<DT, VEC>*>(dst + j) = o;
      }
    } else {
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) dst[j] = decode_one<S, D>(row[j], scale);
    }
  }
}

template <int S, int D>
void launch_gather(uintptr_t store, uintptr_t scales, uintptr_t index, int64_t batch, int64_t dim,
                   int64_t n_rows, uintptr_t out, cudaStream_t stream) {
  using ST = typename ElemT<S>::T;
  using DT = typename ElemT<D>::T;
  constexpr int VEC = 16 / sizeof(ST);  // one 16-byte load of the store per step
  const bool vec = (store % 16 == 0) && (out % 16 == 0) && ((dim * sizeof(ST)) % 16 == 0) &&
                   ((dim * sizeof(DT)) % 16 == 0);
  const int64_t steps = vec ? dim / VEC : dim;
  int tx = 32;
  while (tx < 256 && tx < steps) tx *= 2;
  const int ty = 256 / tx;
  const dim3 block(tx, ty);
  const int grid = grid_for((batch + ty - 1) / ty);
  const auto* ps = reinterpret_cast<const ST*>(store);
  const auto* psc = reinterpret_cast<const float*>(scales);
  const auto* pi = reinterpret_cast<const int64_t*>(index);
  auto* po = reinterpret_cast<DT*>(out);
  if (vec) gather_kernel<S, D, VEC, true><<<grid, block, 0, stream>>>(ps, psc, pi, batch, dim, n_rows, po);
  else gather_kernel<S, D, VEC, false><<<grid, block, 0, stream>>>(ps, psc, pi, batch, dim, n_rows, po);
}

// Templates, so that the if-constexpr-discarded fp8-as-input combinations are never instantiated.
template <int S, int D>
void launch_encode(uintptr_t src, uintptr_t index, int64_t batch, int64_t dim, uintptr_t store,
                   uintptr_t scales, int64_t n_rows, cudaStream_t stream) {
  if constexpr (S != kFP8)
    encode_kernel<S, D><<<grid_for(batch), kBlock, 0, stream>>>(
        reinterpret_cast<const typename ElemT<S>::T*>(src), reinterpret_cast<const int64_t*>(index), batch,
        dim, reinterpret_cast<typename ElemT<D>::T*>(store), reinterpret_cast<float*>(scales), n_rows);
}

template <int S, int D>
void launch_decode(uintptr_t store, uintptr_t scales, uintptr_t index, int64_t batch, int64_t dim,
                   int64_t n_rows, uintptr_t out, cudaStream_t stream) {
  if constexpr (D != kFP8) launch_gather<S, D>(store, scales, index, batch, dim, n_rows, out, stream);
}

void check_io_elem(int e, const char* what) {
  if (e != kF32 && e != kF16 && e != kBF16)
    throw std::invalid_argument(std::string("freezert._C: ") + what + " must be float32/float16/bfloat16");
}

}  // namespace

void encode_scatter_cuda(uintptr_t src, int src_elem, uintptr_t index, int64_t batch, int64_t dim,
                         uintptr_t store, int store_elem, uintptr_t scales, int64_t n_rows,
                         bool store_on_host, int device, uintptr_t stream) {
  check_io_elem(src_elem, "src");
  if (store_elem == kFP8 && scales == 0) throw std::invalid_argument("freezert._C: fp8 needs scales");
  if (batch <= 0 || dim <= 0) return;
  DeviceGuard guard(device, "encode_scatter");
  if (store_on_host) {
    store = host_to_device_ptr(store, "store", "encode_scatter");
    scales = host_to_device_ptr(scales, "scales", "encode_scatter");
  }
  FRZ_DISPATCH_ELEM(src_elem, S, FRZ_DISPATCH_ELEM(store_elem, D,
      launch_encode<S, D>(src, index, batch, dim, store, scales, n_rows, as_stream(stream))));
  FRZ_CUDA_CHECK(cudaGetLastError(), "encode_scatter");
}

void gather_decode_cuda(uintptr_t store, int store_elem, uintptr_t scales, uintptr_t index,
                        int64_t batch, int64_t dim, int64_t n_rows, uintptr_t out, int out_elem,
                        bool store_on_host, int device, uintptr_t stream) {
  check_io_elem(out_elem, "out");
  if (store_elem == kFP8 && scales == 0) throw std::invalid_argument("freezert._C: fp8 needs scales");
  if (batch <= 0 || dim <= 0) return;
  DeviceGuard guard(device, "gather_decode");
  if (store_on_host) {
    store = host_to_device_ptr(store, "store", "gather_decode");
    scales = host_to_device_ptr(scales, "scales", "gather_decode");
  }
  FRZ_DISPATCH_ELEM(store_elem, S, FRZ_DISPATCH_ELEM(out_elem, D,
      launch_decode<S, D>(store, scales, index, batch, dim, n_rows, out, as_stream(stream))));
  FRZ_CUDA_CHECK(cudaGetLastError(), "gather_decode");
}

}  // namespace freezert
