// The vectorized bodies of the passes of norm_passes.h, compiled once per instruction set.
//
// pass_kernels_impl.h holds one implementation, written with GCC/Clang vector extensions;
// pass_kernels_base.cpp compiles it for the build's baseline instruction set (16-byte
// vectors: SSE2, NEON), pass_kernels_avx2.cpp for AVX2 + F16C (32 bytes) and
// pass_kernels_avx512.cpp for AVX-512 (64 bytes; both x86-64, GCC). pass_kernels.cpp picks
// one set per process, the one matching ATen's own CPU capability (so
// ATEN_CPU_CAPABILITY=default or =avx2 selects the others, for tests).
//
// Half inputs (float16, bfloat16) are widened to float on load, computed in float and
// narrowed (round to nearest even) on store; accumulation is in float. No FMA contraction
// (-ffp-contract=off): the backward's ReLU gate recomputes exactly the forward's
// pre-activation.
//
// This header is included by the per-ISA translation units, so it holds only declarations
// and plain structs: no inline function that could be shared across instruction sets.
#pragma once

#include <cstdint>

namespace unirep {
namespace cpu {

// One sample's block in channels_last (NSC) layout: S rows of C channels, row-major.
// Tables are per channel: y[s][c] = act((x[s][c] - m[c]) * a[c] + b[c]).
//
// Every function reads and writes storage of one element type (float, double, float16 or
// bfloat16: the table's type) and accumulates in acc_t. `stream` asks for non-temporal
// stores of the output (honoured where the ISA and alignment allow): for outputs larger
// than the cache, which would evict the input and never be read back from cache anyway.
// A thread that streamed calls `fence` before its results are used by another thread
// (once per parallel task: a fence per plane would stall the stores).
template <typename acc_t>
struct PassKernels {
  // ---- NCS planes: `count` planes of S contiguous values (one (sample, channel) each),
  // plane i starting at element i * stride of x (and of y, dy, dx); plane i's tables and
  // results are entry i of each array.
  // Mean and M2 = sum (x - mean)^2 (two passes, the first shifted by x[0]).
  void (*plane_moments)(const void* x, int64_t count, int64_t stride, int64_t S, acc_t* mean, acc_t* m2);
  // y = act((x - m) * a + b).
  void (*plane_affine)(const void* x, void* y, int64_t count, int64_t stride, int64_t S, const acc_t* m,
                       const acc_t* a, const acc_t* b, bool relu, bool stream);
  // s1 = sum g, s2 = sum g (x - m), where g = dy masked by the ReLU of (x - m) * a + b.
  void (*plane_grad_sums)(const void* x, const void* dy, int64_t count, int64_t stride, int64_t S, const acc_t* m,
                          const acc_t* a, const acc_t* b, bool relu, acc_t* s1, acc_t* s2);
  // dx = ka g + kx (x - m) + k0.
  void (*plane_input_grad)(const void* x, const void* dy, void* dx, int64_t count, int64_t stride, int64_t S,
                           const acc_t* m, const acc_t* a, const acc_t* b, const acc_t* ka, const acc_t* kx,
                           const acc_t* k0, bool relu, bool stream);
  // The same two for `count` planes that share one table entry (batch norm: consecutive
  // samples of one domain): the sums are of all the planes together, folded to scalars once
  // (a plane of 64 values costs as much to fold as to load).
  void (*shared_grad_sums)(const void* x, const void* dy, int64_t count, int64_t stride, int64_t S, acc_t m, acc_t a,
                           acc_t b, bool relu, acc_t* s1, acc_t* s2);
  void (*shared_input_grad)(const void* x, const void* dy, void* dx, int64_t count, int64_t stride, int64_t S,
                            acc_t m, acc_t a, acc_t b, acc_t ka, acc_t kx, acc_t k0, bool relu, bool stream);

  // ---- NSC blocks: the same four with per-channel tables of C values. `scratch` holds
  // block_scratch_size(C) acc_t values of working space.
  void (*block_moments)(const void* x, int64_t S, int64_t C, acc_t* mean, acc_t* m2, acc_t* scratch);
  void (*block_affine)(const void* x, void* y, int64_t S, int64_t C, const acc_t* m, const acc_t* a,
                       const acc_t* b, bool relu, bool stream, acc_t* scratch);
  void (*block_grad_sums)(const void* x, const void* dy, int64_t S, int64_t C, const acc_t* m, const acc_t* a,
                          const acc_t* b, bool relu, acc_t* s1, acc_t* s2, acc_t* scratch);
  void (*block_input_grad)(const void* x, const void* dy, void* dx, int64_t S, int64_t C, const acc_t* m,
                           const acc_t* a, const acc_t* b, const acc_t* ka, const acc_t* kx, const acc_t* k0,
                           bool relu, bool stream, acc_t* scratch);

  // Orders this thread's non-temporal stores before what follows (sfence; no-op without).
  void (*fence)();
};

// Working space that the block kernels need (see PassKernels), in acc_t values.
constexpr int64_t block_scratch_size(int64_t C) { return 3 * C + 96; }

// The kernels of every element type for one instruction set.
struct PassKernelSet {
  const char* isa;
  PassKernels<float> f32, f16, bf16;
  PassKernels<double> f64;
};

namespace base {
extern const PassKernelSet kernels;
}
// GCC on x86-64 only (its target pragma compiles one file per instruction set); other compilers and
// architectures run the portable kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define UNIREP_HAVE_X86_KERNELS 1
namespace avx2 {
extern const PassKernelSet kernels;
}
namespace avx512 {
extern const PassKernelSet kernels;
}
#endif

}  // namespace cpu
}  // namespace unirep
