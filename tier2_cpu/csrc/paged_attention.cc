// Paged decode/prefill attention over a KV pool stored as float32, bfloat16 or int8, called from
// JAX through the XLA FFI on the CPU device.
//
// Pool layout: K [num_pages, kv_heads, head_dim, page_size] (each page transposed: a row holds one
// dimension of all the page's keys), V [num_pages, kv_heads, page_size, head_dim]; int8 scales
// [num_pages, kv_heads, page_size] (one per token and KV head). Query token n attends positions
// 0..positions[n] of the pages listed in block_tables[n]; positions[n] < 0 marks a padding row
// (output zeros). The output is float32, or bf16 bits rounded to nearest even while it is stored
// (the server's reply dtype: NumPy's cast of a decode call's output cost more than the rounding here).
// For each (token, KV head) the kernel streams the pages once for all query heads of the group
// (GQA), one page per online-softmax update: the transposed K page puts keys in vector lanes, so
// a page's scores are G vectors of FMAs with broadcast query elements (no horizontal sums), the
// softmax runs on those vectors (vectorized exp, one max and one sum reduction per head and page),
// and V rows accumulate into registers. Accumulators are float32; stored elements widen to
// float32 in registers (bf16: a 16-bit shift; int8: sign-extend and convert, times the row's
// scale), so XLA's slow bf16 CPU dot is never involved. Vectors are GCC vector types at the
// native width, so the same source builds with -march=native for AVX-512, AVX2 or plain SSE;
// page_size or head_dim off the vector width take scalar loops.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

inline float Narrow(float x, float*) { return x; }
inline uint16_t Narrow(float x, uint16_t*) { return RoundToBF16(x); }

// exp for x <= 0 (softmax after max subtraction); relative error about 2e-7.
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
constexpr int kRegs = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRegs = 16;
#else
constexpr int kLanes = 4;
constexpr int kRegs = 16;
#endif
typedef float FV __attribute__((vector_size(4 * kLanes)));
typedef uint32_t U32V __attribute__((vector_size(4 * kLanes)));
typedef int32_t I32V __attribute__((vector_size(4 * kLanes)));
typedef uint16_t U16V __attribute__((vector_size(2 * kLanes)));

inline FV Load(const float* p) {
  FV v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, FV v) { std::memcpy(p, &v, sizeof v); }
// One vbroadcastss (a lane loop lets GCC's SLP pass shuffle neighbouring broadcasts via the stack).
inline FV Broadcast(float x) {
#if defined(__AVX512F__)
  return (FV)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (FV)_mm256_set1_ps(x);
#else
  FV v;
  for (int l = 0; l < kLanes; ++l) v[l] = x;
  return v;
#endif
}

// kLanes consecutive stored elements (one K row of a page: kLanes keys) as floats.
inline FV WidenLanes(const float* p) { return Load(p); }
inline FV WidenLanes(const uint16_t* p) {
#if defined(__AVX512F__)
  // GCC splits the generic conversion into two 256-bit halves; this is one vpmovzxwd.
  return (FV)_mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#else
  U16V h;
  std::memcpy(&h, p, sizeof h);
  const U32V w = __builtin_convertvector(h, U32V) << 16;
  FV f;
  std::memcpy(&f, &w, sizeof f);
  return f;
#endif
}
inline FV WidenLanes(const int8_t* p) {
  // GCC widens an int8 vector element by element; the intrinsics give one vpmovsxbd.
#if defined(__AVX512F__)
  return (FV)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return (FV)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
  FV out;
  for (int l = 0; l < kLanes; ++l) out[l] = p[l];
  return out;
#endif
}

// Wide<T>::Load widens kStep stored elements of a V row into kStep / kLanes float vectors. bf16
// loads kLanes 32-bit words and splits each into its even (low half << 16) and odd (high half,
// masked) element: no cross-lane shuffles, at the price of a permuted order of the accumulators
// (see Permute).
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
  static void Load(const int8_t* p, FV* out) { out[0] = WidenLanes(p); }
};

// Puts x[0:dim], held in the order Wide<T> delivers elements, back in natural order (identity
// unless a step holds 2 vectors).
template <typename T>
void Unpermute(float* x, int dim) {
  constexpr int kStep = Wide<T>::kStep;
  if (kStep == kLanes) return;
  float tmp[kStep];
  for (int d0 = 0; d0 < dim; d0 += kStep) {
    for (int i = 0; i < kStep; ++i) tmp[i] = x[d0 + (i % 2) * kLanes + i / 2];
    std::memcpy(x + d0, tmp, sizeof tmp);
  }
}

// Horizontal reductions as trees (__builtin_shuffle: any GCC since 4.7); a lane-by-lane loop is a
// serial chain.
template <typename Op>
inline float Reduce(FV v, Op op) {
#if defined(__AVX512F__)
  v = op(v, __builtin_shuffle(v, I32V{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = op(v, __builtin_shuffle(v, I32V{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3}));
  v = op(v, __builtin_shuffle(v, I32V{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1}));
#elif defined(__AVX__)
  v = op(v, __builtin_shuffle(v, I32V{4, 5, 6, 7, 0, 1, 2, 3}));
  v = op(v, __builtin_shuffle(v, I32V{2, 3, 0, 1, 2, 3, 0, 1}));
#else
  v = op(v, __builtin_shuffle(v, I32V{2, 3, 0, 1}));
#endif
  return op(v, __builtin_shuffle(v, I32V{1}))[0];
}
inline float Sum(FV v) { return Reduce(v, [](FV a, FV b) { return a + b; }); }
inline float Max(FV v) { return Reduce(v, [](FV a, FV b) { return a > b ? a : b; }); }

// FastExp on a vector (x <= 0): rounding by adding and subtracting 1.5 * 2^23.
inline FV ExpV(FV x) {
  const FV lo = Broadcast(-87.0f), magic = Broadcast(12582912.0f);
  x = x > lo ? x : lo;
  const FV n = (x * Broadcast(1.44269504088896341f) + magic) - magic;
  const FV f = x - n * Broadcast(0.693145751953125f) - n * Broadcast(1.428606765330187e-06f);
  FV p = Broadcast(1.9875691500e-4f);
  p = p * f + Broadcast(1.3981999507e-3f);
  p = p * f + Broadcast(8.3334519073e-3f);
  p = p * f + Broadcast(4.1665795894e-2f);
  p = p * f + Broadcast(1.6666665459e-1f);
  p = p * f + Broadcast(5.0000001201e-1f);
  p = p * f * f + f + Broadcast(1.0f);
  const I32V e = (__builtin_convertvector(n, I32V) + 127) << 23;
  FV scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// Scores of all P keys of a transposed K page k: [dim, P] (P a multiple of NC kLanes) against G
// query rows q: [G, dim]: s[h * stride + j]. Each broadcast query element feeds NC key vectors;
// kSplit sums even and odd dimensions separately, so that at least 8 FMA chains are in flight.
// Out of line (one call per page and sub-group): keeps its registers to itself; profiles name it.
template <typename T, int G, int NC>
__attribute__((noinline)) void ScorePage(const float* q, const T* k, int dim, int P, float* s,
                                         int stride) {
  constexpr int kSplit = G * NC < 8 ? 2 : 1;
  for (int c = 0; c < P; c += NC * kLanes) {
    FV a[kSplit][G][NC] = {};
    int d = 0;
    for (; d + kSplit <= dim; d += kSplit)
      for (int u = 0; u < kSplit; ++u) {
        FV x[NC];
        for (int i = 0; i < NC; ++i)
          x[i] = WidenLanes(k + static_cast<int64_t>(d + u) * P + c + i * kLanes);
        for (int h = 0; h < G; ++h) {
          const FV qv = Broadcast(q[h * dim + d + u]);
          for (int i = 0; i < NC; ++i) a[u][h][i] += qv * x[i];
        }
      }
    for (; d < dim; ++d)
      for (int h = 0; h < G; ++h)
        for (int i = 0; i < NC; ++i)
          a[0][h][i] += Broadcast(q[h * dim + d]) *
                        WidenLanes(k + static_cast<int64_t>(d) * P + c + i * kLanes);
    for (int h = 0; h < G; ++h)
      for (int i = 0; i < NC; ++i) {
        FV r = a[0][h][i];
        for (int u = 1; u < kSplit; ++u) r += a[u][h][i];
        Store(s + h * stride + c + i * kLanes, r);
      }
  }
}

// Two key vectors per pass where the page and the registers allow.
template <typename T, int G>
void ScorePage(const float* q, const T* k, int dim, int P, float* s, int stride) {
  if (P % (2 * kLanes) == 0 && 2 * G <= kRegs * 3 / 4)
    return ScorePage<T, G, 2>(q, k, dim, P, s, stride);
  ScorePage<T, G, 1>(q, k, dim, P, s, stride);
}

// Scalar scores for page_size off the vector width.
template <typename T>
void ScoreAny(const float* q, int group, const T* k, int count, int dim, int P, float* s,
              int stride) {
  for (int h = 0; h < group; ++h)
    for (int j = 0; j < count; ++j) {
      float a = 0.0f;
      for (int d = 0; d < dim; ++d) a += q[h * dim + d] * Widen(k[static_cast<int64_t>(d) * P + j]);
      s[h * stride + j] = a;
    }
}

// Query heads of a group run in sub-groups of 8, 4, 2, 1 so G is a compile-time constant.
template <typename T>
void Score(const float* q, int group, const T* k, int count, int dim, int P, float* s,
           int stride) {
  if (P % kLanes) return ScoreAny(q, group, k, count, dim, P, s, stride);
  for (int h = 0; h < group;) {
    const int left = group - h;
    const float* qh = q + h * dim;
    float* sh = s + h * stride;
    if (left >= 8) ScorePage<T, 8>(qh, k, dim, P, sh, stride), h += 8;
    else if (left >= 4) ScorePage<T, 4>(qh, k, dim, P, sh, stride), h += 4;
    else if (left >= 2) ScorePage<T, 2>(qh, k, dim, P, sh, stride), h += 2;
    else ScorePage<T, 1>(qh, k, dim, P, sh, stride), h += 1;
  }
}

// acc[h, d0 : d0 + kLanes NB] += sum_j p[h * stride + j] v[j, ...] (permuted like Wide<T>), the
// accumulators held in registers.
template <typename T, int G, int NB>
void AccumulateBlock(const float* p, int stride, const T* v, int count, int dim, float* acc,
                     int d0) {
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
      const FV pj = Broadcast(p[h * stride + j]);
      for (int b = 0; b < NB; ++b) a[h][b] += pj * x[b];
    }
  }
  for (int h = 0; h < G; ++h)
    for (int b = 0; b < NB; ++b) Store(acc + h * dim + d0 + b * kLanes, a[h][b]);
}

template <typename T, int G>
void AccumulateVec(const float* p, int stride, const T* v, int count, int dim, float* acc) {
  constexpr int kN = Wide<T>::kStep / kLanes;
  constexpr int kAcc = kRegs / 2;  // accumulator registers, the rest for V and p
  constexpr int kBlock = std::max(kN, kAcc / G);
  int d0 = 0;
  for (; d0 + kBlock * kLanes <= dim; d0 += kBlock * kLanes)
    AccumulateBlock<T, G, kBlock>(p, stride, v, count, dim, acc, d0);
  for (; d0 < dim; d0 += kN * kLanes) AccumulateBlock<T, G, kN>(p, stride, v, count, dim, acc, d0);
}

template <typename T>
void AccumulateAny(const float* p, int stride, int group, const T* v, int count, int dim,
                   float* acc) {
  for (int j = 0; j < count; ++j)
    for (int h = 0; h < group; ++h)
      for (int d = 0; d < dim; ++d)
        acc[h * dim + d] += p[h * stride + j] * Widen(v[static_cast<int64_t>(j) * dim + d]);
}

template <typename T>
void Accumulate(const float* p, int stride, int group, const T* v, int count, int dim,
                float* acc) {
  if (dim % Wide<T>::kStep) return AccumulateAny(p, stride, group, v, count, dim, acc);
  for (int h = 0; h < group;) {
    const int left = group - h;
    const float* ph = p + h * stride;
    float* ah = acc + h * dim;
    if (left >= 16) AccumulateVec<T, 16>(ph, stride, v, count, dim, ah), h += 16;
    else if (left >= 8) AccumulateVec<T, 8>(ph, stride, v, count, dim, ah), h += 8;
    else if (left >= 4) AccumulateVec<T, 4>(ph, stride, v, count, dim, ah), h += 4;
    else if (left >= 2) AccumulateVec<T, 2>(ph, stride, v, count, dim, ah), h += 2;
    else AccumulateVec<T, 1>(ph, stride, v, count, dim, ah), h += 1;
  }
}

// Online-softmax step over one page's scores s[0:n] (n a multiple of kLanes; masked lanes hold
// kMasked), in place -> exp(s - new max): updates the running max m and sum l; returns the factor
// to rescale the accumulator by.
inline float SoftmaxPage(float* s, int n, float& m, float& l) {
  FV mv = Load(s);
  for (int i = kLanes; i < n; i += kLanes) {
    const FV x = Load(s + i);
    mv = mv > x ? mv : x;
  }
  const float mx = std::max(m, Max(mv));
  const FV mxv = Broadcast(mx);
  FV sum = {};
  for (int i = 0; i < n; i += kLanes) {
    const FV e = ExpV(Load(s + i) - mxv);
    Store(s + i, e);
    sum += e;
  }
  const float corr = FastExp(m - mx);
  m = mx;
  l = l * corr + Sum(sum);
  return corr;
}

inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

struct Dims {
  int64_t tokens, heads, dim, max_pages, num_pages, kv_heads, page_size;
};

// One (token, KV head): out[h] for the group's query heads.
template <typename T, typename O>
ffi::Error AttendOne(const Dims& dm, const float* q, const int32_t* table, int32_t position,
                     const T* k_pool, const T* v_pool, const float* k_scale,
                     const float* v_scale, int kv_head, int group, O* out,
                     std::vector<float>& work) {
  const int dim = static_cast<int>(dm.dim);
  const int P = static_cast<int>(dm.page_size);
  const int stride = (P + kLanes - 1) / kLanes * kLanes;  // scores per head, padded to vectors
  const int64_t page_elems = static_cast<int64_t>(P) * dim;
  float* qs = work.data();                     // [group, dim] scaled queries
  float* acc = qs + group * dim;               // [group, dim]
  float* s = acc + group * dim;                // [group, stride]
  float m[kMaxGroup], l[kMaxGroup];
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  for (int i = 0; i < group * dim; ++i) {
    qs[i] = q[i] * scale;
    acc[i] = 0.0f;
  }
  for (int h = 0; h < group; ++h) {
    m[h] = kMasked;
    l[h] = 0.0f;
  }
  const int64_t length = static_cast<int64_t>(position) + 1;
  const int64_t pages = (length + P - 1) / P;
  for (int64_t pi = 0; pi < pages; ++pi) {
    const int32_t page = table[pi];
    if (page < 0 || page >= dm.num_pages)
      return ffi::Error::InvalidArgument("block_tables entry " + std::to_string(page) +
                                         " (page " + std::to_string(pi) +
                                         ") outside the pool of " + std::to_string(dm.num_pages) +
                                         " pages");
    const int64_t row0 = (static_cast<int64_t>(page) * dm.kv_heads + kv_head) * P;
    // The next page's K and V, fetched while this page's scores and then sums are computed.
    const T* next_k = nullptr;
    const T* next_v = nullptr;
    if (pi + 1 < pages && table[pi + 1] >= 0 && table[pi + 1] < dm.num_pages) {
      const int64_t next = (static_cast<int64_t>(table[pi + 1]) * dm.kv_heads + kv_head) * P;
      next_k = k_pool + next * dim;
      next_v = v_pool + next * dim;
    }
    const int count = static_cast<int>(std::min<int64_t>(P, length - pi * P));
    if (next_k) Prefetch(next_k, page_elems * sizeof(T));
    Score(qs, group, k_pool + row0 * dim, count, dim, P, s, stride);
    for (int h = 0; h < group; ++h) {
      float* sh = s + h * stride;
      if (k_scale)
        for (int j = 0; j < count; ++j) sh[j] *= k_scale[row0 + j];
      for (int j = count; j < stride; ++j) sh[j] = kMasked;  // exp gives 0
      const float corr = SoftmaxPage(sh, stride, m[h], l[h]);
      float* ah = acc + h * dim;
      if (corr != 1.0f)
        for (int d = 0; d < dim; ++d) ah[d] *= corr;
      if (v_scale)
        for (int j = 0; j < count; ++j) sh[j] *= v_scale[row0 + j];
    }
    if (next_v) Prefetch(next_v, page_elems * sizeof(T));
    Accumulate(s, stride, group, v_pool + row0 * dim, count, dim, acc);
  }
  for (int h = 0; h < group; ++h) {
    if (dim % Wide<T>::kStep == 0) Unpermute<T>(acc + h * dim, dim);
    const float inv = 1.0f / l[h];
    for (int d = 0; d < dim; ++d) out[h * dim + d] = Narrow(acc[h * dim + d] * inv, out);
  }
  return ffi::Error::Success();
}

// The (token, KV head) items of a call, split into chunks that the caller and the XLA CPU thread
// pool's workers take in turn. Workers hold the state through a shared_ptr: one that starts after
// the call has returned finds no chunk left and touches nothing else.
template <typename T, typename O>
struct Job {
  Dims dm;
  int group;
  const float* q;
  const int32_t* tables;
  const int32_t* positions;
  const T* k_pool;
  const T* v_pool;
  const float* k_scale;
  const float* v_scale;
  O* out;
  int64_t chunk, num_chunks;
  std::atomic<int64_t> next{0}, done{0};
  std::mutex mu;
  std::condition_variable all_done;
  std::string error;  // the first failure, "" if none

  // Takes chunks until none is left; the last one to finish wakes the caller.
  void Work() {
    const int64_t stride = (dm.page_size + kLanes - 1) / kLanes * kLanes;
    std::vector<float> work(2 * group * dm.dim + group * stride);
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t end = std::min(dm.tokens * dm.kv_heads, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) {
        const int64_t n = i / dm.kv_heads;
        const int g = static_cast<int>(i % dm.kv_heads);
        const int64_t qoff = (n * dm.heads + static_cast<int64_t>(g) * group) * dm.dim;
        if (positions[n] < 0) {  // padding row: zeros
          std::fill(out + qoff, out + qoff + group * dm.dim, O(0));
          continue;
        }
        ffi::Error err = AttendOne(dm, q + qoff, tables + n * dm.max_pages, positions[n], k_pool,
                                   v_pool, k_scale, v_scale, g, group, out + qoff, work);
        if (!err.success()) {
          std::lock_guard<std::mutex> lock(mu);
          if (error.empty()) error = err.message();
        }
      }
      if (done.fetch_add(1) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

// Keys read per extra thread: below this a call runs on the caller's thread alone (a task costs
// microseconds; a short decode call's whole work is about that).
constexpr int64_t kKeysPerThread = 16384;

template <typename T, typename O>
ffi::Error Attend(const float* q, const int32_t* tables, const int32_t* positions,
                  const T* k_pool, const T* v_pool, const float* k_scale, const float* v_scale,
                  O* out, const Dims& dm, ffi::ThreadPool pool) {
  if (dm.kv_heads <= 0 || dm.heads % dm.kv_heads != 0)
    return ffi::Error::InvalidArgument("q heads " + std::to_string(dm.heads) +
                                       " not a multiple of pool kv_heads " +
                                       std::to_string(dm.kv_heads));
  const int group = static_cast<int>(dm.heads / dm.kv_heads);
  if (group > kMaxGroup)
    return ffi::Error::InvalidArgument("query heads per KV head " + std::to_string(group) +
                                       " above " + std::to_string(kMaxGroup));
  int64_t keys = 0;
  for (int64_t n = 0; n < dm.tokens; ++n) {
    if (positions[n] >= dm.max_pages * dm.page_size)
      return ffi::Error::InvalidArgument("positions[" + std::to_string(n) + "] = " +
                                         std::to_string(positions[n]) + " beyond block_tables' " +
                                         std::to_string(dm.max_pages) + " pages");
    keys += std::max<int64_t>(positions[n] + 1, 0) * dm.kv_heads;
  }
  const int64_t items = dm.tokens * dm.kv_heads;
  const int64_t threads = std::max<int64_t>(
      1, std::min({pool.num_threads(), keys / kKeysPerThread, items}));
  auto job = std::make_shared<Job<T, O>>();
  job->dm = dm;
  job->group = group;
  job->q = q;
  job->tables = tables;
  job->positions = positions;
  job->k_pool = k_pool;
  job->v_pool = v_pool;
  job->k_scale = k_scale;
  job->v_scale = v_scale;
  job->out = out;
  job->chunk = std::max<int64_t>(1, items / (16 * threads));  // a few chunks per thread: balance
  job->num_chunks = (items + job->chunk - 1) / job->chunk;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->all_done.wait(lock, [&] { return job->done.load() == job->num_chunks; });
  }
  if (!job->error.empty()) return ffi::Error::InvalidArgument(job->error);
  return ffi::Error::Success();
}

// Sizes from q [tokens, heads, dim], block_tables [tokens, max_pages] and the V pool
// [num_pages, kv_heads, page_size, dim].
template <typename Pool>
Dims GetDims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::S32>& tables,
             const Pool& v_pool) {
  auto qd = q.dimensions();
  auto td = tables.dimensions();
  auto pd = v_pool.dimensions();
  return Dims{qd[0], qd[1], qd[2], td[1], pd[0], pd[1], pd[2]};
}

template <ffi::DataType kType, ffi::DataType kOut>
ffi::Error AttendPlain(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> tables,
                       ffi::Buffer<ffi::S32> positions, ffi::Buffer<kType> k_pool,
                       ffi::Buffer<kType> v_pool, ffi::ResultBuffer<kOut> out,
                       ffi::ThreadPool pool) {
  return Attend(q.typed_data(), tables.typed_data(), positions.typed_data(),
                k_pool.typed_data(), v_pool.typed_data(), nullptr, nullptr, out->typed_data(),
                GetDims(q, tables, v_pool), pool);
}

template <ffi::DataType kOut>
ffi::Error AttendInt8(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> tables,
                      ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S8> k_pool,
                      ffi::Buffer<ffi::S8> v_pool, ffi::Buffer<ffi::F32> k_scale,
                      ffi::Buffer<ffi::F32> v_scale, ffi::ResultBuffer<kOut> out,
                      ffi::ThreadPool pool) {
  return Attend(q.typed_data(), tables.typed_data(), positions.typed_data(),
                k_pool.typed_data(), v_pool.typed_data(), k_scale.typed_data(),
                v_scale.typed_data(), out->typed_data(), GetDims(q, tables, v_pool), pool);
}

}  // namespace

// Bindings by pool storage and output (F32, or bf16 bits as U16: "...ToBF16").
#define PLAIN_BINDING(T, OUT)                                                             \
  ffi::Ffi::Bind()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<T>>()                                                              \
      .Arg<ffi::Buffer<T>>()                                                              \
      .Ret<ffi::Buffer<OUT>>()                                                            \
      .Ctx<ffi::ThreadPool>()
#define INT8_BINDING(OUT)                                                                 \
  ffi::Ffi::Bind()                                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S32>>()                                                       \
      .Arg<ffi::Buffer<ffi::S8>>()                                                        \
      .Arg<ffi::Buffer<ffi::S8>>()                                                        \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Arg<ffi::Buffer<ffi::F32>>()                                                       \
      .Ret<ffi::Buffer<OUT>>()                                                            \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32, (AttendPlain<ffi::F32, ffi::F32>),
                              PLAIN_BINDING(ffi::F32, ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32ToBF16, (AttendPlain<ffi::F32, ffi::U16>),
                              PLAIN_BINDING(ffi::F32, ffi::U16));
// bf16 pools arrive as uint16: XLA's CPU scatter into a bf16 buffer converts the whole buffer.
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionBF16, (AttendPlain<ffi::U16, ffi::F32>),
                              PLAIN_BINDING(ffi::U16, ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionBF16ToBF16, (AttendPlain<ffi::U16, ffi::U16>),
                              PLAIN_BINDING(ffi::U16, ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionInt8, AttendInt8<ffi::F32>, INT8_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionInt8ToBF16, AttendInt8<ffi::U16>, INT8_BINDING(ffi::U16));
