// The pass kernels (pass_kernels_impl.h) for the build's baseline instruction set: every
// CPU runs them, and ATEN_CPU_CAPABILITY=default selects them.
#define UNIREP_ISA base
#define UNIREP_ISA_NAME "baseline"
#include "pass_kernels_impl.h"
