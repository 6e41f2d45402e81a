// One implementation of PassKernels (pass_kernels.h), included once per instruction set
// by pass_kernels_<isa>.cpp, which defines UNIREP_ISA (the namespace of that build) and
// UNIREP_ISA_NAME, and for the x86 builds UNIREP_AVX2 or UNIREP_AVX512 (intrinsics for the
// half conversions and non-temporal stores); without them the half conversions are done
// in portable vector arithmetic.
//
// Everything here has internal linkage (an unnamed namespace) except the table `kernels`:
// code compiled for one instruction set must never be picked by the linker for another.
// Hence also no standard-library or ATen calls in this file: only builtins and intrinsics.
//
// Vectors are 16, 32 or 64 bytes (baseline, AVX2, AVX-512). Reductions keep 4 vector
// accumulators (independent dependency chains) and sum them in a fixed order: results are
// deterministic for a given instruction set (they differ between sets in the last bits of
// the sums, as ATen's own vectorized kernels do).
#ifndef UNIREP_ISA
#error "define UNIREP_ISA before including pass_kernels_impl.h"
#endif

#include <cstdint>

#include "pass_kernels.h"

// Vector size in bytes: the widest the build's instruction set handles natively (64 for
// AVX-512, 32 for AVX2; 16 for the baseline: SSE2 or NEON, where wider vectors would be
// split into halves for arithmetic but lane by lane for compares and selects).
#if defined(UNIREP_AVX512)
#define UNIREP_VECTOR_BYTES 64
#elif defined(UNIREP_AVX2)
#define UNIREP_VECTOR_BYTES 32
#else
#define UNIREP_VECTOR_BYTES 16
#endif

namespace unirep {
namespace cpu {
namespace UNIREP_ISA {
namespace {

typedef float vf __attribute__((vector_size(UNIREP_VECTOR_BYTES)));
typedef double vd __attribute__((vector_size(UNIREP_VECTOR_BYTES)));
typedef int32_t vi32 __attribute__((vector_size(UNIREP_VECTOR_BYTES)));
typedef uint32_t vu32 __attribute__((vector_size(UNIREP_VECTOR_BYTES)));
typedef uint16_t vu16 __attribute__((vector_size(UNIREP_VECTOR_BYTES / 2)));

// Element types: how a value is stored, and the type it is computed in.
struct F32 {
  typedef float storage;
  typedef float acc;
  typedef vf vec;
};
struct F64 {
  typedef double storage;
  typedef double acc;
  typedef vd vec;
};
struct F16 {
  typedef uint16_t storage;
  typedef float acc;
  typedef vf vec;
};
struct BF16 {
  typedef uint16_t storage;
  typedef float acc;
  typedef vf vec;
};

template <typename E>
constexpr int lanes() {
  return static_cast<int>(sizeof(typename E::vec) / sizeof(typename E::acc));
}
constexpr int kFloatLanes = UNIREP_VECTOR_BYTES / 4;

template <typename V, typename A>
inline V splat(A value) {
  return V{} + value;
}

// ---- Scalar conversions (tails, the shift value).

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even; NaN becomes the canonical quiet NaN (as c10::BFloat16 does).
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#if defined(UNIREP_AVX2) || defined(UNIREP_AVX512)
#define UNIREP_X86_SIMD 1
inline float f16_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
inline float f16_to_float(uint16_t h);  // in vector arithmetic, below
inline uint16_t float_to_f16(float f);
#endif

template <typename E>
inline typename E::acc to_acc(typename E::storage v);
template <>
inline float to_acc<F32>(float v) { return v; }
template <>
inline double to_acc<F64>(double v) { return v; }
template <>
inline float to_acc<F16>(uint16_t v) { return f16_to_float(v); }
template <>
inline float to_acc<BF16>(uint16_t v) { return bf16_to_float(v); }

template <typename E>
inline typename E::storage from_acc(typename E::acc v);
template <>
inline float from_acc<F32>(float v) { return v; }
template <>
inline double from_acc<F64>(double v) { return v; }
template <>
inline uint16_t from_acc<F16>(float v) { return float_to_f16(v); }
template <>
inline uint16_t from_acc<BF16>(float v) { return float_to_bf16(v); }

// ---- Half vectors <-> float vectors: the instruction-set specific part.

// bfloat16 bits, round to nearest even, NaN -> 0x7FC0 (as float_to_bf16).
inline vi32 bf16_bits(vf v) {
  const vu32 u = reinterpret_cast<vu32>(v);
  const vu32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const vi32 nan = v != v;
  return (reinterpret_cast<vi32>(rounded) & ~nan) | (nan & 0x7FC0);
}

#if defined(UNIREP_AVX512)
typedef __m256i half_reg;  // 16 half values
inline vf widen_f16(half_reg h) { return reinterpret_cast<vf>(_mm512_cvtph_ps(h)); }
inline half_reg narrow_f16(vf v) {
  return _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf widen_bf16(half_reg h) { return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline half_reg narrow_bf16(vf v) { return _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(bf16_bits(v))); }
inline half_reg load_half(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_half(uint16_t* p, half_reg h) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h); }
inline void stream_half(uint16_t* p, half_reg h) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h); }
inline void stream_f32(float* p, vf v) { _mm512_stream_ps(p, reinterpret_cast<__m512>(v)); }
inline void stream_f64(double* p, vd v) { _mm512_stream_pd(p, reinterpret_cast<__m512d>(v)); }
#elif defined(UNIREP_AVX2)
typedef __m128i half_reg;  // 8 half values
inline vf widen_f16(half_reg h) { return reinterpret_cast<vf>(_mm256_cvtph_ps(h)); }
inline half_reg narrow_f16(vf v) {
  return _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf widen_bf16(half_reg h) { return reinterpret_cast<vf>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline half_reg narrow_bf16(vf v) {
  // The values fit in 16 bits: pack within each 128-bit half, then gather the low quarters.
  const __m256i bits = reinterpret_cast<__m256i>(bf16_bits(v));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08));
}
inline half_reg load_half(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline void store_half(uint16_t* p, half_reg h) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h); }
inline void stream_half(uint16_t* p, half_reg h) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), h); }
inline void stream_f32(float* p, vf v) { _mm256_stream_ps(p, reinterpret_cast<__m256>(v)); }
inline void stream_f64(double* p, vd v) { _mm256_stream_pd(p, reinterpret_cast<__m256d>(v)); }
#else
// Without F16C: IEEE float16 <-> float32 in integer and float vector arithmetic, exact and
// rounding to nearest even like the hardware conversion (NaN -> quiet NaN 0x7E00). Signed
// lanes throughout (the values fit): SSE2 has no unsigned compares or conversions.
typedef vu16 half_reg;
inline vi32 select(vi32 mask, vi32 a, vi32 b) { return (a & mask) | (b & ~mask); }
inline vf widen_f16(half_reg h) {
  const vi32 bits = __builtin_convertvector(h, vi32);
  const vi32 em = bits & 0x7FFF;  // exponent and mantissa
  // Normal: the fields moved to float positions, rebiased by 2^112 (a power of two: exact).
  const vi32 normal = reinterpret_cast<vi32>(reinterpret_cast<vf>(em << 13) * 0x1p112f);
  // Subnormal and zero: mantissa x 2^-24, from the integer (no float subnormal involved).
  const vi32 subnormal = reinterpret_cast<vi32>(__builtin_convertvector(em, vf) * 0x1p-24f);
  // Inf and NaN: float exponent all ones, mantissa kept.
  const vi32 special = (em << 13) | 0x7F800000;
  const vi32 mag = select(em >= 0x7C00, special, select(em < 0x400, subnormal, normal));
  return reinterpret_cast<vf>(mag | ((bits & 0x8000) << 16));
}
inline half_reg narrow_f16(vf v) {
  const vi32 u = reinterpret_cast<vi32>(v);
  const vi32 a = u & 0x7FFFFFFF;  // |v|
  // Normal halves (|v| >= 2^-14): exponent rebiased, the 13 dropped bits rounded to nearest
  // even (a carry moves into the exponent; overflow is clamped to Inf below).
  const vi32 normal = (a - (112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13;
  // Subnormal halves: |v| / 2^-24 rounded to an integer by the float adder (nearest even).
  const vf scaled = reinterpret_cast<vf>(a) * 0x1p24f;
  const vi32 subnormal = __builtin_convertvector((scaled + 0x1p23f) - 0x1p23f, vi32);
  vi32 h = select(a < (113 << 23), subnormal, normal);
  h = select(h > 0x7C00, vi32{} + 0x7C00, h);
  h = select(a > 0x7F800000, vi32{} + 0x7E00, h);
  return __builtin_convertvector(h | ((u >> 16) & 0x8000), vu16);
}
inline float f16_to_float(uint16_t h) {
  half_reg r{};
  r[0] = h;
  return widen_f16(r)[0];
}
inline uint16_t float_to_f16(float f) { return narrow_f16(vf{} + f)[0]; }
inline vf widen_bf16(half_reg h) { return reinterpret_cast<vf>(__builtin_convertvector(h, vu32) << 16); }
inline half_reg narrow_bf16(vf v) { return __builtin_convertvector(bf16_bits(v), vu16); }
inline half_reg load_half(const uint16_t* p) {
  half_reg h;
  __builtin_memcpy(&h, p, sizeof h);
  return h;
}
inline void store_half(uint16_t* p, half_reg h) { __builtin_memcpy(p, &h, sizeof h); }
#endif

// Non-temporal stores (x86 builds) need the address aligned to the vector's storage size;
// callers guarantee it when they ask for them.
#ifdef UNIREP_X86_SIMD
constexpr bool kCanStream = true;
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
inline void stream_fence() {}
inline void stream_half(uint16_t* p, half_reg h) { store_half(p, h); }
inline void stream_f32(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline void stream_f64(double* p, vd v) { __builtin_memcpy(p, &v, sizeof v); }
#endif

// ---- Vector loads and stores of lanes<E>() elements.

template <typename E>
inline typename E::vec load(const typename E::storage* p) {
  typename E::vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <>
inline vf load<BF16>(const uint16_t* p) { return widen_bf16(load_half(p)); }
template <>
inline vf load<F16>(const uint16_t* p) { return widen_f16(load_half(p)); }

// The first n < lanes elements of p, the other lanes taken from `pad`.
template <typename E>
inline typename E::vec load_part(const typename E::storage* p, int64_t n, const typename E::vec& pad) {
  typename E::acc t[lanes<E>()];
  __builtin_memcpy(t, &pad, sizeof pad);
  for (int64_t i = 0; i < n; ++i) t[i] = to_acc<E>(p[i]);
  typename E::vec v;
  __builtin_memcpy(&v, t, sizeof v);
  return v;
}

template <typename E, bool STREAM>
inline void store(typename E::storage* p, typename E::vec v);
template <>
inline void store<F32, false>(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
template <>
inline void store<F64, false>(double* p, vd v) { __builtin_memcpy(p, &v, sizeof v); }
template <>
inline void store<BF16, false>(uint16_t* p, vf v) { store_half(p, narrow_bf16(v)); }
template <>
inline void store<F16, false>(uint16_t* p, vf v) { store_half(p, narrow_f16(v)); }
template <>
inline void store<F32, true>(float* p, vf v) { stream_f32(p, v); }
template <>
inline void store<F64, true>(double* p, vd v) { stream_f64(p, v); }
template <>
inline void store<BF16, true>(uint16_t* p, vf v) { stream_half(p, narrow_bf16(v)); }
template <>
inline void store<F16, true>(uint16_t* p, vf v) { stream_half(p, narrow_f16(v)); }

// The first n < lanes lanes of v.
template <typename E>
inline void store_part(typename E::storage* p, typename E::vec v, int64_t n) {
  typename E::acc t[lanes<E>()];
  __builtin_memcpy(t, &v, sizeof v);
  for (int64_t i = 0; i < n; ++i) p[i] = from_acc<E>(t[i]);
}

// Elements before p reaches a vector-aligned address (for non-temporal stores).
template <typename E>
inline int64_t misaligned_head(const typename E::storage* p) {
  constexpr uintptr_t bytes = lanes<E>() * sizeof(typename E::storage);
  const uintptr_t address = reinterpret_cast<uintptr_t>(p);
  if (address % sizeof(typename E::storage) != 0) return -1;  // cannot align: no streaming
  return static_cast<int64_t>(((bytes - address % bytes) % bytes) / sizeof(typename E::storage));
}

// Accumulator arrays (tables, block sums) as vectors.
template <typename V, typename A>
inline V loadv(const A* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename A>
inline void storev(A* p, V v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// Sum of the lanes in a fixed pairwise order: lane i + lane i + L/2, then the same on the
// half-width result, down to one lane (vector adds on halves, not a scalar loop: planes of
// 64 values are summed about as often as they are loaded).
template <typename A, int BYTES>
struct LaneVec {
  typedef A type __attribute__((vector_size(BYTES)));
};
template <typename A, int BYTES>
inline A fold_lanes(typename LaneVec<A, BYTES>::type v) {
  if constexpr (BYTES == 2 * sizeof(A)) {
    return v[0] + v[1];
  } else {
    typename LaneVec<A, BYTES / 2>::type lo, hi;
    __builtin_memcpy(&lo, &v, BYTES / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + BYTES / 2, BYTES / 2);
    return fold_lanes<A, BYTES / 2>(lo + hi);
  }
}
template <typename E>
inline typename E::acc hsum(typename E::vec v) {
  return fold_lanes<typename E::acc, sizeof(typename E::vec)>(v);
}

// The fused ReLU as torch.relu (NaN stays NaN) and its gradient gate (threshold_backward:
// blocked where the pre-activation is <= 0).
template <bool RELU, typename V>
inline V activate(V pre) {
  if (!RELU) return pre;
  return pre < V{} ? V{} : pre;
}
template <bool RELU, typename V>
inline V gate(V pre, V g) {
  if (!RELU) return g;
  return pre <= V{} ? V{} : g;
}

// ---- NCS planes.

template <typename E>
inline void moments_of_plane(const typename E::storage* x, int64_t S, typename E::acc* mean_out,
                             typename E::acc* m2_out) {
  using V = typename E::vec;
  using A = typename E::acc;
  constexpr int L = lanes<E>();
  if (S <= 0) {
    *mean_out = A(0);
    *m2_out = A(0);
    return;
  }
  const A shift = to_acc<E>(x[0]);
  V vs = splat<V>(shift);
  V a0{}, a1{}, a2{}, a3{};
  int64_t s = 0;
  for (; s + 4 * L <= S; s += 4 * L) {
    a0 += load<E>(x + s) - vs;
    a1 += load<E>(x + s + L) - vs;
    a2 += load<E>(x + s + 2 * L) - vs;
    a3 += load<E>(x + s + 3 * L) - vs;
  }
  for (; s + L <= S; s += L) a0 += load<E>(x + s) - vs;
  if (s < S) a1 += load_part<E>(x + s, S - s, vs) - vs;
  const A mean = shift + hsum<E>((a0 + a1) + (a2 + a3)) / static_cast<A>(S);
  const V vm = splat<V>(mean);
  a0 = a1 = a2 = a3 = V{};
  for (s = 0; s + 4 * L <= S; s += 4 * L) {
    const V d0 = load<E>(x + s) - vm, d1 = load<E>(x + s + L) - vm;
    const V d2 = load<E>(x + s + 2 * L) - vm, d3 = load<E>(x + s + 3 * L) - vm;
    a0 += d0 * d0;
    a1 += d1 * d1;
    a2 += d2 * d2;
    a3 += d3 * d3;
  }
  for (; s + L <= S; s += L) {
    const V d = load<E>(x + s) - vm;
    a0 += d * d;
  }
  if (s < S) {
    const V d = load_part<E>(x + s, S - s, vm) - vm;
    a1 += d * d;
  }
  *mean_out = mean;
  *m2_out = hsum<E>((a0 + a1) + (a2 + a3));
}

template <typename E>
void plane_moments(const void* x, int64_t count, int64_t stride, int64_t S, typename E::acc* mean,
                   typename E::acc* m2) {
  const typename E::storage* in = static_cast<const typename E::storage*>(x);
  for (int64_t i = 0; i < count; ++i) moments_of_plane<E>(in + i * stride, S, mean + i, m2 + i);
}

template <typename E, bool RELU, bool STREAM>
void plane_affine_body(const typename E::storage* x, typename E::storage* y, int64_t S, typename E::acc m,
                       typename E::acc a, typename E::acc b) {
  using V = typename E::vec;
  constexpr int L = lanes<E>();
  const V vm = splat<V>(m), va = splat<V>(a), vb = splat<V>(b);
  int64_t s = 0;
  if (STREAM) {  // the caller checked misaligned_head >= 0
    const int64_t head = misaligned_head<E>(y) < S ? misaligned_head<E>(y) : S;
    if (head > 0) store_part<E>(y, activate<RELU>((load_part<E>(x, head, vm) - vm) * va + vb), head);
    s = head;
  }
  for (; s + L <= S; s += L) store<E, STREAM>(y + s, activate<RELU>((load<E>(x + s) - vm) * va + vb));
  if (s < S) store_part<E>(y + s, activate<RELU>((load_part<E>(x + s, S - s, vm) - vm) * va + vb), S - s);
}

template <typename E, bool RELU, bool STREAM>
void planes_affine(const typename E::storage* x, typename E::storage* y, int64_t count, int64_t stride, int64_t S,
                   const typename E::acc* m, const typename E::acc* a, const typename E::acc* b) {
  for (int64_t i = 0; i < count; ++i) {
    plane_affine_body<E, RELU, STREAM>(x + i * stride, y + i * stride, S, m[i], a[i], b[i]);
  }
}

template <typename E>
void plane_affine(const void* x, void* y, int64_t count, int64_t stride, int64_t S, const typename E::acc* m,
                  const typename E::acc* a, const typename E::acc* b, bool relu, bool stream) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  T* out = static_cast<T*>(y);
  stream = stream && kCanStream && misaligned_head<E>(out) >= 0;
  if (relu) {
    if (stream) planes_affine<E, true, true>(in, out, count, stride, S, m, a, b);
    else planes_affine<E, true, false>(in, out, count, stride, S, m, a, b);
  } else {
    if (stream) planes_affine<E, false, true>(in, out, count, stride, S, m, a, b);
    else planes_affine<E, false, false>(in, out, count, stride, S, m, a, b);
  }
}

// Adds one plane's g and g (x - m) to the accumulators (four of each, so that the adds of
// one vector do not wait on the previous one).
template <typename E, bool RELU>
inline void accumulate_grad_sums(const typename E::storage* x, const typename E::storage* dy, int64_t S,
                                 typename E::vec vm, typename E::vec va, typename E::vec vb, typename E::vec (&g)[4],
                                 typename E::vec (&h)[4]) {
  using V = typename E::vec;
  constexpr int L = lanes<E>();
  int64_t s = 0;
  for (; s + 4 * L <= S; s += 4 * L) {
    const V c0 = load<E>(x + s) - vm, c1 = load<E>(x + s + L) - vm;
    const V c2 = load<E>(x + s + 2 * L) - vm, c3 = load<E>(x + s + 3 * L) - vm;
    const V d0 = gate<RELU>(c0 * va + vb, load<E>(dy + s));
    const V d1 = gate<RELU>(c1 * va + vb, load<E>(dy + s + L));
    const V d2 = gate<RELU>(c2 * va + vb, load<E>(dy + s + 2 * L));
    const V d3 = gate<RELU>(c3 * va + vb, load<E>(dy + s + 3 * L));
    g[0] += d0;
    g[1] += d1;
    g[2] += d2;
    g[3] += d3;
    h[0] += d0 * c0;
    h[1] += d1 * c1;
    h[2] += d2 * c2;
    h[3] += d3 * c3;
  }
  for (; s + L <= S; s += L) {
    const V c = load<E>(x + s) - vm;
    const V d = gate<RELU>(c * va + vb, load<E>(dy + s));
    g[0] += d;
    h[0] += d * c;
  }
  if (s < S) {  // padding: x = m, dy = 0 (adds nothing)
    const V c = load_part<E>(x + s, S - s, vm) - vm;
    const V d = gate<RELU>(c * va + vb, load_part<E>(dy + s, S - s, V{}));
    g[1] += d;
    h[1] += d * c;
  }
}

// Sums of `count` planes (one when the tables differ per plane), folded to scalars once.
template <typename E, bool RELU>
void grad_sums_of_planes(const typename E::storage* x, const typename E::storage* dy, int64_t count,
                         int64_t stride, int64_t S, typename E::acc m, typename E::acc a, typename E::acc b,
                         typename E::acc* s1_out, typename E::acc* s2_out) {
  using V = typename E::vec;
  const V vm = splat<V>(m), va = splat<V>(a), vb = splat<V>(b);
  V g[4] = {}, h[4] = {};
  for (int64_t i = 0; i < count; ++i) accumulate_grad_sums<E, RELU>(x + i * stride, dy + i * stride, S, vm, va, vb, g, h);
  *s1_out = hsum<E>((g[0] + g[1]) + (g[2] + g[3]));
  *s2_out = hsum<E>((h[0] + h[1]) + (h[2] + h[3]));
}

template <typename E>
void plane_grad_sums(const void* x, const void* dy, int64_t count, int64_t stride, int64_t S,
                     const typename E::acc* m, const typename E::acc* a, const typename E::acc* b, bool relu,
                     typename E::acc* s1, typename E::acc* s2) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  const T* g = static_cast<const T*>(dy);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t o = i * stride;
    if (relu) grad_sums_of_planes<E, true>(in + o, g + o, 1, 0, S, m[i], a[i], b[i], s1 + i, s2 + i);
    else grad_sums_of_planes<E, false>(in + o, g + o, 1, 0, S, m[i], a[i], b[i], s1 + i, s2 + i);
  }
}

template <typename E>
void shared_grad_sums(const void* x, const void* dy, int64_t count, int64_t stride, int64_t S, typename E::acc m,
                      typename E::acc a, typename E::acc b, bool relu, typename E::acc* s1, typename E::acc* s2) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  const T* g = static_cast<const T*>(dy);
  if (relu) grad_sums_of_planes<E, true>(in, g, count, stride, S, m, a, b, s1, s2);
  else grad_sums_of_planes<E, false>(in, g, count, stride, S, m, a, b, s1, s2);
}

template <typename E, bool RELU>
inline typename E::vec input_grad_of(typename E::vec xv, typename E::vec g, typename E::vec vm, typename E::vec va,
                                     typename E::vec vb, typename E::vec ka, typename E::vec kx,
                                     typename E::vec k0) {
  const typename E::vec c = xv - vm;
  return ka * gate<RELU>(c * va + vb, g) + kx * c + k0;
}

// Inlined into the loop over planes: called once per plane of as few as 64 values.
template <typename E, bool RELU, bool STREAM>
__attribute__((always_inline)) inline void plane_input_grad_body(const typename E::storage* x, const typename E::storage* dy, typename E::storage* dx,
                           int64_t S, typename E::acc m, typename E::acc a, typename E::acc b, typename E::acc ka,
                           typename E::acc kx, typename E::acc k0) {
  using V = typename E::vec;
  constexpr int L = lanes<E>();
  const V vm = splat<V>(m), va = splat<V>(a), vb = splat<V>(b);
  const V vka = splat<V>(ka), vkx = splat<V>(kx), vk0 = splat<V>(k0);
  int64_t s = 0;
  if (STREAM) {
    const int64_t head = misaligned_head<E>(dx) < S ? misaligned_head<E>(dx) : S;
    if (head > 0) {
      store_part<E>(dx, input_grad_of<E, RELU>(load_part<E>(x, head, vm), load_part<E>(dy, head, V{}), vm, va, vb,
                                               vka, vkx, vk0), head);
    }
    s = head;
  }
  for (; s + L <= S; s += L) {
    store<E, STREAM>(dx + s, input_grad_of<E, RELU>(load<E>(x + s), load<E>(dy + s), vm, va, vb, vka, vkx, vk0));
  }
  if (s < S) {
    store_part<E>(dx + s, input_grad_of<E, RELU>(load_part<E>(x + s, S - s, vm), load_part<E>(dy + s, S - s, V{}),
                                                 vm, va, vb, vka, vkx, vk0), S - s);
  }
}

// Plane i uses table entry i * table_step (0: one entry for every plane).
template <typename E, bool RELU, bool STREAM>
void planes_input_grad(const typename E::storage* x, const typename E::storage* dy, typename E::storage* dx,
                       int64_t count, int64_t stride, int64_t S, const typename E::acc* m, const typename E::acc* a,
                       const typename E::acc* b, const typename E::acc* ka, const typename E::acc* kx,
                       const typename E::acc* k0, int64_t table_step) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t o = i * stride, t = i * table_step;
    plane_input_grad_body<E, RELU, STREAM>(x + o, dy + o, dx + o, S, m[t], a[t], b[t], ka[t], kx[t], k0[t]);
  }
}

template <typename E>
void input_grad_of_planes(const void* x, const void* dy, void* dx, int64_t count, int64_t stride, int64_t S,
                          const typename E::acc* m, const typename E::acc* a, const typename E::acc* b,
                          const typename E::acc* ka, const typename E::acc* kx, const typename E::acc* k0,
                          int64_t table_step, bool relu, bool stream) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  const T* g = static_cast<const T*>(dy);
  T* out = static_cast<T*>(dx);
  stream = stream && kCanStream && misaligned_head<E>(out) >= 0;
  if (relu) {
    if (stream) planes_input_grad<E, true, true>(in, g, out, count, stride, S, m, a, b, ka, kx, k0, table_step);
    else planes_input_grad<E, true, false>(in, g, out, count, stride, S, m, a, b, ka, kx, k0, table_step);
  } else {
    if (stream) planes_input_grad<E, false, true>(in, g, out, count, stride, S, m, a, b, ka, kx, k0, table_step);
    else planes_input_grad<E, false, false>(in, g, out, count, stride, S, m, a, b, ka, kx, k0, table_step);
  }
}

template <typename E>
void plane_input_grad(const void* x, const void* dy, void* dx, int64_t count, int64_t stride, int64_t S,
                      const typename E::acc* m, const typename E::acc* a, const typename E::acc* b,
                      const typename E::acc* ka, const typename E::acc* kx, const typename E::acc* k0, bool relu,
                      bool stream) {
  input_grad_of_planes<E>(x, dy, dx, count, stride, S, m, a, b, ka, kx, k0, 1, relu, stream);
}

template <typename E>
void shared_input_grad(const void* x, const void* dy, void* dx, int64_t count, int64_t stride, int64_t S,
                       typename E::acc m, typename E::acc a, typename E::acc b, typename E::acc ka,
                       typename E::acc kx, typename E::acc k0, bool relu, bool stream) {
  input_grad_of_planes<E>(x, dy, dx, count, stride, S, &m, &a, &b, &ka, &kx, &k0, 0, relu, stream);
}

// ---- NSC blocks (S rows of C channels).
//
// When C divides the 4-vector group (C = 1, 2, 4, ... 32 floats; 64 with AVX-512), the
// block is walked as one flat array: lane k of the group is channel k % C, so per-channel
// tables become "tiles" (the table repeated across the group) and sums are folded back per
// channel at the end. Otherwise rows are walked in memory order (streaming), vectors over
// the channels first and the columns that do not fill a vector one at a time; reductions
// add two rows at a time to per-channel sums kept in memory (C / lanes independent chains).

template <typename E>
constexpr int64_t group_values() {
  return 4 * lanes<E>();
}

template <typename E>
inline bool flat_block(int64_t C) {
  return C > 0 && group_values<E>() % C == 0;
}

// A table of C values repeated over one group: 4 vectors.
template <typename E>
struct Tile {
  typename E::vec v[4];
  Tile(const typename E::acc* table, int64_t C, typename E::acc* scratch) {
    for (int64_t k = 0; k < group_values<E>(); ++k) scratch[k] = table[k % C];
    for (int u = 0; u < 4; ++u) v[u] = loadv<typename E::vec>(scratch + u * lanes<E>());
  }
};

// Folds the lanes of 4 accumulators (one group) into per-channel sums, lanes in order.
template <typename E>
inline void fold_group(const typename E::vec* acc, int64_t C, typename E::acc* out, typename E::acc* scratch) {
  for (int u = 0; u < 4; ++u) storev(scratch + u * lanes<E>(), acc[u]);
  for (int64_t c = 0; c < C; ++c) out[c] = 0;
  for (int64_t k = 0; k < group_values<E>(); ++k) out[k % C] += scratch[k];
}

// Group-wise walk of a flat block of n values: `full(j)` for every whole group at offset j,
// then `part(j, u, count)` for the vectors of the last partial group (count < lanes for the
// final one).
template <typename E, typename Full, typename Part>
inline void walk_flat(int64_t n, const Full& full, const Part& part) {
  constexpr int64_t G = group_values<E>();
  constexpr int L = lanes<E>();
  int64_t j = 0;
  for (; j + G <= n; j += G) full(j);
  for (int u = 0; j < n; ++u, j += L) part(j, u, n - j < L ? n - j : int64_t(L));
}

// Per-column sums over the S rows of a block: sum (x - center[c]) when SQUARE is false,
// sum (x - center[c])^2 when it is true. Rows in memory order, two at a time (the pair is
// added to the running sums, which live in `out`).
template <typename E, bool SQUARE>
inline void column_sums(const typename E::storage* x, int64_t S, int64_t C, const typename E::acc* center,
                        typename E::acc* out) {
  using V = typename E::vec;
  using A = typename E::acc;
  constexpr int L = lanes<E>();
  for (int64_t c = 0; c < C; ++c) out[c] = A(0);
  auto term = [](V d) { return SQUARE ? d * d : d; };
  auto term1 = [](A d) { return SQUARE ? d * d : d; };
  int64_t s = 0;
  for (; s + 2 <= S; s += 2) {
    const typename E::storage* r0 = x + s * C;
    const typename E::storage* r1 = r0 + C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      const V ctr = loadv<V>(center + c);
      storev(out + c, loadv<V>(out + c) + (term(load<E>(r0 + c) - ctr) + term(load<E>(r1 + c) - ctr)));
    }
    for (; c < C; ++c) out[c] += term1(to_acc<E>(r0[c]) - center[c]) + term1(to_acc<E>(r1[c]) - center[c]);
  }
  if (s < S) {
    const typename E::storage* r0 = x + s * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) storev(out + c, loadv<V>(out + c) + term(load<E>(r0 + c) - loadv<V>(center + c)));
    for (; c < C; ++c) out[c] += term1(to_acc<E>(r0[c]) - center[c]);
  }
}

template <typename E>
void block_moments(const void* xv, int64_t S, int64_t C, typename E::acc* mean, typename E::acc* m2,
                   typename E::acc* scratch) {
  using V = typename E::vec;
  using A = typename E::acc;
  using T = typename E::storage;
  constexpr int L = lanes<E>();
  const T* x = static_cast<const T*>(xv);
  if (S <= 0) {
    for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = A(0);
    return;
  }
  A* shift = scratch;          // C values
  A* work = scratch + C;       // 2 C + 96 values
  for (int64_t c = 0; c < C; ++c) shift[c] = to_acc<E>(x[c]);
  if (flat_block<E>(C)) {
    const int64_t n = S * C;
    {
      const Tile<E> t(shift, C, work);
      V acc[4] = {};
      walk_flat<E>(n, [&](int64_t j) {
        for (int u = 0; u < 4; ++u) acc[u] += load<E>(x + j + u * L) - t.v[u];
      }, [&](int64_t j, int u, int64_t k) {
        acc[u] += (k == L ? load<E>(x + j) : load_part<E>(x + j, k, t.v[u])) - t.v[u];
      });
      fold_group<E>(acc, C, mean, work);
    }
    for (int64_t c = 0; c < C; ++c) mean[c] = shift[c] + mean[c] / static_cast<A>(S);
    const Tile<E> t(mean, C, work);
    V acc[4] = {};
    walk_flat<E>(n, [&](int64_t j) {
      for (int u = 0; u < 4; ++u) {
        const V d = load<E>(x + j + u * L) - t.v[u];
        acc[u] += d * d;
      }
    }, [&](int64_t j, int u, int64_t k) {
      const V d = (k == L ? load<E>(x + j) : load_part<E>(x + j, k, t.v[u])) - t.v[u];
      acc[u] += d * d;
    });
    fold_group<E>(acc, C, m2, work);
    return;
  }
  column_sums<E, false>(x, S, C, shift, mean);
  for (int64_t c = 0; c < C; ++c) mean[c] = shift[c] + mean[c] / static_cast<A>(S);
  column_sums<E, true>(x, S, C, mean, m2);
}

// Rows of C values can be streamed when every row starts vector-aligned.
template <typename E>
inline bool can_stream_rows(const typename E::storage* out, int64_t C) {
  return kCanStream && misaligned_head<E>(out) == 0 && C % lanes<E>() == 0;
}

template <typename E, bool RELU, bool STREAM>
void block_affine_body(const typename E::storage* x, typename E::storage* y, int64_t S, int64_t C,
                       const typename E::acc* m, const typename E::acc* a, const typename E::acc* b,
                       typename E::acc* scratch) {
  using V = typename E::vec;
  using A = typename E::acc;
  constexpr int L = lanes<E>();
  if (flat_block<E>(C)) {
    const Tile<E> tm(m, C, scratch), ta(a, C, scratch), tb(b, C, scratch);
    walk_flat<E>(S * C, [&](int64_t j) {
      for (int u = 0; u < 4; ++u) {
        store<E, STREAM>(y + j + u * L, activate<RELU>((load<E>(x + j + u * L) - tm.v[u]) * ta.v[u] + tb.v[u]));
      }
    }, [&](int64_t j, int u, int64_t k) {
      const V v = activate<RELU>(((k == L ? load<E>(x + j) : load_part<E>(x + j, k, tm.v[u])) - tm.v[u]) * ta.v[u] +
                                 tb.v[u]);
      if (k == L) store<E, STREAM>(y + j, v);
      else store_part<E>(y + j, v, k);
    });
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const typename E::storage* in = x + s * C;
      typename E::storage* out = y + s * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        store<E, STREAM>(out + c,
                         activate<RELU>((load<E>(in + c) - loadv<V>(m + c)) * loadv<V>(a + c) + loadv<V>(b + c)));
      }
      for (; c < C; ++c) {
        const A pre = (to_acc<E>(in[c]) - m[c]) * a[c] + b[c];
        out[c] = from_acc<E>(RELU && pre < A(0) ? A(0) : pre);
      }
    }
  }
}

template <typename E>
void block_affine(const void* x, void* y, int64_t S, int64_t C, const typename E::acc* m, const typename E::acc* a,
                  const typename E::acc* b, bool relu, bool stream, typename E::acc* scratch) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  T* out = static_cast<T*>(y);
  // Flat blocks stream only from an aligned start (their lanes must keep their channels).
  stream = stream && (flat_block<E>(C) ? kCanStream && misaligned_head<E>(out) == 0 : can_stream_rows<E>(out, C));
  if (relu) {
    if (stream) block_affine_body<E, true, true>(in, out, S, C, m, a, b, scratch);
    else block_affine_body<E, true, false>(in, out, S, C, m, a, b, scratch);
  } else {
    if (stream) block_affine_body<E, false, true>(in, out, S, C, m, a, b, scratch);
    else block_affine_body<E, false, false>(in, out, S, C, m, a, b, scratch);
  }
}

template <typename E, bool RELU>
void block_grad_sums_body(const typename E::storage* x, const typename E::storage* dy, int64_t S, int64_t C,
                          const typename E::acc* m, const typename E::acc* a, const typename E::acc* b,
                          typename E::acc* s1, typename E::acc* s2, typename E::acc* scratch) {
  using V = typename E::vec;
  using A = typename E::acc;
  constexpr int L = lanes<E>();
  if (flat_block<E>(C)) {
    const Tile<E> tm(m, C, scratch), ta(a, C, scratch), tb(b, C, scratch);
    V g[4] = {}, h[4] = {};
    walk_flat<E>(S * C, [&](int64_t j) {
      for (int u = 0; u < 4; ++u) {
        const V c = load<E>(x + j + u * L) - tm.v[u];
        const V d = gate<RELU>(c * ta.v[u] + tb.v[u], load<E>(dy + j + u * L));
        g[u] += d;
        h[u] += d * c;
      }
    }, [&](int64_t j, int u, int64_t k) {
      const V c = (k == L ? load<E>(x + j) : load_part<E>(x + j, k, tm.v[u])) - tm.v[u];
      const V d = gate<RELU>(c * ta.v[u] + tb.v[u], k == L ? load<E>(dy + j) : load_part<E>(dy + j, k, V{}));
      g[u] += d;
      h[u] += d * c;
    });
    fold_group<E>(g, C, s1, scratch);
    fold_group<E>(h, C, s2, scratch);
    return;
  }
  for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = A(0);
  auto pair = [&](const typename E::storage* in, const typename E::storage* gp, int64_t c, V& g, V& h) {
    const V xc = load<E>(in + c) - loadv<V>(m + c);
    const V d = gate<RELU>(xc * loadv<V>(a + c) + loadv<V>(b + c), load<E>(gp + c));
    g = d;
    h = d * xc;
  };
  auto pair1 = [&](const typename E::storage* in, const typename E::storage* gp, int64_t c, A& g, A& h) {
    const A xc = to_acc<E>(in[c]) - m[c];
    g = RELU && xc * a[c] + b[c] <= A(0) ? A(0) : to_acc<E>(gp[c]);
    h = g * xc;
  };
  int64_t s = 0;
  for (; s + 2 <= S; s += 2) {  // two rows per step, added to the running sums
    const typename E::storage* in = x + s * C;
    const typename E::storage* gp = dy + s * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      V g0, h0, g1, h1;
      pair(in, gp, c, g0, h0);
      pair(in + C, gp + C, c, g1, h1);
      storev(s1 + c, loadv<V>(s1 + c) + (g0 + g1));
      storev(s2 + c, loadv<V>(s2 + c) + (h0 + h1));
    }
    for (; c < C; ++c) {
      A g0, h0, g1, h1;
      pair1(in, gp, c, g0, h0);
      pair1(in + C, gp + C, c, g1, h1);
      s1[c] += g0 + g1;
      s2[c] += h0 + h1;
    }
  }
  if (s < S) {
    const typename E::storage* in = x + s * C;
    const typename E::storage* gp = dy + s * C;
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      V g0, h0;
      pair(in, gp, c, g0, h0);
      storev(s1 + c, loadv<V>(s1 + c) + g0);
      storev(s2 + c, loadv<V>(s2 + c) + h0);
    }
    for (; c < C; ++c) {
      A g0, h0;
      pair1(in, gp, c, g0, h0);
      s1[c] += g0;
      s2[c] += h0;
    }
  }
}

template <typename E>
void block_grad_sums(const void* x, const void* dy, int64_t S, int64_t C, const typename E::acc* m,
                     const typename E::acc* a, const typename E::acc* b, bool relu, typename E::acc* s1,
                     typename E::acc* s2, typename E::acc* scratch) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  const T* g = static_cast<const T*>(dy);
  if (relu) block_grad_sums_body<E, true>(in, g, S, C, m, a, b, s1, s2, scratch);
  else block_grad_sums_body<E, false>(in, g, S, C, m, a, b, s1, s2, scratch);
}

template <typename E, bool RELU, bool STREAM>
void block_input_grad_body(const typename E::storage* x, const typename E::storage* dy, typename E::storage* dx,
                           int64_t S, int64_t C, const typename E::acc* m, const typename E::acc* a,
                           const typename E::acc* b, const typename E::acc* ka, const typename E::acc* kx,
                           const typename E::acc* k0, typename E::acc* scratch) {
  using V = typename E::vec;
  using A = typename E::acc;
  constexpr int L = lanes<E>();
  if (flat_block<E>(C)) {
    const Tile<E> tm(m, C, scratch), ta(a, C, scratch), tb(b, C, scratch);
    const Tile<E> tka(ka, C, scratch), tkx(kx, C, scratch), tk0(k0, C, scratch);
    walk_flat<E>(S * C, [&](int64_t j) {
      for (int u = 0; u < 4; ++u) {
        store<E, STREAM>(dx + j + u * L, input_grad_of<E, RELU>(load<E>(x + j + u * L), load<E>(dy + j + u * L),
                                                               tm.v[u], ta.v[u], tb.v[u], tka.v[u], tkx.v[u],
                                                               tk0.v[u]));
      }
    }, [&](int64_t j, int u, int64_t k) {
      const V xv = k == L ? load<E>(x + j) : load_part<E>(x + j, k, tm.v[u]);
      const V gv = k == L ? load<E>(dy + j) : load_part<E>(dy + j, k, V{});
      const V v = input_grad_of<E, RELU>(xv, gv, tm.v[u], ta.v[u], tb.v[u], tka.v[u], tkx.v[u], tk0.v[u]);
      if (k == L) store<E, STREAM>(dx + j, v);
      else store_part<E>(dx + j, v, k);
    });
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const typename E::storage* in = x + s * C;
      const typename E::storage* gp = dy + s * C;
      typename E::storage* out = dx + s * C;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        store<E, STREAM>(out + c, input_grad_of<E, RELU>(load<E>(in + c), load<E>(gp + c), loadv<V>(m + c),
                                                         loadv<V>(a + c), loadv<V>(b + c), loadv<V>(ka + c),
                                                         loadv<V>(kx + c), loadv<V>(k0 + c)));
      }
      for (; c < C; ++c) {
        const A xc = to_acc<E>(in[c]) - m[c];
        const A g = RELU && xc * a[c] + b[c] <= A(0) ? A(0) : to_acc<E>(gp[c]);
        out[c] = from_acc<E>(ka[c] * g + kx[c] * xc + k0[c]);
      }
    }
  }
}

template <typename E>
void block_input_grad(const void* x, const void* dy, void* dx, int64_t S, int64_t C, const typename E::acc* m,
                      const typename E::acc* a, const typename E::acc* b, const typename E::acc* ka,
                      const typename E::acc* kx, const typename E::acc* k0, bool relu, bool stream,
                      typename E::acc* scratch) {
  using T = typename E::storage;
  const T* in = static_cast<const T*>(x);
  const T* g = static_cast<const T*>(dy);
  T* out = static_cast<T*>(dx);
  stream = stream && (flat_block<E>(C) ? kCanStream && misaligned_head<E>(out) == 0 : can_stream_rows<E>(out, C));
  if (relu) {
    if (stream) block_input_grad_body<E, true, true>(in, g, out, S, C, m, a, b, ka, kx, k0, scratch);
    else block_input_grad_body<E, true, false>(in, g, out, S, C, m, a, b, ka, kx, k0, scratch);
  } else {
    if (stream) block_input_grad_body<E, false, true>(in, g, out, S, C, m, a, b, ka, kx, k0, scratch);
    else block_input_grad_body<E, false, false>(in, g, out, S, C, m, a, b, ka, kx, k0, scratch);
  }
}

template <typename E>
constexpr PassKernels<typename E::acc> table() {
  return {&plane_moments<E>,   &plane_affine<E>,      &plane_grad_sums<E>, &plane_input_grad<E>,
          &shared_grad_sums<E>, &shared_input_grad<E>, &block_moments<E>,   &block_affine<E>,
          &block_grad_sums<E>,  &block_input_grad<E>,  &stream_fence};
}

}  // namespace

extern const PassKernelSet kernels;
const PassKernelSet kernels = {UNIREP_ISA_NAME, table<F32>(), table<F16>(), table<BF16>(), table<F64>()};

}  // namespace UNIREP_ISA
}  // namespace cpu
}  // namespace unirep
