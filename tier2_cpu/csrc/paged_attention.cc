// Paged decode/prefill attention over a KV pool stored as float32, bfloat16 or int8, called from
// JAX through the XLA FFI on the CPU device.
//
// Pool layout: [num_pages, kv_heads, page_size, head_dim]; int8 scales: [num_pages, kv_heads,
// page_size] (one per token and KV head). Query token n attends positions 0..positions[n] of the
// pages listed in block_tables[n]; positions[n] < 0 marks a padding row (output zeros).
// For each (token, KV head) the kernel streams the pages once for all query heads of the group
// (GQA), in chunks of kChunk keys, with an online softmax and accumulators in float32. Stored
// elements widen to float32 in registers (bf16: a 16-bit shift; int8: sign-extend and convert,
// times the row's scale); there is no half-precision arithmetic, so XLA's slow bf16 CPU dot is
// never involved. Vectors are GCC vector types at the native width, so the same source builds
// with -march=native for AVX-512, AVX2 or plain SSE; head_dim not a multiple of the vector step
// takes a scalar path.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kChunk = 32;      // keys scored per online-softmax update
constexpr int kMaxGroup = 16;   // query heads per KV head handled in one pass
constexpr float kMasked = -1e30f;

inline float Widen(float x) { return x; }
inline float Widen(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float Widen(int8_t x) { return static_cast<float>(x); }

// exp for x <= 0 (softmax after max subtraction); relative error about 2e-7, vectorizable.
inline float FastExp(float x) {
  x = std::max(x, -87.0f);
  float t = x * 1.44269504088896341f;
  float n = std::nearbyint(t);
  float f = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// Float lanes of the native vector width as a GCC vector type (AVX-512: 16, AVX: 8, else 4).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float FV __attribute__((vector_size(4 * kLanes)));
typedef uint32_t U32V __attribute__((vector_size(4 * kLanes)));
typedef int32_t I32V __attribute__((vector_size(4 * kLanes)));

inline FV Load(const float* p) {
  FV v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// Wide<T>::Load widens kStep stored elements into kStep / kLanes float vectors. bf16 loads
// kLanes 32-bit words and splits each into its even (low half << 16) and odd (high half, masked)
// element: no cross-lane shuffles, at the price of a permuted order that queries and accumulators
// share (see Permute).
template <typename T> struct Wide;
template <> struct Wide<float> {
  static constexpr int kStep = kLanes;
  static void Load(const float* p, FV* out) { out[0] = ::Load(p); }
};
template <> struct Wide<uint16_t> {
  static constexpr int kStep = 2 * kLanes;
  static void Load(const uint16_t* p, FV* out) {
    U32V w;
    std::memcpy(&w, p, sizeof w);
    const U32V even = w << 16, odd = w & 0xffff0000u;
    std::memcpy(&out[0], &even, sizeof(FV));
    std::memcpy(&out[1], &odd, sizeof(FV));
  }
};
template <> struct Wide<int8_t> {
  static constexpr int kStep = kLanes;
  static void Load(const int8_t* p, FV* out) {
    // GCC widens an int8 vector element by element; the intrinsics give one vpmovsxbd.
#if defined(__AVX512F__)
    out[0] = (FV)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
    out[0] = (FV)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
    for (int l = 0; l < kLanes; ++l) out[0][l] = p[l];
#endif
  }
};

// Orders x[0:dim] as Wide<T> delivers elements (identity unless a step holds 2 vectors); inverse
// with `back`.
template <typename T>
void Permute(float* x, int dim, bool back) {
  constexpr int kStep = Wide<T>::kStep;
  if (kStep == kLanes) return;
  float tmp[kStep];
  for (int d0 = 0; d0 < dim; d0 += kStep) {
    for (int i = 0; i < kStep; ++i) {
      const int packed = (i % 2) * kLanes + i / 2;  // element i of the step lives here
      if (back) tmp[i] = x[d0 + packed];
      else tmp[packed] = x[d0 + i];
    }
    std::memcpy(x + d0, tmp, sizeof tmp);
  }
}

inline FV Broadcast(float x) {
  FV v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
}
// A tree (__builtin_shuffle: any GCC since 4.7); a lane-by-lane loop is a serial chain of adds.
inline float Sum(FV v) {
#if defined(__AVX512F__)
  v += __builtin_shuffle(v, I32V{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, I32V{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, I32V{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
#elif defined(__AVX__)
  v += __builtin_shuffle(v, I32V{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, I32V{2, 3, 0, 1, 2, 3, 0, 1});
#else
  v += __builtin_shuffle(v, I32V{2, 3, 0, 1});
#endif
  return v[0] + v[1];
}

// Scores of `count` keys against G query rows (permuted like Wide<T>): s[h * kChunk + j]. Two
// keys per step keep 2G independent FMA chains in flight.
template <typename T, int G>
void ScoreVec(const float* q, const T* k, int count, int dim, float* s) {
  constexpr int kN = Wide<T>::kStep / kLanes;
  int j = 0;
  for (; j + 2 <= count; j += 2) {
    const T* k0 = k + static_cast<int64_t>(j) * dim;
    const T* k1 = k0 + dim;
    FV a0[G] = {}, a1[G] = {};
    for (int d = 0; d < dim; d += Wide<T>::kStep) {
      FV x0[kN], x1[kN];
      Wide<T>::Load(k0 + d, x0);
      Wide<T>::Load(k1 + d, x1);
      for (int h = 0; h < G; ++h)
        for (int i = 0; i < kN; ++i) {
          const FV qv = Load(q + h * dim + d + i * kLanes);
          a0[h] += qv * x0[i];
          a1[h] += qv * x1[i];
        }
    }
    for (int h = 0; h < G; ++h) {
      s[h * kChunk + j] = Sum(a0[h]);
      s[h * kChunk + j + 1] = Sum(a1[h]);
    }
  }
  for (; j < count; ++j) {
    const T* k0 = k + static_cast<int64_t>(j) * dim;
    FV a0[G] = {};
    for (int d = 0; d < dim; d += Wide<T>::kStep) {
      FV x0[kN];
      Wide<T>::Load(k0 + d, x0);
      for (int h = 0; h < G; ++h)
        for (int i = 0; i < kN; ++i) a0[h] += Load(q + h * dim + d + i * kLanes) * x0[i];
    }
    for (int h = 0; h < G; ++h) s[h * kChunk + j] = Sum(a0[h]);
  }
}

// acc[h, d0 : d0 + kLanes NB] += sum_j p[h * kChunk + j] v[j, ...] (permuted like Wide<T>), the
// accumulators held in registers.
template <typename T, int G, int NB>
void AccumulateBlock(const float* p, const T* v, int count, int dim, float* acc, int d0) {
  constexpr int kN = Wide<T>::kStep / kLanes;
  static_assert(NB % kN == 0);
  FV a[G][NB];
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < NB; ++b) a[h][b] = Load(acc + h * dim + d0 + b * kLanes);
  for (int j = 0; j < count; ++j) {
    FV x[NB];
    for (int b = 0; b < NB; b += kN)
      Wide<T>::Load(v + static_cast<int64_t>(j) * dim + d0 + b * kLanes, x + b);
    for (int h = 0; h < G; ++h) {
      const FV pj = Broadcast(p[h * kChunk + j]);
      for (int b = 0; b < NB; ++b) a[h][b] += pj * x[b];
    }
  }
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < NB; ++b) std::memcpy(acc + h * dim + d0 + b * kLanes, &a[h][b], sizeof(FV));
}

template <typename T, int G>
void AccumulateVec(const float* p, const T* v, int count, int dim, float* acc) {
  constexpr int kN = Wide<T>::kStep / kLanes;
  constexpr int kBlock = G >= 8 ? kN : std::max(kN, 8 / G);  // G * kBlock accumulator vectors
  int d0 = 0;
  for (; d0 + kBlock * kLanes <= dim; d0 += kBlock * kLanes)
    AccumulateBlock<T, G, kBlock>(p, v, count, dim, acc, d0);
  for (; d0 < dim; d0 += kN * kLanes) AccumulateBlock<T, G, kN>(p, v, count, dim, acc, d0);
}

inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

// Online-softmax step over one chunk of scores s[0:kChunk] (in place -> exp(s - new max)): updates
// the running max m and sum l; returns the factor to rescale the accumulator by.
inline float SoftmaxChunk(float* s, float& m, float& l) {
  static_assert(kChunk % kLanes == 0);
  FV mv = Load(s);
  for (int i = kLanes; i < kChunk; i += kLanes) {
    const FV x = Load(s + i);
    mv = mv > x ? mv : x;
  }
  float mx = m;
  for (int i = 0; i < kLanes; ++i) mx = std::max(mx, mv[i]);
  for (int j = 0; j < kChunk; ++j) s[j] = FastExp(s[j] - mx);
  FV sum = Load(s);
  for (int i = kLanes; i < kChunk; i += kLanes) sum += Load(s + i);
  const float corr = FastExp(m - mx);
  m = mx;
  l = l * corr + Sum(sum);
  return corr;
}

// Generic scalar loops for head_dim not a multiple of Wide<T>::kStep (no permutation).
template <typename T>
void ScoreAny(const float* q, int group, const T* k, int count, int dim, float* s) {
  for (int j = 0; j < count; ++j)
    for (int h = 0; h < group; ++h) {
      float a = 0.0f;
      for (int d = 0; d < dim; ++d) a += q[h * dim + d] * Widen(k[static_cast<int64_t>(j) * dim + d]);
      s[h * kChunk + j] = a;
    }
}

template <typename T>
void AccumulateAny(const float* p, int group, const T* v, int count, int dim, float* acc) {
  for (int j = 0; j < count; ++j)
    for (int h = 0; h < group; ++h)
      for (int d = 0; d < dim; ++d)
        acc[h * dim + d] += p[h * kChunk + j] * Widen(v[static_cast<int64_t>(j) * dim + d]);
}

// Query heads of a group run in sub-groups of 16, 8, 4, 2, 1 so G is a compile-time constant.
template <typename T>
void Score(const float* q, int group, const T* k, int count, int dim, float* s) {
  if (dim % Wide<T>::kStep) return ScoreAny(q, group, k, count, dim, s);
  for (int h = 0; h < group;) {
    const int left = group - h;
    const float* qh = q + h * dim;
    float* sh = s + h * kChunk;
    if (left >= 16) ScoreVec<T, 16>(qh, k, count, dim, sh), h += 16;
    else if (left >= 8) ScoreVec<T, 8>(qh, k, count, dim, sh), h += 8;
    else if (left >= 4) ScoreVec<T, 4>(qh, k, count, dim, sh), h += 4;
    else if (left >= 2) ScoreVec<T, 2>(qh, k, count, dim, sh), h += 2;
    else ScoreVec<T, 1>(qh, k, count, dim, sh), h += 1;
  }
}

template <typename T>
void Accumulate(const float* p, int group, const T* v, int count, int dim, float* acc) {
  if (dim % Wide<T>::kStep) return AccumulateAny(p, group, v, count, dim, acc);
  for (int h = 0; h < group;) {
    const int left = group - h;
    const float* ph = p + h * kChunk;
    float* ah = acc + h * dim;
    if (left >= 16) AccumulateVec<T, 16>(ph, v, count, dim, ah), h += 16;
    else if (left >= 8) AccumulateVec<T, 8>(ph, v, count, dim, ah), h += 8;
    else if (left >= 4) AccumulateVec<T, 4>(ph, v, count, dim, ah), h += 4;
    else if (left >= 2) AccumulateVec<T, 2>(ph, v, count, dim, ah), h += 2;
    else AccumulateVec<T, 1>(ph, v, count, dim, ah), h += 1;
  }
}

struct Dims {
  int64_t tokens, heads, dim, max_pages, num_pages, kv_heads, page_size;
};

// One (token, KV head): out[h] for the group's query heads.
template <typename T>
ffi::Error AttendOne(const Dims& dm, const float* q, const int32_t* table, int32_t position,
                     const T* k_pool, const T* v_pool, const float* k_scale,
                     const float* v_scale, int kv_head, int group, float* out,
                     std::vector<float>& work) {
  const int64_t dim = dm.dim;
  float* qs = work.data();                     // [group, dim] scaled queries
  float* acc = qs + group * dim;               // [group, dim]
  float* s = acc + group * dim;                // [group, kChunk]
  float m[kMaxGroup], l[kMaxGroup];
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int i = 0; i < group * dim; ++i) {
    qs[i] = q[i] * scale;
    acc[i] = 0.0f;
  }
  const bool permuted = dim % Wide<T>::kStep == 0;  // the vector path's element order
  if (permuted)
    for (int h = 0; h < group; ++h) Permute<T>(qs + h * dim, static_cast<int>(dim), false);
  for (int h = 0; h < group; ++h) {
    m[h] = kMasked;
    l[h] = 0.0f;
  }
  const int64_t length = static_cast<int64_t>(position) + 1;
  const int64_t pages = (length + dm.page_size - 1) / dm.page_size;
  for (int64_t pi = 0; pi < pages; ++pi) {
    const int32_t page = table[pi];
    if (page < 0 || page >= dm.num_pages)
      return ffi::Error::InvalidArgument("block_tables entry " + std::to_string(page) +
                                         " (page " + std::to_string(pi) +
                                         ") outside the pool of " + std::to_string(dm.num_pages) +
                                         " pages");
    const int64_t row0 = (static_cast<int64_t>(page) * dm.kv_heads + kv_head) * dm.page_size;
    const int64_t in_page = std::min<int64_t>(dm.page_size, length - pi * dm.page_size);
    for (int64_t j0 = 0; j0 < in_page; j0 += kChunk) {
      const int count = static_cast<int>(std::min<int64_t>(kChunk, in_page - j0));
      const int64_t row = row0 + j0;
      // The chunk's V rows are contiguous: fetch them while the scores are computed.
      Prefetch(v_pool + row * dim, count * dim * sizeof(T));
      if (j0 + kChunk < in_page) Prefetch(k_pool + (row + kChunk) * dim, kChunk * dim * sizeof(T));
      else if (pi + 1 < pages && table[pi + 1] >= 0 && table[pi + 1] < dm.num_pages)
        Prefetch(k_pool + (static_cast<int64_t>(table[pi + 1]) * dm.kv_heads + kv_head) *
                              dm.page_size * dim, kChunk * dim * sizeof(T));
      Score(qs, group, k_pool + row * dim, count, static_cast<int>(dim), s);
      for (int h = 0; h < group; ++h) {
        float* sh = s + h * kChunk;
        if (k_scale)
          for (int j = 0; j < count; ++j) sh[j] *= k_scale[row + j];
        for (int j = count; j < kChunk; ++j) sh[j] = kMasked;  // exp gives 0: full-width vectors
        const float corr = SoftmaxChunk(sh, m[h], l[h]);
        float* ah = acc + h * dim;
        if (corr != 1.0f)
          for (int64_t d = 0; d < dim; ++d) ah[d] *= corr;
        if (v_scale)
          for (int j = 0; j < count; ++j) sh[j] *= v_scale[row + j];
      }
      Accumulate(s, group, v_pool + row * dim, count, static_cast<int>(dim), acc);
    }
  }
  for (int h = 0; h < group; ++h) {
    if (permuted) Permute<T>(acc + h * dim, static_cast<int>(dim), true);
    const float inv = 1.0f / l[h];
    for (int64_t d = 0; d < dim; ++d) out[h * dim + d] = acc[h * dim + d] * inv;
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error Attend(const float* q, const int32_t* tables, const int32_t* positions,
                  const T* k_pool, const T* v_pool, const float* k_scale, const float* v_scale,
                  float* out, const Dims& dm) {
  if (dm.kv_heads <= 0 || dm.heads % dm.kv_heads != 0)
    return ffi::Error::InvalidArgument("q heads " + std::to_string(dm.heads) +
                                       " not a multiple of pool kv_heads " +
                                       std::to_string(dm.kv_heads));
  const int group = static_cast<int>(dm.heads / dm.kv_heads);
  if (group > kMaxGroup)
    return ffi::Error::InvalidArgument("query heads per KV head " + std::to_string(group) +
                                       " above " + std::to_string(kMaxGroup));
  std::vector<float> work(2 * group * dm.dim + group * kChunk);
  for (int64_t n = 0; n < dm.tokens; ++n) {
    const int32_t position = positions[n];
    float* out_n = out + n * dm.heads * dm.dim;
    if (position < 0) {
      std::fill(out_n, out_n + dm.heads * dm.dim, 0.0f);
      continue;
    }
    if (position >= dm.max_pages * dm.page_size)
      return ffi::Error::InvalidArgument("positions[" + std::to_string(n) + "] = " +
                                         std::to_string(position) + " beyond block_tables' " +
                                         std::to_string(dm.max_pages) + " pages");
    for (int g = 0; g < dm.kv_heads; ++g) {
      const int64_t qoff = (n * dm.heads + static_cast<int64_t>(g) * group) * dm.dim;
      ffi::Error err = AttendOne(dm, q + qoff, tables + n * dm.max_pages, position, k_pool,
                                 v_pool, k_scale, v_scale, g, group, out + qoff, work);
      if (!err.success()) return err;
    }
  }
  return ffi::Error::Success();
}

template <typename Pool>
Dims GetDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::S32>& tables,
             const Pool& k_pool) {
  auto qd = q.dimensions();
  auto td = tables.dimensions();
  auto pd = k_pool.dimensions();
  return Dims{qd[0], qd[1], qd[2], td[1], pd[0], pd[1], pd[2]};
}

template <ffi::DataType kType>
ffi::Error AttendPlain(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> tables,
                       ffi::Buffer<ffi::S32> positions, ffi::Buffer<kType> k_pool,
                       ffi::Buffer<kType> v_pool, ffi::ResultBuffer<ffi::F32> out) {
  return Attend(q.typed_data(), tables.typed_data(), positions.typed_data(),
                k_pool.typed_data(), v_pool.typed_data(), nullptr, nullptr, out->typed_data(),
                GetDims(q, tables, k_pool));
}

ffi::Error AttendInt8(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> tables,
                      ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S8> k_pool,
                      ffi::Buffer<ffi::S8> v_pool, ffi::Buffer<ffi::F32> k_scale,
                      ffi::Buffer<ffi::F32> v_scale, ffi::ResultBuffer<ffi::F32> out) {
  return Attend(q.typed_data(), tables.typed_data(), positions.typed_data(),
                k_pool.typed_data(), v_pool.typed_data(), k_scale.typed_data(),
                v_scale.typed_data(), out->typed_data(), GetDims(q, tables, k_pool));
}

}  // namespace

#define PLAIN_BINDING(T)                                                                  \
  ffi::Ffi::Bind()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<T>>()                                                              \
      .Arg<ffi::Buffer<T>>()                                                              \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32, AttendPlain<ffi::F32>, PLAIN_BINDING(ffi::F32));
// bf16 pools arrive as uint16: XLA's CPU scatter into a bf16 buffer converts the whole buffer.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionBF16, AttendPlain<ffi::U16>, PLAIN_BINDING(ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionInt8, AttendInt8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
