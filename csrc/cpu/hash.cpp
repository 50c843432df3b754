// Row content hash (CPU): sum over words of splitmix64(word ^ i*golden), then a finisher.
#include <cstring>

#include "../common.h"
#include "../ops.h"
#include "parallel.h"

namespace freezert {
namespace {

uint64_t hash_range(const uint8_t* row, int64_t row_bytes, int64_t w_begin, int64_t w_end) {
  const int64_t full_words = row_bytes / 8;
  uint64_t h = 0;
  const int64_t stop = std::min(w_end, full_words);
  for (int64_t i = w_begin; i < stop; ++i) {
    uint64_t w;
    std::memcpy(&w, row + 8 * i, 8);  // unaligned-safe little-endian load
    h += hash_word(w, static_cast<uint64_t>(i));
  }
  if (w_end > full_words && full_words >= w_begin && row_bytes % 8 != 0) {  // zero-padded tail
    uint64_t w = 0;
    std::memcpy(&w, row + 8 * full_words, static_cast<size_t>(row_bytes % 8));
    h += hash_word(w, static_cast<uint64_t>(full_words));
  }
  return h;
}

}  // namespace

void hash_rows_cpu(uintptr_t x, int64_t rows, int64_t row_bytes, uint64_t seed, uintptr_t out) {
  static_assert(sizeof(uint64_t) == 8, "");
  const auto* base = reinterpret_cast<const uint8_t*>(x);
  auto* dst = reinterpret_cast<int64_t*>(out);
  const int64_t words = (row_bytes + 7) / 8;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  if (rows >= hw || words < (int64_t(1) << 16)) {
    parallel_for(rows, row_bytes, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const uint64_t h = hash_range(base + r * row_bytes, row_bytes, 0, words);
        const uint64_t f = hash_finish(h, static_cast<uint64_t>(row_bytes), seed);
        std::memcpy(dst + r, &f, 8);
      }
    });
    return;
  }
  // Few, large rows: split each row's words across threads (the sum is order-independent).
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = base + r * row_bytes;
    const int64_t nchunks = hw;
    std::vector<uint64_t> partial(nchunks, 0);
    const int64_t chunk = (words + nchunks - 1) / nchunks;
    parallel_for(nchunks, chunk * 8, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c)
        partial[c] = hash_range(row, row_bytes, c * chunk, std::min(words, (c + 1) * chunk));
    });
    uint64_t h = 0;
    for (uint64_t p : partial) h += p;
    const uint64_t f = hash_finish(h, static_cast<uint64_t>(row_bytes), seed);
    std::memcpy(dst + r, &f, 8);
  }
}

}  // namespace freezert
