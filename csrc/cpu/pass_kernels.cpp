// Which pass kernels run (instruction set), and when outputs are written with
// non-temporal stores. Both are decided once per process.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include "norm_passes.h"

namespace unirep {
namespace cpu {
namespace {

const PassKernelSet& select_kernels() {
#ifdef UNIREP_HAVE_X86_KERNELS
  // Follow ATen's choice (which honours ATEN_CPU_CAPABILITY), checking the features our
  // builds need as well.
  const std::string capability = at::get_cpu_capability();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (capability == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return avx512::kernels;
  }
  if ((capability == "AVX2" || capability == "AVX512") && avx2) return avx2::kernels;
#endif
  return base::kernels;
}

// Size of the largest CPU cache the kernel reports (Linux sysfs; 0 when unknown).
int64_t last_level_cache_bytes() {
  int64_t best = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    std::string text;
    if (!(f >> text) || text.empty()) continue;
    int64_t unit = 1;
    const char last = text.back();
    if (last == 'K') unit = int64_t(1) << 10;
    if (last == 'M') unit = int64_t(1) << 20;
    if (last == 'G') unit = int64_t(1) << 30;
    if (unit != 1) text.pop_back();
    try {
      best = std::max<int64_t>(best, std::stoll(text) * unit);
    } catch (const std::exception&) {
    }
  }
  return best;
}

// UNIREP_CPU_STREAM_STORES: "auto" (default), "always" or "never".
int64_t select_stream_threshold() {
  const char* env = std::getenv("UNIREP_CPU_STREAM_STORES");
  const std::string mode = env ? env : "auto";
  if (mode == "always") return 0;
  if (mode == "never") return INT64_MAX;
  TORCH_CHECK(mode == "auto" || mode.empty(), "UNIREP_CPU_STREAM_STORES must be auto, always or never, got '",
              mode, "'");
  const int64_t cache = last_level_cache_bytes();
  return cache > 0 ? cache : kDefaultStreamBytes;
}

}  // namespace

const PassKernelSet& pass_kernel_set() {
  static const PassKernelSet& chosen = select_kernels();
  return chosen;
}

bool stream_stores(int64_t output_bytes) {
  static const int64_t threshold = select_stream_threshold();
  return output_bytes >= threshold;
}

}  // namespace cpu
}  // namespace unirep
