// The pass kernels (pass_kernels_impl.h) compiled for AVX2 + F16C: 256-bit vectors,
// float16 <-> float conversions in hardware, non-temporal stores. Selected at run time
// (pass_kernels.cpp) only where ATen itself runs its AVX2 kernels.
//
// Only <cstdint> and <immintrin.h> come before the target pragma: nothing inline from
// another header may be compiled for AVX2 here and then be picked by the linker for the
// baseline code.
#include "pass_kernels.h"

#ifdef UNIREP_HAVE_X86_KERNELS
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define UNIREP_ISA avx2
#define UNIREP_ISA_NAME "avx2"
#define UNIREP_AVX2 1
#include "pass_kernels_impl.h"
#pragma GCC pop_options
#endif
