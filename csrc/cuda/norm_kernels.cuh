// The passes over memory that every domain-muxed normalization on CUDA is made of: the same
// three steps as the CPU kernels (csrc/cpu/norm_passes.h).
//
// (1) A reduction over each (sample, channel) plane, split into K chunks of the spatial
//     dims so that small batches still fill the GPU: per-chunk partials [N][K][C] in the
//     accumulation type. Forward: Welford (count, mean, M2) per thread, merged across lanes
//     in a fixed order. Backward: sums of g and g * (x - center), g = dy masked by the
//     fused ReLU.
// (2) Tiny per-channel "table math" (one thread per table entry, in the op's .cu file) that
//     merges the partials in sample order (deterministic, no atomics) into group moments,
//     parameter gradients and per-row tables.
// (3) One elementwise pass with 16-byte vector loads: y = act((x - center[r]) * scale[r] +
//     beta[r]) or dx = ka[r] g + kx[r] (x - center[r]) + k0[r], where r is the sample's
//     table row (its domain for batch norm, the sample itself for instance norm).
//
// Layouts: NCS (contiguous) reduces one plane per warp; NSC (channels_last) reduces a tile
// of 32 channels x 8 rows per block, 32 consecutive channels per warp (coalesced).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../norm_common.h"

namespace unirep {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kBlock = 256;        // threads per block of the elementwise and NCS kernels
constexpr int kTileRows = 8;       // NSC reduction: rows of a 32-channel tile per block
constexpr int kTableBlock = 128;   // table-math kernels: channels per block

template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));  // values per 16-byte load
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// std::min is not callable from device code without --expt-relaxed-constexpr.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Multiprocessors of the current device (ATen/cuda/CUDAContext.h would give them too, but it
// pulls in cuBLAS/cuSPARSE headers that a compile-only toolkit may lack).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not read yet (a benign race: every writer writes the same value)
  const int device = c10::cuda::current_device();
  if (device < kMaxDevices && cached[device] > 0) return cached[device];
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) cached[device] = count;
  return count;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// An optional (rows, C) or (C,) parameter as the kernels read it: at(r, c), or `fill`.
template <typename acc_t>
struct ParamArg {
  const acc_t* data = nullptr;
  bool per_row = false;
  acc_t fill = acc_t(0);
  int64_t C = 0;
  __device__ __forceinline__ acc_t at(int64_t row, int64_t c) const {
    return data == nullptr ? fill : data[(per_row ? row * C : 0) + c];
  }
};

// Holds the accumulation-type copy a ParamArg points into.
template <typename acc_t>
struct ParamHolder {
  at::Tensor values;
  ParamArg<acc_t> arg;
  ParamHolder(const c10::optional<at::Tensor>& p, int64_t C, acc_t fill, at::ScalarType acc) {
    arg.fill = fill;
    arg.C = C;
    if (p.has_value() && p->defined()) {
      values = p->to(acc).contiguous();
      arg.data = values.data_ptr<acc_t>();
      arg.per_row = p->dim() == 2;
    }
  }
};

// Tensors an op reads through raw pointers must be on x's device (a host pointer would fault).
inline void check_same_device(const at::Tensor& x, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Host checks of metadata shared by every CUDA op (the Python layer makes the same ones;
// these hold when the ops are called directly, e.g. through torch.ops).
inline void check_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                         const c10::optional<at::Tensor>& bias, int64_t D, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor for the cuda backend, got ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, op, ": x must be a non-empty (N, C, *spatial) tensor");
  TORCH_CHECK(D >= 1 && D <= 65535, op, ": num_domains must lie in [1, 65535] on CUDA, got ", D);
  check_param_shape(weight, D, x.size(1), "weight");
  check_param_shape(bias, D, x.size(1), "bias");
  if (weight.has_value() && weight->defined()) check_same_device(x, *weight, op, "weight");
  if (bias.has_value() && bias->defined()) check_same_device(x, *bias, op, "bias");
}

// One thread per (channel, row): rows on grid y (check_inputs bounds num_domains by 65535).
inline dim3 per_channel_grid(int64_t C, int64_t rows) {
  return dim3(static_cast<unsigned>(ceil_div(C, kTableBlock)), static_cast<unsigned>(rows));
}

// ---- Each sample's table row, validated on the device (no host synchronisation).

// rows[n] = domain[n] (or the pure domain); count[d] = values per channel from domain d.
// An index outside [0, D) stops the kernel with a device-side assert, so no later pass
// ever reads a table out of bounds.
template <typename acc_t>
__global__ void sample_rows_kernel(const int64_t* __restrict__ domain, int64_t pure_domain, int64_t N, int64_t D,
                                   int64_t S, int32_t* __restrict__ rows, acc_t* __restrict__ count) {
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t r = domain != nullptr ? domain[n] : pure_domain;
    CUDA_KERNEL_ASSERT_MSG(r >= 0 && r < D, "unirep: domain values must lie in [0, num_domains)");
    rows[n] = static_cast<int32_t>(r);
  }
  if (count == nullptr) return;
  __syncthreads();  // makes this block's writes of rows visible to all its threads
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    int64_t samples = 0;
    for (int64_t n = 0; n < N; ++n) samples += rows[n] == d;
    count[d] = static_cast<acc_t>(samples * S);
  }
}

struct SampleRows {
  at::Tensor rows;   // (N,) int32 on x's device
  at::Tensor count;  // (D,) accumulation dtype, or undefined when not asked for
};

// Host side: metadata checks (no sync), then the validating kernel.
inline SampleRows sample_rows(const c10::optional<at::Tensor>& domain, int64_t pure_domain, const at::Tensor& x,
                              int64_t N, int64_t D, int64_t S, bool with_count, const char* op) {
  const bool has_tensor = domain.has_value() && domain->defined();
  if (has_tensor) {
    TORCH_CHECK(domain->scalar_type() == at::kLong && domain->dim() == 1 && domain->size(0) == N, op,
                ": domain must be an int64 tensor of shape (", N, ",), got ", domain->scalar_type(), " ",
                domain->sizes());
    TORCH_CHECK(domain->device() == x.device(), op, ": domain tensor is on ", domain->device(), " but x is on ",
                x.device());
  } else {
    TORCH_CHECK_VALUE(pure_domain >= 0 && pure_domain < D, op, ": domain must lie in [0, num_domains=", D, "), got ",
                      pure_domain);
  }
  TORCH_CHECK(D <= INT32_MAX, op, ": num_domains must fit in int32");
  const at::ScalarType acc = at::toOpMathType(x.scalar_type());
  SampleRows out;
  out.rows = at::empty({N}, x.options().dtype(at::kInt));
  if (with_count) out.count = at::empty({D}, x.options().dtype(acc));
  const at::Tensor dom = has_tensor ? domain->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "unirep_sample_rows", [&] {
    sample_rows_kernel<scalar_t><<<1, kBlock, 0, current_stream()>>>(
        has_tensor ? dom.data_ptr<int64_t>() : nullptr, pure_domain, N, D, S, out.rows.data_ptr<int32_t>(),
        with_count ? out.count.data_ptr<scalar_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- (1) Reductions over planes, chunked. A reduction policy R provides:
//   State                      per-thread partial result (a plain struct)
//   begin(n, c) -> State       empty state for sample n, channel c
//   push<V>(State&, offset)    adds V consecutive values at flat element `offset`
//   merge(State&, State)       combines two partials (fixed order => deterministic)
//   shfl_down(State, delta)    warp shuffle of a State
//   store(State, index)        writes the partial of (n, k, c) at index (n * K + k) * C + c

// How the spatial dims are split: K chunks of `chunk` values (the last may be shorter).
struct Chunking {
  int64_t K = 1, chunk = 1;
};

// NCS: one warp per (plane, chunk); aim for about 64 warps per SM, each lane with at least
// four vectors to load. `align` is the vector width the chunks must be multiples of.
inline Chunking ncs_chunking(int64_t N, int64_t C, int64_t S, int64_t align) {
  const int64_t target_warps = static_cast<int64_t>(sm_count()) * 64;
  const int64_t max_k = std::max<int64_t>(1, S / (kWarp * align * 4));
  Chunking ch;
  ch.K = std::min(max_k, std::max<int64_t>(1, ceil_div(target_warps, N * C)));
  ch.chunk = ceil_div(ceil_div(S, ch.K), align) * align;
  ch.K = ceil_div(S, ch.chunk);
  return ch;
}

// NSC: one block per (32-channel tile, sample, chunk of rows); aim for 8 blocks per SM,
// each of the 8 row-lanes with at least four rows.
inline Chunking nsc_chunking(int64_t N, int64_t C, int64_t S) {
  const int64_t target_blocks = static_cast<int64_t>(sm_count()) * 8;
  const int64_t max_k = std::max<int64_t>(1, S / (kTileRows * 4));
  Chunking ch;
  ch.K = std::min(max_k, std::max<int64_t>(1, ceil_div(target_blocks, N * ceil_div(C, kWarp))));
  ch.chunk = ceil_div(S, ch.K);
  ch.K = ceil_div(S, ch.chunk);
  return ch;
}

template <typename R>
__device__ __forceinline__ typename R::State warp_merge(const R& red, typename R::State s) {
  for (int delta = kWarp / 2; delta > 0; delta /= 2) R::merge(s, R::shfl_down(s, delta));
  return s;
}

template <int V, typename R>
__global__ void ncs_reduce_kernel(R red, int64_t N, int64_t C, int64_t S, Chunking ch) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  const int64_t items = N * C * ch.K;
  // `item` is the same for every lane of a warp, so the shuffles below see full warps.
  for (int64_t item = blockIdx.x * warps_per_block + threadIdx.x / kWarp; item < items;
       item += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t plane = item / ch.K, k = item % ch.K;
    const int64_t n = plane / C, c = plane % C;
    const int64_t begin = k * ch.chunk, end = min64(S, begin + ch.chunk);
    typename R::State s = red.begin(n, c);
    for (int64_t i = begin + lane * V; i < end; i += kWarp * V) red.template push<V>(s, plane * S + i);
    s = warp_merge(red, s);
    if (lane == 0) red.store(s, (n * ch.K + k) * C + c);
  }
}

template <typename R>
__global__ void nsc_reduce_kernel(R red, int64_t N, int64_t C, int64_t S, Chunking ch) {
  __shared__ typename R::State tile[kTileRows][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + tx;
  for (int64_t item = blockIdx.y; item < N * ch.K; item += gridDim.y) {
    const int64_t n = item / ch.K, k = item % ch.K;
    const int64_t begin = k * ch.chunk, end = min64(S, begin + ch.chunk);
    typename R::State s = red.begin(n, c < C ? c : 0);
    if (c < C) {
      for (int64_t i = begin + ty; i < end; i += kTileRows) red.template push<1>(s, (n * S + i) * C + c);
    }
    tile[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
      for (int j = 1; j < kTileRows; ++j) R::merge(s, tile[j][tx]);
      red.store(s, (n * ch.K + k) * C + c);
    }
    __syncthreads();  // the tile is reused by the next item
  }
}

// Whether the NCS reduction loads whole 16-byte vectors: every plane must start aligned.
template <typename scalar_t>
bool ncs_vectorized(const PlaneView& v, bool pointers_aligned) {
  constexpr int VW = vec_width<scalar_t>();
  return VW > 1 && pointers_aligned && !v.channels_last && v.S % VW == 0;
}

// The chunking of a reduction over `v` (callers size the [N][K][C] partials with it).
// `pointers_aligned`: every pointer the reduction reads is 16-byte aligned.
template <typename scalar_t>
Chunking plan_reduce(const PlaneView& v, bool pointers_aligned) {
  if (v.channels_last) return nsc_chunking(v.N, v.C, v.S);
  return ncs_chunking(v.N, v.C, v.S, ncs_vectorized<scalar_t>(v, pointers_aligned) ? vec_width<scalar_t>() : 1);
}

// Runs reduction `red` over every plane of `v` with the chunking from plan_reduce.
template <typename scalar_t, typename R>
void launch_reduce(const R& red, const PlaneView& v, const Chunking& ch, bool pointers_aligned) {
  constexpr int VW = vec_width<scalar_t>();
  const cudaStream_t stream = current_stream();
  if (v.channels_last) {
    const dim3 grid(static_cast<unsigned>(ceil_div(v.C, kWarp)),
                    static_cast<unsigned>(std::min<int64_t>(v.N * ch.K, 65535)));
    nsc_reduce_kernel<R><<<grid, dim3(kWarp, kTileRows), 0, stream>>>(red, v.N, v.C, v.S, ch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t warps = v.N * v.C * ch.K;
  const int64_t warps_per_block = kBlock / kWarp;
  const unsigned blocks = static_cast<unsigned>(
      std::min<int64_t>(ceil_div(warps, warps_per_block), static_cast<int64_t>(sm_count()) * 64));
  if (ncs_vectorized<scalar_t>(v, pointers_aligned)) {
    ncs_reduce_kernel<VW, R><<<blocks, kBlock, 0, stream>>>(red, v.N, v.C, v.S, ch);
  } else {
    ncs_reduce_kernel<1, R><<<blocks, kBlock, 0, stream>>>(red, v.N, v.C, v.S, ch);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Values of chunk k of a plane.
__device__ __forceinline__ int64_t chunk_values(const Chunking& ch, int64_t S, int64_t k) {
  return min64(ch.chunk, S - k * ch.chunk);
}

// Welford moments of x: State = (count, mean, M2).
template <typename scalar_t, typename acc_t>
struct MomentsReduction {
  const scalar_t* x;
  acc_t* mean_out;
  acc_t* m2_out;
  struct State {
    acc_t n, mean, m2;
  };
  __device__ __forceinline__ State begin(int64_t, int64_t) const { return {acc_t(0), acc_t(0), acc_t(0)}; }
  // The V values of a vector are merged as one group (its own two-pass moments in
  // registers, then Chan's merge): one division per vector instead of one per value.
  template <int V>
  __device__ __forceinline__ void push(State& s, int64_t offset) const {
    const Vec<scalar_t, V> in = load_vec<V>(x + offset);
    acc_t sum = 0;
#pragma unroll
    for (int l = 0; l < V; ++l) sum += static_cast<acc_t>(in.v[l]);
    const acc_t mean = sum / acc_t(V);  // V is a power of two: exact
    acc_t m2 = 0;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const acc_t delta = static_cast<acc_t>(in.v[l]) - mean;
      m2 += delta * delta;
    }
    merge(s, State{acc_t(V), mean, m2});
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) {
    const acc_t total = a.n + b.n;
    if (b.n == acc_t(0)) return;
    const acc_t delta = b.mean - a.mean;
    const acc_t fraction = b.n / total;
    a.mean += delta * fraction;
    a.m2 += b.m2 + delta * delta * a.n * fraction;
    a.n = total;
  }
  __device__ __forceinline__ static State shfl_down(const State& s, int delta) {
    return {__shfl_down_sync(0xffffffffu, s.n, delta), __shfl_down_sync(0xffffffffu, s.mean, delta),
            __shfl_down_sync(0xffffffffu, s.m2, delta)};
  }
  __device__ __forceinline__ void store(const State& s, int64_t index) const {
    mean_out[index] = s.mean;
    m2_out[index] = s.m2;
  }
};

// The per-row forward tables: y = act((x - center) * scale + beta); rows x C each.
template <typename acc_t>
struct Tables {
  const acc_t* center;
  const acc_t* scale;
  const acc_t* beta;
};

// Backward sums of g and g * (x - center) with g = dy masked by the fused ReLU (recomputed
// from the forward tables, so no saved output is needed). `rows` == nullptr: row = sample.
template <typename scalar_t, typename acc_t>
struct GradSumsReduction {
  const scalar_t* x;
  const scalar_t* dy;
  const int32_t* rows;
  Tables<acc_t> t;
  int64_t C;
  bool relu;
  acc_t* s1_out;
  acc_t* s2_out;
  struct State {
    acc_t s1, s2, center, scale, beta;
  };
  __device__ __forceinline__ State begin(int64_t n, int64_t c) const {
    const int64_t k = (rows != nullptr ? rows[n] : n) * C + c;
    return {acc_t(0), acc_t(0), t.center[k], t.scale[k], t.beta[k]};
  }
  template <int V>
  __device__ __forceinline__ void push(State& s, int64_t offset) const {
    const Vec<scalar_t, V> xin = load_vec<V>(x + offset);
    const Vec<scalar_t, V> gin = load_vec<V>(dy + offset);
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const acc_t xc = static_cast<acc_t>(xin.v[l]) - s.center;
      const acc_t g = relu && xc * s.scale + s.beta <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(gin.v[l]);
      s.s1 += g;
      s.s2 += g * xc;
    }
  }
  __device__ __forceinline__ static void merge(State& a, const State& b) {
    a.s1 += b.s1;
    a.s2 += b.s2;
  }
  __device__ __forceinline__ static State shfl_down(const State& s, int delta) {
    return {__shfl_down_sync(0xffffffffu, s.s1, delta), __shfl_down_sync(0xffffffffu, s.s2, delta), s.center,
            s.scale, s.beta};
  }
  __device__ __forceinline__ void store(const State& s, int64_t index) const {
    s1_out[index] = s.s1;
    s2_out[index] = s.s2;
  }
};

// ---- (3) Elementwise passes. An elementwise policy E provides
//   apply<V, CL>(offset, n, c)  the V values at flat element `offset` of sample n, starting
//                               at channel c (NSC: channels c..c+V-1; NCS: channel c)

template <int V, bool CL, typename index_t, typename E>
__global__ void elementwise_kernel(E op, index_t vectors, index_t C, index_t S) {
  for (index_t j = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < vectors;
       j += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t i = j * V;
    index_t n, c;
    if (CL) {
      const index_t pixel = i / C;
      c = i - pixel * C;
      n = pixel / S;
    } else {
      const index_t plane = i / S;
      n = plane / C;
      c = plane - n * C;
    }
    op.template apply<V, CL>(static_cast<int64_t>(i), static_cast<int64_t>(n), static_cast<int64_t>(c));
  }
}

// Runs `op` over every element of `v`, 16-byte vectors where the layout and `vector_ok`
// (every pointer of `op` 16-byte aligned) allow, 32-bit index math where it fits.
template <typename scalar_t, typename E>
void launch_elementwise(const E& op, const PlaneView& v, bool vector_ok) {
  constexpr int VW = vec_width<scalar_t>();
  const int64_t numel = v.N * v.C * v.S;
  const bool vectorize = VW > 1 && vector_ok && (v.channels_last ? v.C % VW == 0 : v.S % VW == 0);
  const int64_t width = vectorize ? VW : 1;
  const int64_t vectors = numel / width;
  const unsigned blocks = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(vectors, kBlock), static_cast<int64_t>(sm_count()) * 16)));
  const cudaStream_t stream = current_stream();
  const bool narrow = numel + static_cast<int64_t>(blocks) * kBlock * width < INT32_MAX;
  auto launch = [&](auto vec_tag, auto cl_tag) {
    constexpr int W = decltype(vec_tag)::value;
    constexpr bool CL = decltype(cl_tag)::value;
    if (narrow) {
      elementwise_kernel<W, CL, int32_t, E><<<blocks, kBlock, 0, stream>>>(
          op, static_cast<int32_t>(vectors), static_cast<int32_t>(v.C), static_cast<int32_t>(v.S));
    } else {
      elementwise_kernel<W, CL, int64_t, E><<<blocks, kBlock, 0, stream>>>(op, vectors, v.C, v.S);
    }
  };
  using Scalar = std::integral_constant<int, 1>;
  using Vector = std::integral_constant<int, VW>;
  using NSC = std::true_type;
  using NCS = std::false_type;
  if (vectorize && v.channels_last) launch(Vector{}, NSC{});
  else if (vectorize) launch(Vector{}, NCS{});
  else if (v.channels_last) launch(Scalar{}, NSC{});
  else launch(Scalar{}, NCS{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y = act((x - center[r]) * scale[r] + beta[r]); `rows` == nullptr: row = sample.
template <typename scalar_t, typename acc_t>
struct AffineOp {
  const scalar_t* x;
  scalar_t* y;
  const int32_t* rows;
  Tables<acc_t> t;
  int64_t C;
  bool relu;
  template <int V, bool CL>
  __device__ __forceinline__ void apply(int64_t offset, int64_t n, int64_t c) const {
    const int64_t base = (rows != nullptr ? rows[n] : n) * C + c;
    const Vec<scalar_t, V> in = load_vec<V>(x + offset);
    Vec<scalar_t, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int64_t k = CL ? base + l : base;
      const acc_t pre = (static_cast<acc_t>(in.v[l]) - t.center[k]) * t.scale[k] + t.beta[k];
      out.v[l] = static_cast<scalar_t>(relu && pre < acc_t(0) ? acc_t(0) : pre);  // NaN stays NaN, as torch.relu
    }
    store_vec<V>(y + offset, out);
  }
};

// dx = ka[r] g + kx[r] (x - center[r]) + k0[r], g = dy masked by the fused ReLU.
template <typename scalar_t, typename acc_t>
struct InputGradOp {
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  const int32_t* rows;
  Tables<acc_t> t;
  const acc_t* ka;
  const acc_t* kx;
  const acc_t* k0;
  int64_t C;
  bool relu;
  template <int V, bool CL>
  __device__ __forceinline__ void apply(int64_t offset, int64_t n, int64_t c) const {
    const int64_t base = (rows != nullptr ? rows[n] : n) * C + c;
    const Vec<scalar_t, V> xin = load_vec<V>(x + offset);
    const Vec<scalar_t, V> gin = load_vec<V>(dy + offset);
    Vec<scalar_t, V> out;
#pragma unroll
    for (int l = 0; l < V; ++l) {
      const int64_t k = CL ? base + l : base;
      const acc_t xc = static_cast<acc_t>(xin.v[l]) - t.center[k];
      const acc_t g = relu && xc * t.scale[k] + t.beta[k] <= acc_t(0) ? acc_t(0) : static_cast<acc_t>(gin.v[l]);
      out.v[l] = static_cast<scalar_t>(ka[k] * g + kx[k] * xc + k0[k]);
    }
    store_vec<V>(dx + offset, out);
  }
};

// A (3, rows, C) accumulation-type tensor viewed as the three forward tables.
template <typename acc_t>
Tables<acc_t> tables_of(const at::Tensor& t3) {
  const acc_t* p = t3.data_ptr<acc_t>();
  const int64_t plane = t3.size(1) * t3.size(2);
  return {p, p + plane, p + 2 * plane};
}

}  // namespace cuda
}  // namespace unirep
