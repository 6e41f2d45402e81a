// The passes over memory that every domain-muxed normalization on the CPU is made of.
//
// A normalization op is: (1) per-(sample, channel) moments of x, (2) tiny per-channel
// "table math" that turns them into per-row tables (center, scale, beta), (3) one
// elementwise pass y = act((x - center[r]) * scale[r] + beta[r]) where r is the sample's
// table row (its domain for batch norm, the sample itself for instance norm). The backward
// is the same shape: (1) per-(sample, channel) sums of g and g * (x - center), (2) table
// math giving dweight, dbias and coefficients, (3) dx = ka[r] g + kx[r] (x - center[r]) +
// k0[r], where g is dy masked by the fused ReLU. Only steps (1) and (3) touch x, so a
// training forward reads x twice and writes y once; eval reads once and writes once.
//
// Every pass works on a "plane view" of x: NCS (contiguous, planes of S values) or NSC
// (channels_last: per sample an S x C block with channels innermost). The loops over one
// plane or one block are the vectorized kernels of pass_kernels.h; this file schedules
// them. Batch norm (statistics shared across samples) on NCS with planes of at least
// kChannelWalkPlaneBytes runs channel by channel (parallel over channels): reduction, table
// math and elementwise pass of one channel back to back, so the second pass re-reads the
// channel's N planes from cache, not from memory; smaller planes run each pass over all
// planes in memory order (the channel walk would read a few cache lines per plane);
// on NSC each pass runs over all samples (parallel over samples), then the next. Instance
// norm (statistics of one plane) runs a few planes at a time (NCS: runs of about
// kRunValues values within a sample) or sample by sample (NSC), its three steps back to
// back while those planes (L1) or the sample's block (L2) are in cache. A kernel call covers a run
// of planes (a channel's N planes, a sample's C planes), not one: small planes (8x8) do
// not pay a call and table lookups each. The batch-norm backward goes further where the
// batch comes in runs of one domain (a pure batch): a run's planes share one set of
// tables, so their sums are accumulated in one set of vector registers and folded to
// scalars once per kSumValues values, not once per plane.
//
// Each output element is written by exactly one thread and reductions run in a fixed
// order, so results are bitwise deterministic whatever the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../norm_common.h"
#include "pass_kernels.h"

namespace unirep {
namespace cpu {

// Values handled per parallel task; below this, threads cost more than they save.
constexpr int64_t kGrainValues = 32768;
// Outputs of at least this many bytes are written with non-temporal stores when the
// last-level cache size is unknown (otherwise: its size; see pass_kernels.cpp).
constexpr int64_t kDefaultStreamBytes = int64_t(32) << 20;

// The pass kernels of the instruction set chosen for this process (pass_kernels.cpp).
const PassKernelSet& pass_kernel_set();
// Whether an output of this size is written with non-temporal stores: one that fills the
// last-level cache would not stay there for its reader anyway, and bypassing the cache
// saves reading each line before it is written. Environment override
// UNIREP_CPU_STREAM_STORES=always|never|auto (auto: this size rule).
bool stream_stores(int64_t output_bytes);

template <typename scalar_t>
struct KernelsOf;
template <>
struct KernelsOf<float> {
  static const PassKernels<float>& get() { return pass_kernel_set().f32; }
};
template <>
struct KernelsOf<double> {
  static const PassKernels<double>& get() { return pass_kernel_set().f64; }
};
template <>
struct KernelsOf<c10::Half> {
  static const PassKernels<float>& get() { return pass_kernel_set().f16; }
};
template <>
struct KernelsOf<c10::BFloat16> {
  static const PassKernels<float>& get() { return pass_kernel_set().bf16; }
};

// The kernels that read and write scalar_t (accumulating in its op-math type).
template <typename scalar_t>
const PassKernels<at::opmath_type<scalar_t>>& pass_kernels() {
  return KernelsOf<scalar_t>::get();
}

// Per-row tables, (rows, C) row-major in acc_t: y = act((x - center) * scale + beta).
template <typename acc_t>
struct AffineTables {
  std::vector<acc_t> center, scale, beta;
  AffineTables(int64_t rows, int64_t C) : center(rows * C), scale(rows * C), beta(rows * C) {}
};

// Per-row backward coefficients: dx = ka g + kx (x - center) + k0.
template <typename acc_t>
struct InputGradTables {
  std::vector<acc_t> ka, kx, k0;
  InputGradTables(int64_t rows, int64_t C) : ka(rows * C), kx(rows * C), k0(rows * C) {}
};

// Samples per parallel task of the NSC passes.
inline int64_t sample_grain(const PlaneView& v) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(v.S * v.C, 1));
}

// Planes per parallel task of the plane-by-plane NCS passes.
inline int64_t plane_grain(const PlaneView& v) {
  return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(v.S, 1));
}

// Values of x (and dy) an instance-norm run covers before its second pass reads them again:
// small enough that the second pass reads from L1 (16 KiB of float32 each).
constexpr int64_t kRunValues = 4096;

// Planes per run of the instance-norm passes (at least one).
inline int64_t run_planes(const PlaneView& v) {
  return std::max<int64_t>(1, kRunValues / std::max<int64_t>(v.S, 1));
}

// Calls f(n, c0, c1) for runs of the planes [begin, end) (plane p = n * C + c) that stay
// within one sample and hold at most `chunk` planes: one kernel call per run.
template <typename F>
inline void for_plane_runs(int64_t begin, int64_t end, int64_t C, int64_t chunk, const F& f) {
  for (int64_t p = begin; p < end;) {
    const int64_t n = p / C, c0 = p % C;
    const int64_t c1 = std::min({C, c0 + chunk, c0 + (end - p)});
    f(n, c0, c1);
    p += c1 - c0;
  }
}

// One channel's tables, gathered in sample order (row rows[n] of each), for the plane
// kernels of a channel's N planes.
template <typename acc_t>
struct ChannelRows {
  std::vector<acc_t> v[6];
  explicit ChannelRows(int64_t N) {
    for (auto& a : v) a.resize(N);
  }
  void gather(int which, const std::vector<acc_t>& table, const int64_t* rows, int64_t N, int64_t C, int64_t c) {
    for (int64_t n = 0; n < N; ++n) v[which][n] = table[rows[n] * C + c];
  }
  const acc_t* operator[](int which) const { return v[which].data(); }
};

// ---- Elementwise passes over all samples.

// NSC: y of every sample block with the tables of its row.
template <typename scalar_t, typename acc_t>
void nsc_affine(const PlaneView& v, at::Tensor& y, const int64_t* rows, const AffineTables<acc_t>& t, bool relu,
                bool stream) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  at::parallel_for(0, v.N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = rows[n] * C;
      K.block_affine(x + n * S * C, out + n * S * C, S, C, t.center.data() + r, t.scale.data() + r,
                     t.beta.data() + r, relu, stream, scratch.data());
    }
    if (stream) K.fence();
  });
}

// The NCS elementwise pass in memory order (plane p = n * C + c uses table row rows[n]).
template <typename scalar_t, typename acc_t>
void ncs_affine(const PlaneView& v, at::Tensor& y, const int64_t* rows, const AffineTables<acc_t>& t, bool relu,
                bool stream) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  at::parallel_for(0, v.N * C, plane_grain(v), [&](int64_t begin, int64_t end) {
    for_plane_runs(begin, end, C, C, [&](int64_t n, int64_t c0, int64_t c1) {
      const int64_t p = n * C + c0, k = rows[n] * C + c0;
      K.plane_affine(x + p * S, out + p * S, c1 - c0, S, S, &t.center[k], &t.scale[k], &t.beta[k], relu, stream);
    });
    if (stream) K.fence();
  });
}

// Forward without a reduction (normalization by given moments): one elementwise pass.
template <typename scalar_t, typename acc_t>
void run_affine(const PlaneView& v, at::Tensor& y, const int64_t* rows, const AffineTables<acc_t>& t, bool relu) {
  const bool stream = stream_stores(y.nbytes());
  if (v.channels_last) {
    nsc_affine<scalar_t, acc_t>(v, y, rows, t, relu, stream);
    return;
  }
  // Nothing to reuse from cache here: walk the planes in memory order.
  ncs_affine<scalar_t, acc_t>(v, y, rows, t, relu, stream);
}

// Planes of fewer bytes than this are not walked channel by channel in the batch-norm
// training forward: a channel's N planes are then a few cache lines every C * S values,
// which the hardware prefetchers do not follow, so the walk reads at a fraction of the
// bandwidth. Such batches take two passes in memory order instead (moments, then affine);
// the per-plane moments and their merge are the same, so the results are bitwise those of
// the channel walk. Measured on a 2-core EPYC (2026-12-07, docs/benchmarks.md): 8x8 planes
// 1.55x -> 2.75x native F.batch_norm (float32), 0.49x -> 0.92x (float16); 32x32 float16
// 0.95x -> 1.3x; 4-16 KiB planes of 16-64 MiB batches within noise of the channel walk.
constexpr int64_t kChannelWalkPlaneBytes = 8192;

// ---- Batch norm: statistics shared by the samples of a group. `tables(c)` /
// `coefs(c)` merge channel c's per-plane results and must only touch channel c.

// Forward: moments(all planes) -> tables(c) -> y.
template <typename scalar_t, typename acc_t, typename Tables>
void run_forward(const PlaneView& v, at::Tensor& y, const int64_t* rows, AffineTables<acc_t>& t, bool relu,
                 acc_t* pmean, acc_t* pm2, const Tables& tables) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const int64_t N = v.N, C = v.C, S = v.S;
  const bool stream = stream_stores(y.nbytes());
  if (!v.channels_last && S * static_cast<int64_t>(sizeof(scalar_t)) < kChannelWalkPlaneBytes) {
    at::parallel_for(0, N * C, plane_grain(v), [&](int64_t begin, int64_t end) {
      for_plane_runs(begin, end, C, C, [&](int64_t n, int64_t c0, int64_t c1) {
        const int64_t p = n * C + c0;
        K.plane_moments(x + p * S, c1 - c0, S, S, pmean + p, pm2 + p);
      });
    });
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) tables(c);
    });
    ncs_affine<scalar_t, acc_t>(v, y, rows, t, relu, stream);
    return;
  }
  if (!v.channels_last) {
    scalar_t* out = y.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      ChannelRows<acc_t> r(N);  // 0, 1: the channel's plane moments; 2, 3, 4: its tables
      for (int64_t c = begin; c < end; ++c) {
        K.plane_moments(x + c * S, N, C * S, S, r.v[0].data(), r.v[1].data());
        for (int64_t n = 0; n < N; ++n) {
          pmean[n * C + c] = r.v[0][n];
          pm2[n * C + c] = r.v[1][n];
        }
        tables(c);
        r.gather(2, t.center, rows, N, C, c);
        r.gather(3, t.scale, rows, N, C, c);
        r.gather(4, t.beta, rows, N, C, c);
        K.plane_affine(x + c * S, out + c * S, N, C * S, S, r[2], r[3], r[4], relu, stream);
      }
      if (stream) K.fence();
    });
    return;
  }
  at::parallel_for(0, N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      K.block_moments(x + n * S * C, S, C, pmean + n * C, pm2 + n * C, scratch.data());
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) tables(c);
  });
  nsc_affine<scalar_t, acc_t>(v, y, rows, t, relu, stream);
}

// Values summed in float vectors before the sums are folded and added in double: a run
// of one domain's planes is cut into pieces of at most this many values (planes of more
// are summed one by one), which bounds the float rounding error whatever the batch size.
constexpr int64_t kSumValues = 4096;
// The backward walks a batch by runs of one domain when its runs average at least this many
// samples; shorter runs cost a kernel call each, more than the per-plane table gathers.
constexpr int64_t kMinRunPlanes = 4;

// Backward: sums(all planes) -> coefficients(c) -> dx. The sums of channel c are gathered per
// table row (domain) in double, in sample order: row_s1[r * C + c] = sum g and row_s2 =
// sum g (x - center) over the samples of row r (zeroed by the caller).
template <typename scalar_t, typename acc_t, typename Coefs>
void run_backward(const PlaneView& v, const at::Tensor& dy, at::Tensor& dx, const int64_t* rows,
                  const AffineTables<acc_t>& t, InputGradTables<acc_t>& k, bool relu, double* row_s1,
                  double* row_s2, const Coefs& coefs) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  const int64_t N = v.N, C = v.C, S = v.S;
  const bool stream = stream_stores(dx.nbytes());
  if (!v.channels_last) {
    // Channel c's planes in sample order. Where the batch comes in runs of one domain (a pure
    // batch is one run), each run is summed with its domain's tables in one set of vector
    // registers and folded once per piece of kSumValues values; a batch of short runs is
    // walked plane by plane with the tables gathered per sample (one call for the N planes).
    // The batch's runs (start of each, and of each piece of at most sum_planes planes): the
    // same for every channel, so found once.
    const int64_t sum_planes = std::max<int64_t>(1, kSumValues / std::max<int64_t>(S, 1));
    std::vector<int64_t> run_starts, piece_starts;
    for (int64_t n = 0; n < N; ++n) {
      const bool new_run = n == 0 || rows[n] != rows[n - 1];
      if (new_run) run_starts.push_back(n);
      if (new_run || n - piece_starts.back() == sum_planes) piece_starts.push_back(n);
    }
    run_starts.push_back(N);
    piece_starts.push_back(N);
    const bool by_runs = (static_cast<int64_t>(run_starts.size()) - 1) * kMinRunPlanes <= N;
    // Calls f(first sample, samples) for each of `starts`' spans of channel c.
    auto for_spans = [&](const std::vector<int64_t>& starts, const auto& f) {
      for (size_t i = 0; i + 1 < starts.size(); ++i) f(starts[i], starts[i + 1] - starts[i]);
    };
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      ChannelRows<acc_t> r(by_runs ? 0 : N);  // 0, 1, 2: forward tables; 3, 4, 5: dx coefficients
      std::vector<acc_t> s1(by_runs ? 0 : N), s2(by_runs ? 0 : N);
      for (int64_t c = begin; c < end; ++c) {
        if (by_runs) {
          for_spans(piece_starts, [&](int64_t n0, int64_t count) {
            const int64_t k0 = rows[n0] * C + c, o = (n0 * C + c) * S;
            acc_t a1, a2;
            K.shared_grad_sums(x + o, g + o, count, C * S, S, t.center[k0], t.scale[k0], t.beta[k0], relu, &a1, &a2);
            row_s1[k0] += a1;
            row_s2[k0] += a2;
          });
          coefs(c);
          for_spans(run_starts, [&](int64_t n0, int64_t count) {
            const int64_t k0 = rows[n0] * C + c, o = (n0 * C + c) * S;
            K.shared_input_grad(x + o, g + o, out + o, count, C * S, S, t.center[k0], t.scale[k0], t.beta[k0],
                                k.ka[k0], k.kx[k0], k.k0[k0], relu, stream);
          });
          continue;
        }
        r.gather(0, t.center, rows, N, C, c);
        r.gather(1, t.scale, rows, N, C, c);
        r.gather(2, t.beta, rows, N, C, c);
        K.plane_grad_sums(x + c * S, g + c * S, N, C * S, S, r[0], r[1], r[2], relu, s1.data(), s2.data());
        for (int64_t n = 0; n < N; ++n) {
          row_s1[rows[n] * C + c] += s1[n];
          row_s2[rows[n] * C + c] += s2[n];
        }
        coefs(c);
        r.gather(3, k.ka, rows, N, C, c);
        r.gather(4, k.kx, rows, N, C, c);
        r.gather(5, k.k0, rows, N, C, c);
        K.plane_input_grad(x + c * S, g + c * S, out + c * S, N, C * S, S, r[0], r[1], r[2], r[3], r[4], r[5], relu,
                           stream);
      }
      if (stream) K.fence();
    });
    return;
  }
  std::vector<acc_t> ps1(N * C), ps2(N * C);  // per (sample, channel)
  at::parallel_for(0, N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = rows[n] * C;
      K.block_grad_sums(x + n * S * C, g + n * S * C, S, C, t.center.data() + r, t.scale.data() + r,
                        t.beta.data() + r, relu, ps1.data() + n * C, ps2.data() + n * C, scratch.data());
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        row_s1[rows[n] * C + c] += ps1[n * C + c];
        row_s2[rows[n] * C + c] += ps2[n * C + c];
      }
      coefs(c);
    }
  });
  at::parallel_for(0, N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = rows[n] * C;
      K.block_input_grad(x + n * S * C, g + n * S * C, out + n * S * C, S, C, t.center.data() + r,
                         t.scale.data() + r, t.beta.data() + r, k.ka.data() + r, k.kx.data() + r, k.k0.data() + r,
                         relu, stream, scratch.data());
    }
    if (stream) K.fence();
  });
}

// ---- Instance norm: the tables of sample n depend on sample n alone (table row = n).
// `tables(n, c0, c1)` / `coefs(n, c0, c1)` fill row n for channels [c0, c1).

template <typename scalar_t, typename acc_t, typename Tables>
void run_instance_forward(const PlaneView& v, at::Tensor& y, const AffineTables<acc_t>& t, bool relu, acc_t* pmean,
                          acc_t* pm2, const Tables& tables) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const bool stream = stream_stores(y.nbytes());
  if (!v.channels_last) {
    at::parallel_for(0, v.N * C, plane_grain(v), [&](int64_t begin, int64_t end) {
      for_plane_runs(begin, end, C, run_planes(v), [&](int64_t n, int64_t c0, int64_t c1) {
        const int64_t p = n * C + c0;
        K.plane_moments(x + p * S, c1 - c0, S, S, pmean + p, pm2 + p);
        tables(n, c0, c1);
        K.plane_affine(x + p * S, out + p * S, c1 - c0, S, S, &t.center[p], &t.scale[p], &t.beta[p], relu, stream);
      });
      if (stream) K.fence();
    });
    return;
  }
  at::parallel_for(0, v.N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      K.block_moments(x + n * S * C, S, C, pmean + n * C, pm2 + n * C, scratch.data());
      tables(n, int64_t(0), C);
      K.block_affine(x + n * S * C, out + n * S * C, S, C, t.center.data() + n * C, t.scale.data() + n * C,
                     t.beta.data() + n * C, relu, stream, scratch.data());
    }
    if (stream) K.fence();
  });
}

template <typename scalar_t, typename acc_t, typename Coefs>
void run_instance_backward(const PlaneView& v, const at::Tensor& dy, at::Tensor& dx, const AffineTables<acc_t>& t,
                           const InputGradTables<acc_t>& k, bool relu, acc_t* ps1, acc_t* ps2, const Coefs& coefs) {
  const PassKernels<acc_t>& K = pass_kernels<scalar_t>();
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const bool stream = stream_stores(dx.nbytes());
  if (!v.channels_last) {
    at::parallel_for(0, v.N * C, plane_grain(v), [&](int64_t begin, int64_t end) {
      for_plane_runs(begin, end, C, run_planes(v), [&](int64_t n, int64_t c0, int64_t c1) {
        const int64_t p = n * C + c0;
        K.plane_grad_sums(x + p * S, g + p * S, c1 - c0, S, S, &t.center[p], &t.scale[p], &t.beta[p], relu, ps1 + p,
                          ps2 + p);
        coefs(n, c0, c1);
        K.plane_input_grad(x + p * S, g + p * S, out + p * S, c1 - c0, S, S, &t.center[p], &t.scale[p], &t.beta[p],
                           &k.ka[p], &k.kx[p], &k.k0[p], relu, stream);
      });
      if (stream) K.fence();
    });
    return;
  }
  at::parallel_for(0, v.N, sample_grain(v), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(block_scratch_size(C));
    for (int64_t n = begin; n < end; ++n) {
      const int64_t r = n * C;
      K.block_grad_sums(x + r * S, g + r * S, S, C, t.center.data() + r, t.scale.data() + r, t.beta.data() + r, relu,
                        ps1 + r, ps2 + r, scratch.data());
      coefs(n, int64_t(0), C);
      K.block_input_grad(x + r * S, g + r * S, out + r * S, S, C, t.center.data() + r, t.scale.data() + r,
                         t.beta.data() + r, k.ka.data() + r, k.kx.data() + r, k.k0.data() + r, relu, stream,
                         scratch.data());
    }
    if (stream) K.fence();
  });
}

// Reads an optional (R, C) or (C,) parameter as acc_t values; row(r) gives row r, or the
// single row of a (C,) tensor; absent tensors read as `fill`.
template <typename acc_t>
struct ParamRows {
  at::Tensor values;  // contiguous acc_t copy (tiny)
  const acc_t* data = nullptr;
  bool per_row = false;
  acc_t fill;
  int64_t C;
  // `rows`: the row count a 2-d parameter must have (num_domains).
  ParamRows(const c10::optional<at::Tensor>& p, int64_t rows, int64_t C_, acc_t fill_, at::ScalarType acc,
            const char* name)
      : fill(fill_), C(C_) {
    if (p.has_value() && p->defined()) {
      check_param_shape(p, rows, C, name);
      values = p->to(acc).contiguous();
      data = values.data_ptr<acc_t>();
      per_row = p->dim() == 2;
    }
  }
  acc_t at(int64_t row, int64_t c) const {
    if (data == nullptr) return fill;
    return data[(per_row ? row * C : 0) + c];
  }
};

// Each sample's domain as a host array: from the index tensor (range-checked: this is the
// kernel-side guard that also holds under torch.compile) or the pure-batch domain.
inline std::vector<int64_t> sample_domains(const c10::optional<at::Tensor>& domain, int64_t pure_domain,
                                           int64_t N, int64_t num_domains, const char* op) {
  std::vector<int64_t> rows(N);
  if (domain.has_value() && domain->defined()) {
    TORCH_CHECK(domain->scalar_type() == at::kLong && domain->dim() == 1 && domain->size(0) == N, op,
                ": domain must be an int64 tensor of shape (", N, ",), got ", domain->scalar_type(), " ",
                domain->sizes());
    const at::Tensor d = domain->contiguous();
    const int64_t* p = d.data_ptr<int64_t>();
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK_VALUE(p[n] >= 0 && p[n] < num_domains, op, ": domain values must lie in [0, num_domains=",
                        num_domains, "), got ", p[n], " at position ", n);
      rows[n] = p[n];
    }
  } else {
    TORCH_CHECK_VALUE(pure_domain >= 0 && pure_domain < num_domains, op, ": domain must lie in [0, num_domains=",
                      num_domains, "), got ", pure_domain);
    std::fill(rows.begin(), rows.end(), pure_domain);
  }
  return rows;
}

}  // namespace cpu
}  // namespace unirep
