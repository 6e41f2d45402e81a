// The pass kernels (pass_kernels_impl.h) compiled for AVX-512 (F, BW, VL, DQ) + F16C:
// 512-bit vectors, float16 <-> float conversions in hardware, non-temporal stores.
// Selected at run time (pass_kernels.cpp) only where ATen itself runs its AVX512 kernels.
//
// Only <cstdint> and <immintrin.h> come before the target pragma: nothing inline from
// another header may be compiled for AVX-512 here and then be picked by the linker for the
// baseline code.
#include "pass_kernels.h"

#ifdef UNIREP_HAVE_X86_KERNELS
#include <immintrin.h>

#pragma GCC push_options
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
#define UNIREP_ISA avx512
#define UNIREP_ISA_NAME "avx512"
#define UNIREP_AVX512 1
#include "pass_kernels_impl.h"
#pragma GCC pop_options
#endif
