// Feature-cache codecs (CPU): encode rows into a store at given indices, gather and decode.
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "../common.h"
#include "../ops.h"
#include "parallel.h"

namespace freezert {
namespace {

template <int S, int D>
void encode_rows(const typename ElemT<S>::T* src, const int64_t* index, int64_t batch, int64_t dim,
                 typename ElemT<D>::T* store, float* scales, int64_t n_rows) {
  parallel_for(batch, dim, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = index[i];
      if (r < 0 || r >= n_rows)  // _native.py checked; never write out of bounds regardless
        throw std::out_of_range("freezert._C.encode_scatter: index " + std::to_string(r) +
                                " outside [0, " + std::to_string(n_rows) + ")");
      const auto* in = src + i * dim;
      auto* dst = store + r * dim;
      if constexpr (D == kFP8) {
        float amax = 0.0f;
        bool nan = false;
        for (int64_t j = 0; j < dim; ++j) {
          const float a = std::fabs(load_f32<S>(in[j]));
          nan |= std::isnan(a);
          amax = a > amax ? a : amax;
        }
        const float scale = nan ? std::numeric_limits<float>::quiet_NaN() : fp8_scale(amax);
        scales[r] = scale;
        for (int64_t j = 0; j < dim; ++j) dst[j] = fp8_from_f32(load_f32<S>(in[j]) / scale);
      } else {
        for (int64_t j = 0; j < dim; ++j) dst[j] = store_from_f32<D>(load_f32<S>(in[j]));
      }
    }
  });
}

template <int S, int D>
void decode_rows(const typename ElemT<S>::T* store, const float* scales, const int64_t* index,
                 int64_t batch, int64_t dim, int64_t n_rows, typename ElemT<D>::T* out) {
  parallel_for(batch, dim, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t r = index[i];
      if (r < 0 || r >= n_rows)
        throw std::out_of_range("freezert._C.gather_decode: index " + std::to_string(r) +
                                " outside [0, " + std::to_string(n_rows) + ")");
      const auto* row = store + r * dim;
      auto* dst = out + i * dim;
      if constexpr (S == kFP8) {
        const float scale = scales[r];
        for (int64_t j = 0; j < dim; ++j) dst[j] = store_from_f32<D>(f32_from_fp8(row[j]) * scale);
      } else {
        for (int64_t j = 0; j < dim; ++j) dst[j] = store_from_f32<D>(load_f32<S>(row[j]));
      }
    }
  });
}

template <int S, int D>
void run_encode(uintptr_t src, uintptr_t index, int64_t batch, int64_t dim, uintptr_t store,
                uintptr_t scales, int64_t n_rows) {
  if constexpr (S != kFP8)
    encode_rows<S, D>(reinterpret_cast<const typename ElemT<S>::T*>(src), reinterpret_cast<const int64_t*>(index),
                      batch, dim, reinterpret_cast<typename ElemT<D>::T*>(store), reinterpret_cast<float*>(scales),
                      n_rows);
}

template <int S, int D>
void run_decode(uintptr_t store, uintptr_t scales, uintptr_t index, int64_t batch, int64_t dim,
                int64_t n_rows, uintptr_t out) {
  if constexpr (D != kFP8)
    decode_rows<S, D>(reinterpret_cast<const typename ElemT<S>::T*>(store), reinterpret_cast<const float*>(scales),
                      reinterpret_cast<const int64_t*>(index), batch, dim, n_rows,
                      reinterpret_cast<typename ElemT<D>::T*>(out));
}

void check_io_elem(int e, const char* what) {
  if (e != kF32 && e != kF16 && e != kBF16)
    throw std::invalid_argument(std::string("freezert._C: ") + what + " must be float32/float16/bfloat16");
}

}  // namespace

void encode_scatter_cpu(uintptr_t src, int src_elem, uintptr_t index, int64_t batch, int64_t dim,
                        uintptr_t store, int store_elem, uintptr_t scales, int64_t n_rows) {
  check_io_elem(src_elem, "src");
  if (store_elem == kFP8 && scales == 0) throw std::invalid_argument("freezert._C: fp8 needs scales");
  FRZ_DISPATCH_ELEM(src_elem, S, FRZ_DISPATCH_ELEM(store_elem, D,
      run_encode<S, D>(src, index, batch, dim, store, scales, n_rows)));
}

void gather_decode_cpu(uintptr_t store, int store_elem, uintptr_t scales, uintptr_t index,
                       int64_t batch, int64_t dim, int64_t n_rows, uintptr_t out, int out_elem) {
  check_io_elem(out_elem, "out");
  if (store_elem == kFP8 && scales == 0) throw std::invalid_argument("freezert._C: fp8 needs scales");
  FRZ_DISPATCH_ELEM(store_elem, S, FRZ_DISPATCH_ELEM(out_elem, D,
      run_decode<S, D>(store, scales, index, batch, dim, n_rows, out)));
}

}  // namespace freezert
