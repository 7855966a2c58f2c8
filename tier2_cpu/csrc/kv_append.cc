// Appends the K,V of new tokens to tier 2's paged KV pool in place, called from JAX through the
// XLA FFI: the pool buffers are operands aliased to the results (and donated by the caller), so
// only the written slots are touched. k and v are read where the caller holds them (a uint32
// operand gives their addresses; the caller keeps them alive until the call completes): passed as
// arrays, JAX would copy them in (rows padded to a bucket; unaligned ones at about 2 GB/s).
//
// Pool layout (paged_attention.cc): K [num_pages, kv_heads, head_dim, page_size] (pages
// transposed), V [num_pages, kv_heads, page_size, head_dim], int8 scales [num_pages, kv_heads,
// page_size]. Token n goes to offset[n] of page[n]; a page outside [0, num_pages) marks a padding
// row (dropped, its k, v never read). k, v [tokens, kv_heads, head_dim] arrive as float32 or bf16
// bits (uint16) and are stored as float32, bf16 bits (float32 rounded to nearest even) or int8
// (per token and KV head: scale = amax / 127, 1 when amax is 0; x / scale rounded half to even,
// clipped to +-127): the math of the XLA scatter this replaced.
// Tokens in consecutive slots of one page (a run) are converted head by head into a small
// [run, head_dim] tile that register block transposes put into the K page (the strided K stores
// stay in L1); V rows are copied (or converted) straight in; the next head's input rows are
// prefetched (int8: 20% faster). Large appends split their tokens over
// the XLA CPU thread pool and write with streaming stores; small ones (decode) run on the caller's
// thread with plain stores.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Converts one row of `dim` input elements to the stored type; returns the row's int8 scale (1
// for the other stores).
inline float ConvertRow(const float* x, float* out, int64_t dim) {
  std::memcpy(out, x, dim * sizeof(float));
  return 1.0f;
}
inline float ConvertRow(const uint16_t* x, uint16_t* out, int64_t dim) {
  std::memcpy(out, x, dim * sizeof(uint16_t));
  return 1.0f;
}
inline float ConvertRow(const float* x, uint16_t* out, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) out[d] = RoundToBF16(x[d]);
  return 1.0f;
}
inline float ConvertRow(const float* x, int8_t* out, int64_t dim) {
  // amax over 16 lanes of a GCC vector (GCC leaves a float max reduction scalar: a serial chain).
  typedef float F16 __attribute__((vector_size(64)));
  F16 lanes = {};
  int64_t d0 = 0;
  for (; d0 + 16 <= dim; d0 += 16) {
    F16 a;
    std::memcpy(&a, x + d0, sizeof a);
    a = a < 0 ? -a : a;
    lanes = a > lanes ? a : lanes;
  }
  float amax = 0.0f;
  for (int l = 0; l < 16; ++l) amax = std::max(amax, lanes[l]);
  for (; d0 < dim; ++d0) amax = std::max(amax, std::fabs(x[d0]));
  const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
  for (int64_t d = 0; d < dim; ++d) {  // a division, as XLA's: not x * (1 / scale)
    const float q = std::nearbyint(x[d] / scale);
    out[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
  return scale;
}

// Stores of a register (32 or 16 bytes) and of whole rows, non-temporal where `stream` is set and the
// address is aligned: a large append's pages are not read again soon, and a streaming store does
// not read each destination line before writing it (on this CPU: 25% off a 2,048-token append).
#if defined(__AVX2__)
inline void Store32(void* dst, __m256i x, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0)
    _mm256_stream_si256(static_cast<__m256i*>(dst), x);
  else
    _mm256_storeu_si256(static_cast<__m256i*>(dst), x);
}
inline void Store16(void* dst, __m128i x, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0)
    _mm_stream_si128(static_cast<__m128i*>(dst), x);
  else
    _mm_storeu_si128(static_cast<__m128i*>(dst), x);
}
#endif
template <typename T>
inline void CopyRow(T* dst, const T* src, int64_t n, bool stream) {
#if defined(__AVX2__)
  const int64_t bytes = n * sizeof(T);
  if (stream && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && bytes % 32 == 0) {
    for (int64_t i = 0; i < bytes; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                              reinterpret_cast<const char*>(src) + i)));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// Block transposes: kBlock tokens x kBlock dims of a tile (row stride `dim`) into kBlock rows of a
// K page (row stride `page_size`), as unpack/shuffle networks in registers; none where there is no
// AVX2 (Transpose's scalar loop does all).
template <typename T> struct Block {
  static constexpr int kBlock = 0;
  static void Transpose(const T*, int64_t, T*, int64_t, bool) {}
};
#if defined(__AVX2__)
template <> struct Block<uint16_t> {  // 16 x 16 16-bit elements, 4 rounds of 16 instructions
  static constexpr int kBlock = 16;
  static void Transpose(const uint16_t* src, int64_t dim, uint16_t* dst, int64_t page_size,
                        bool stream) {
    __m256i a[16], b[16];
    for (int t = 0; t < 16; ++t) a[t] = _mm256_loadu_si256((const __m256i*)(src + t * dim));
    // b[2i], b[2i+1]: tokens (2i, 2i+1) interleaved for dims {0-3, 8-11}, {4-7, 12-15}.
    for (int t = 0; t < 16; t += 2) {
      b[t] = _mm256_unpacklo_epi16(a[t], a[t + 1]);
      b[t + 1] = _mm256_unpackhi_epi16(a[t], a[t + 1]);
    }
    // a[4g + j]: tokens 4g..4g+3 as 64-bit elements for dims {2j, 2j+1, 2j+8, 2j+9}.
    for (int g = 0; g < 16; g += 4) {
      a[g] = _mm256_unpacklo_epi32(b[g], b[g + 2]);
      a[g + 1] = _mm256_unpackhi_epi32(b[g], b[g + 2]);
      a[g + 2] = _mm256_unpacklo_epi32(b[g + 1], b[g + 3]);
      a[g + 3] = _mm256_unpackhi_epi32(b[g + 1], b[g + 3]);
    }
    // b[8h + 2j + e]: tokens 8h..8h+7 for dim 2j+e (low lane) and 2j+e+8 (high lane).
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 4; ++j) {
        b[8 * h + 2 * j] = _mm256_unpacklo_epi64(a[8 * h + j], a[8 * h + 4 + j]);
        b[8 * h + 2 * j + 1] = _mm256_unpackhi_epi64(a[8 * h + j], a[8 * h + 4 + j]);
      }
    for (int d = 0; d < 8; ++d) {
      Store32(dst + d * page_size, _mm256_permute2x128_si256(b[d], b[8 + d], 0x20), stream);
      Store32(dst + (d + 8) * page_size, _mm256_permute2x128_si256(b[d], b[8 + d], 0x31), stream);
    }
  }
};
template <> struct Block<int8_t> {  // 16 x 16 bytes in 128-bit registers
  static constexpr int kBlock = 16;
  static void Transpose(const int8_t* src, int64_t dim, int8_t* dst, int64_t page_size,
                        bool stream) {
    __m128i a[16], b[16];
    for (int t = 0; t < 16; ++t) a[t] = _mm_loadu_si128((const __m128i*)(src + t * dim));
    // b[2i], b[2i+1]: tokens (2i, 2i+1) interleaved for dims 0-7, 8-15.
    for (int t = 0; t < 16; t += 2) {
      b[t] = _mm_unpacklo_epi8(a[t], a[t + 1]);
      b[t + 1] = _mm_unpackhi_epi8(a[t], a[t + 1]);
    }
    // a[g + j]: tokens g..g+3 as 32-bit elements for dims 4j..4j+3.
    for (int g = 0; g < 16; g += 4) {
      a[g] = _mm_unpacklo_epi16(b[g], b[g + 2]);
      a[g + 1] = _mm_unpackhi_epi16(b[g], b[g + 2]);
      a[g + 2] = _mm_unpacklo_epi16(b[g + 1], b[g + 3]);
      a[g + 3] = _mm_unpackhi_epi16(b[g + 1], b[g + 3]);
    }
    // b[h + m]: tokens h..h+7 as 64-bit elements for dims 2m, 2m+1.
    for (int h = 0; h < 16; h += 8)
      for (int j = 0; j < 4; ++j) {
        b[h + 2 * j] = _mm_unpacklo_epi32(a[h + j], a[h + 4 + j]);
        b[h + 2 * j + 1] = _mm_unpackhi_epi32(a[h + j], a[h + 4 + j]);
      }
    for (int m = 0; m < 8; ++m) {
      Store16(dst + 2 * m * page_size, _mm_unpacklo_epi64(b[m], b[8 + m]), stream);
      Store16(dst + (2 * m + 1) * page_size, _mm_unpackhi_epi64(b[m], b[8 + m]), stream);
    }
  }
};
template <> struct Block<float> {  // 8 x 8 floats
  static constexpr int kBlock = 8;
  static void Transpose(const float* src, int64_t dim, float* dst, int64_t page_size, bool stream) {
    __m256 a[8], b[8];
    for (int t = 0; t < 8; ++t) a[t] = _mm256_loadu_ps(src + t * dim);
    for (int t = 0; t < 8; t += 2) {
      b[t] = _mm256_unpacklo_ps(a[t], a[t + 1]);
      b[t + 1] = _mm256_unpackhi_ps(a[t], a[t + 1]);
    }
    for (int g = 0; g < 8; g += 4) {
      a[g] = _mm256_shuffle_ps(b[g], b[g + 2], 0x44);
      a[g + 1] = _mm256_shuffle_ps(b[g], b[g + 2], 0xEE);
      a[g + 2] = _mm256_shuffle_ps(b[g + 1], b[g + 3], 0x44);
      a[g + 3] = _mm256_shuffle_ps(b[g + 1], b[g + 3], 0xEE);
    }
    for (int d = 0; d < 4; ++d) {
      Store32(dst + d * page_size, _mm256_castps_si256(_mm256_permute2f128_ps(a[d], a[4 + d], 0x20)),
              stream);
      Store32(dst + (d + 4) * page_size,
              _mm256_castps_si256(_mm256_permute2f128_ps(a[d], a[4 + d], 0x31)), stream);
    }
  }
};
#endif

// tile [len, dim] into dst [dim, page_size] at columns 0..len-1: whole blocks in registers, the
// rest element by element.
template <typename T>
void Transpose(const T* tile, int64_t len, int64_t dim, T* dst, int64_t page_size, bool stream) {
  constexpr int B = Block<T>::kBlock;
  const int64_t blocks = B > 0 && dim % B == 0 ? len / B : 0;
  const int64_t t0 = blocks * B;
  for (int64_t d = 0; blocks && d < dim; d += B)
    for (int64_t j = 0; j < blocks; ++j)  // a K row's blocks one after another (whole lines)
      Block<T>::Transpose(tile + j * B * dim + d, dim, dst + d * page_size + j * B, page_size, stream);
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t t = t0; t < len; ++t) dst[d * page_size + t] = tile[t * dim + d];
}

template <typename T>
inline void Prefetch(const T* row, int64_t n) {
  for (int64_t i = 0; i < n * static_cast<int64_t>(sizeof(T)); i += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(row) + i);
}

struct Dims {
  int64_t tokens, kv_heads, dim, num_pages, page_size;
};

template <typename In, typename Out>
struct Append {
  Dims dm;
  const int32_t* page;
  const int32_t* offset;
  const In* k;
  const In* v;
  Out* k_pool;
  Out* v_pool;
  float* k_scale;  // int8 only, else null
  float* v_scale;
  bool stream;  // non-temporal stores (large appends)

  // Writes tokens [begin, end); `tile` holds page_size * dim elements.
  void Run(int64_t begin, int64_t end, Out* tile) const {
    const int64_t P = dm.page_size, D = dm.dim, H = dm.kv_heads;
    for (int64_t n = begin; n < end;) {
      const int32_t p = page[n], off = offset[n];
      int64_t len = 1;
      while (n + len < end && page[n + len] == p && offset[n + len] == off + len) ++len;
      if (p >= 0 && p < dm.num_pages && off >= 0 && off + len <= P) {
        for (int64_t h = 0; h < H; ++h) {
          if (h + 1 < H) {  // the next head's rows, kv_heads * head_dim apart: prefetch them
            for (int64_t t = 0; t < len; ++t) {
              Prefetch(k + ((n + t) * H + h + 1) * D, D);
              Prefetch(v + ((n + t) * H + h + 1) * D, D);
            }
          }
          const int64_t row0 = (p * H + h) * P + off;  // slot of (page, head, off) in V / scales
          for (int64_t t = 0; t < len; ++t) {
            const float s = ConvertRow(k + ((n + t) * H + h) * D, tile + t * D, D);
            if (k_scale) k_scale[row0 + t] = s;
          }
          Transpose(tile, len, D, k_pool + (p * H + h) * D * P + off, P, stream);
          for (int64_t t = 0; t < len; ++t) {
            const In* src = v + ((n + t) * H + h) * D;
            if constexpr (std::is_same_v<In, Out>) {
              CopyRow(v_pool + (row0 + t) * D, src, D, stream);
            } else {
              const float s = ConvertRow(src, v_pool + (row0 + t) * D, D);
              if (v_scale) v_scale[row0 + t] = s;
            }
          }
        }
      }  // else padding rows (or slots past the page, which the caller rejects): dropped
      n += len;
    }
#if defined(__AVX2__)
    if (stream) _mm_sfence();
#endif
  }
};

// Input bytes per extra thread: below this an append runs on the caller's thread alone (a task
// costs microseconds, about a decode append's whole work).
constexpr int64_t kBytesPerThread = 1 << 20;

// Splits the tokens into one contiguous range per thread; workers hold the state through a
// shared_ptr, the last one to finish wakes the caller.
template <typename In, typename Out>
struct Split {
  Append<In, Out> job{};
  int64_t threads;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void Work() {
    std::vector<Out> tile(job.dm.page_size * job.dm.dim);
    for (int64_t t = next.fetch_add(1); t < threads; t = next.fetch_add(1)) {
      job.Run(job.dm.tokens * t / threads, job.dm.tokens * (t + 1) / threads, tile.data());
      if (done.fetch_add(1) + 1 == threads) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

template <typename In, typename Out>
ffi::Error Run(Append<In, Out> job, ffi::ThreadPool pool) {
  while (job.dm.tokens > 0 && (job.page[job.dm.tokens - 1] < 0 ||
                               job.page[job.dm.tokens - 1] >= job.dm.num_pages))
    --job.dm.tokens;  // trailing padding rows: not counted, not split over threads
  const int64_t bytes = 2 * job.dm.tokens * job.dm.kv_heads * job.dm.dim * sizeof(In);
  job.stream = bytes >= kBytesPerThread;
  const int64_t threads =
      std::max<int64_t>(1, std::min({pool.num_threads(), bytes / kBytesPerThread, job.dm.tokens}));
  if (threads == 1) {
    std::vector<Out> tile(job.dm.page_size * job.dm.dim);
    job.Run(0, job.dm.tokens, tile.data());
    return ffi::Error::Success();
  }
  auto split = std::make_shared<Split<In, Out>>();
  split->job = job;
  split->threads = threads;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([split] { split->Work(); });
  split->Work();
  std::unique_lock<std::mutex> lock(split->mu);
  split->all_done.wait(lock, [&] { return split->done.load() == split->threads; });
  return ffi::Error::Success();
}

template <typename B>
int64_t Count(const B& buffer) {
  return static_cast<int64_t>(buffer.element_count());
}

// Fills the job from its operands (k, v by address: see the file comment), or names the mismatch.
template <typename In, typename Out, typename Pool>
ffi::Error Prepare(const ffi::Buffer<ffi::S32>& page, const ffi::Buffer<ffi::S32>& offset,
                   const ffi::Buffer<ffi::U32>& kv, const Pool& k_pool, const Pool& v_pool,
                   Append<In, Out>* job) {
  auto pd = v_pool.dimensions();
  if (pd.size() != 4 || Count(offset) != Count(page) || Count(kv) != 4 ||
      Count(k_pool) != Count(v_pool))
    return ffi::Error::InvalidArgument(
        "append: " + std::to_string(Count(page)) + " pages, " + std::to_string(Count(offset)) +
        " offsets, " + std::to_string(Count(kv)) + " address words, pools of " +
        std::to_string(Count(k_pool)) + " / " + std::to_string(Count(v_pool)) +
        " elements: expected as many offsets as pages, 4 (k, v), equal 4-d pools");
  job->dm = Dims{Count(page), pd[1], pd[3], pd[0], pd[2]};
  job->page = page.typed_data();
  job->offset = offset.typed_data();
  uint64_t address[2];  // uint32 pairs: JAX without x64 holds no 64-bit ints
  std::memcpy(address, kv.typed_data(), sizeof address);
  job->k = reinterpret_cast<const In*>(address[0]);
  job->v = reinterpret_cast<const In*>(address[1]);
  job->k_scale = job->v_scale = nullptr;
  return ffi::Error::Success();
}

template <ffi::DataType kPool, typename In>
ffi::Error AppendPlain(ffi::Buffer<ffi::S32> page, ffi::Buffer<ffi::S32> offset,
                       ffi::Buffer<ffi::U32> kv, ffi::Buffer<kPool> k_pool,
                       ffi::Buffer<kPool> v_pool, ffi::ResultBuffer<kPool> k_out,
                       ffi::ResultBuffer<kPool> v_out, ffi::ThreadPool pool) {
  Append<In, ffi::NativeType<kPool>> job{};
  if (ffi::Error err = Prepare(page, offset, kv, k_pool, v_pool, &job); !err.success()) return err;
  job.k_pool = k_out->typed_data();  // aliased to k_pool: written in place
  job.v_pool = v_out->typed_data();
  return Run(job, pool);
}

ffi::Error AppendInt8(ffi::Buffer<ffi::S32> page, ffi::Buffer<ffi::S32> offset,
                      ffi::Buffer<ffi::U32> kv, ffi::Buffer<ffi::S8> k_pool,
                      ffi::Buffer<ffi::S8> v_pool, ffi::Buffer<ffi::F32> k_scale,
                      ffi::Buffer<ffi::F32> v_scale, ffi::ResultBuffer<ffi::S8> k_out,
                      ffi::ResultBuffer<ffi::S8> v_out, ffi::ResultBuffer<ffi::F32> k_scale_out,
                      ffi::ResultBuffer<ffi::F32> v_scale_out, ffi::ThreadPool pool) {
  Append<float, int8_t> job{};
  if (ffi::Error err = Prepare(page, offset, kv, k_pool, v_pool, &job); !err.success()) return err;
  if (Count(k_scale) * job.dm.dim != Count(v_pool) || Count(v_scale) != Count(k_scale))
    return ffi::Error::InvalidArgument("append: int8 scales of " +
                                       std::to_string(Count(k_scale)) +
                                       " elements, expected one per pool slot and KV head");
  job.k_pool = k_out->typed_data();
  job.v_pool = v_out->typed_data();
  job.k_scale = k_scale_out->typed_data();
  job.v_scale = v_scale_out->typed_data();
  return Run(job, pool);
}

}  // namespace

#define PLAIN_BINDING(Pool)          \
  ffi::Ffi::Bind()                   \
      .Arg<ffi::Buffer<ffi::S32>>()  \
      .Arg<ffi::Buffer<ffi::S32>>()  \
      .Arg<ffi::Buffer<ffi::U32>>()  \
      .Arg<ffi::Buffer<Pool>>()      \
      .Arg<ffi::Buffer<Pool>>()      \
      .Ret<ffi::Buffer<Pool>>()      \
      .Ret<ffi::Buffer<Pool>>()      \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvAppendF32, (AppendPlain<ffi::F32, float>), PLAIN_BINDING(ffi::F32));
// bf16 pools are held as uint16 bits; k, v come as bf16 bits or as float32.
XLA_FFI_DEFINE_HANDLER_SYMBOL(KvAppendBF16, (AppendPlain<ffi::U16, uint16_t>),
                              PLAIN_BINDING(ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KvAppendBF16FromF32, (AppendPlain<ffi::U16, float>),
                              PLAIN_BINDING(ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KvAppendInt8, AppendInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
