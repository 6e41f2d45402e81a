// The pass kernels (pass_kernels_impl.h) for the build's baseline instruction set: every
// CPU runs them, and ATEN_CPU_CAPABILITY=default selects them.
#include <c10/util/Half.h>

#include <cstdint>

namespace unirep {
namespace cpu {
namespace base {
namespace {
// Without F16C, float16 converts one value at a time (c10's IEEE conversion).
inline float half_bits_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline uint16_t float_to_half_bits(float f) { return c10::Half(f).x; }
}  // namespace
}  // namespace base
}  // namespace cpu
}  // namespace unirep

#define UNIREP_ISA base
#define UNIREP_ISA_NAME "baseline"
#include "pass_kernels_impl.h"
