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
// (channels_last: per sample an S x C block with channels innermost). NCS runs channel by
// channel (parallel over channels): reduction, table math and elementwise pass of one
// channel back to back, so the second pass re-reads the channel's N planes from cache, not
// from memory. NSC runs each pass over all samples (parallel over samples), then the next.
// Each output element is written by exactly one thread and reductions run in a fixed
// order, so results are bitwise deterministic whatever the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../norm_common.h"

namespace unirep {
namespace cpu {

// Values handled per parallel task; below this, threads cost more than they save.
constexpr int64_t kGrainValues = 32768;

// The fused ReLU, as torch.relu: negatives become 0, NaN stays NaN; its gradient passes
// where the pre-activation is not <= 0 (torch's threshold_backward rule).
template <typename acc_t>
inline acc_t activate(acc_t pre, bool relu) {
  return relu && pre < 0 ? acc_t(0) : pre;
}
template <typename acc_t>
inline bool relu_blocks(acc_t pre, bool relu) {
  return relu && pre <= 0;
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

// ---- The pass bodies over one NCS plane (S contiguous values of one sample and channel).
// `omp simd reduction` lets the compiler split sums over vector lanes in a fixed order for
// a given build (deterministic).

// Forward reduction: mean and M2 of one plane; two passes (the second hits cache), the
// first shifted by the plane's first value so a large common offset costs no precision.
template <typename scalar_t, typename acc_t>
inline void plane_moments(const scalar_t* x, int64_t S, acc_t& mean_out, acc_t& m2_out) {
  const acc_t shift = static_cast<acc_t>(x[0]);
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < S; ++s) sum += static_cast<acc_t>(x[s]) - shift;
  const acc_t mean = shift + sum / S;
  acc_t m2 = 0;
#pragma omp simd reduction(+ : m2)
  for (int64_t s = 0; s < S; ++s) {
    const acc_t d = static_cast<acc_t>(x[s]) - mean;
    m2 += d * d;
  }
  mean_out = mean;
  m2_out = m2;
}

// Forward elementwise: y = act((x - m) * a + b) over one plane.
template <typename scalar_t, typename acc_t>
inline void plane_affine(const scalar_t* x, scalar_t* y, int64_t S, acc_t m, acc_t a, acc_t b, bool relu) {
  if (relu) {
    for (int64_t s = 0; s < S; ++s) y[s] = static_cast<scalar_t>(activate((static_cast<acc_t>(x[s]) - m) * a + b, true));
  } else {
    for (int64_t s = 0; s < S; ++s) y[s] = static_cast<scalar_t>((static_cast<acc_t>(x[s]) - m) * a + b);
  }
}

// Backward reduction: sums of g and g * (x - m) over one plane, g = dy masked by the ReLU
// recomputed from the forward tables (no saved output needed).
template <typename scalar_t, typename acc_t>
inline void plane_grad_sums(const scalar_t* x, const scalar_t* dy, int64_t S, acc_t m, acc_t a, acc_t b, bool relu,
                            acc_t& s1_out, acc_t& s2_out) {
  acc_t s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t s = 0; s < S; ++s) {
    const acc_t xc = static_cast<acc_t>(x[s]) - m;
    acc_t gv = static_cast<acc_t>(dy[s]);
    if (relu_blocks(xc * a + b, relu)) gv = 0;
    s1 += gv;
    s2 += gv * xc;
  }
  s1_out = s1;
  s2_out = s2;
}

// Backward elementwise: dx = ka g + kx (x - m) + k0 over one plane.
template <typename scalar_t, typename acc_t>
inline void plane_input_grad(const scalar_t* x, const scalar_t* dy, scalar_t* dx, int64_t S, acc_t m, acc_t a,
                             acc_t b, acc_t ka, acc_t kx, acc_t k0, bool relu) {
  for (int64_t s = 0; s < S; ++s) {
    const acc_t xc = static_cast<acc_t>(x[s]) - m;
    acc_t gv = static_cast<acc_t>(dy[s]);
    if (relu_blocks(xc * a + b, relu)) gv = 0;
    dx[s] = static_cast<scalar_t>(ka * gv + kx * xc + k0);
  }
}

// ---- NCS (contiguous) drivers: one channel at a time, all samples. An op runs its
// reduction, its table math and its elementwise pass for a channel back to back, so the
// elementwise pass re-reads the channel's N planes from cache, not from memory.

template <typename scalar_t, typename acc_t>
void channel_moments(const PlaneView& v, int64_t c, acc_t* pmean, acc_t* pm2) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  for (int64_t n = 0; n < v.N; ++n) {
    const int64_t p = n * v.C + c;
    plane_moments<scalar_t, acc_t>(x + p * v.S, v.S, pmean[p], pm2[p]);
  }
}

template <typename scalar_t, typename acc_t>
void channel_affine(const PlaneView& v, at::Tensor& y, int64_t c, const int64_t* rows, const AffineTables<acc_t>& t,
                    bool relu) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  for (int64_t n = 0; n < v.N; ++n) {
    const int64_t p = n * v.C + c, k = rows[n] * v.C + c;
    plane_affine<scalar_t, acc_t>(x + p * v.S, out + p * v.S, v.S, t.center[k], t.scale[k], t.beta[k], relu);
  }
}

template <typename scalar_t, typename acc_t>
void channel_grad_sums(const PlaneView& v, const at::Tensor& dy, int64_t c, const int64_t* rows,
                       const AffineTables<acc_t>& t, bool relu, acc_t* ps1, acc_t* ps2) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  for (int64_t n = 0; n < v.N; ++n) {
    const int64_t p = n * v.C + c, k = rows[n] * v.C + c;
    plane_grad_sums<scalar_t, acc_t>(x + p * v.S, g + p * v.S, v.S, t.center[k], t.scale[k], t.beta[k], relu, ps1[p],
                                     ps2[p]);
  }
}

template <typename scalar_t, typename acc_t>
void channel_input_grad(const PlaneView& v, const at::Tensor& dy, at::Tensor& dx, int64_t c, const int64_t* rows,
                        const AffineTables<acc_t>& t, const InputGradTables<acc_t>& k, bool relu) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  for (int64_t n = 0; n < v.N; ++n) {
    const int64_t p = n * v.C + c, r = rows[n] * v.C + c;
    plane_input_grad<scalar_t, acc_t>(x + p * v.S, g + p * v.S, out + p * v.S, v.S, t.center[r], t.scale[r],
                                      t.beta[r], k.ka[r], k.kx[r], k.k0[r], relu);
  }
}

// ---- NSC (channels_last) drivers: parallel over samples, channels innermost (vectorized).

template <typename scalar_t, typename acc_t>
void nsc_moments(const PlaneView& v, acc_t* pmean, acc_t* pm2) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(S * C, 1));
  at::parallel_for(0, v.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(C), sum(C);
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* block = x + n * S * C;
      acc_t* mean = pmean + n * C;
      acc_t* m2 = pm2 + n * C;
      for (int64_t c = 0; c < C; ++c) {
        shift[c] = static_cast<acc_t>(block[c]);
        sum[c] = 0;
        m2[c] = 0;
      }
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* row = block + s * C;
        for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc_t>(row[c]) - shift[c];
      }
      for (int64_t c = 0; c < C; ++c) mean[c] = shift[c] + sum[c] / S;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* row = block + s * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - mean[c];
          m2[c] += d * d;
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void nsc_affine(const PlaneView& v, at::Tensor& y, const int64_t* rows, const AffineTables<acc_t>& t, bool relu) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(S * C, 1));
  at::parallel_for(0, v.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* m = t.center.data() + rows[n] * C;
      const acc_t* a = t.scale.data() + rows[n] * C;
      const acc_t* b = t.beta.data() + rows[n] * C;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* in = x + (n * S + s) * C;
        scalar_t* o = out + (n * S + s) * C;
        for (int64_t c = 0; c < C; ++c) {
          o[c] = static_cast<scalar_t>(activate((static_cast<acc_t>(in[c]) - m[c]) * a[c] + b[c], relu));
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void nsc_grad_sums(const PlaneView& v, const at::Tensor& dy, const int64_t* rows, const AffineTables<acc_t>& t,
                   bool relu, acc_t* ps1, acc_t* ps2) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(S * C, 1));
  at::parallel_for(0, v.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* m = t.center.data() + rows[n] * C;
      const acc_t* a = t.scale.data() + rows[n] * C;
      const acc_t* b = t.beta.data() + rows[n] * C;
      acc_t* s1 = ps1 + n * C;
      acc_t* s2 = ps2 + n * C;
      for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* in = x + (n * S + s) * C;
        const scalar_t* gp = g + (n * S + s) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xc = static_cast<acc_t>(in[c]) - m[c];
          acc_t gv = static_cast<acc_t>(gp[c]);
          if (relu_blocks(xc * a[c] + b[c], relu)) gv = 0;
          s1[c] += gv;
          s2[c] += gv * xc;
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void nsc_input_grad(const PlaneView& v, const at::Tensor& dy, at::Tensor& dx, const int64_t* rows,
                    const AffineTables<acc_t>& t, const InputGradTables<acc_t>& k, bool relu) {
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  const scalar_t* g = dy.data_ptr<scalar_t>();
  scalar_t* out = dx.data_ptr<scalar_t>();
  const int64_t C = v.C, S = v.S;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(S * C, 1));
  at::parallel_for(0, v.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t base = rows[n] * C;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* in = x + (n * S + s) * C;
        const scalar_t* gp = g + (n * S + s) * C;
        scalar_t* o = out + (n * S + s) * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xc = static_cast<acc_t>(in[c]) - t.center[base + c];
          acc_t gv = static_cast<acc_t>(gp[c]);
          if (relu_blocks(xc * t.scale[base + c] + t.beta[base + c], relu)) gv = 0;
          o[c] = static_cast<scalar_t>(k.ka[base + c] * gv + k.kx[base + c] * xc + k.k0[base + c]);
        }
      }
    }
  });
}

// ---- An op = reduction, per-channel table math, elementwise pass. These two drivers run
// the three in the order that suits the layout; `tables(c)` must only touch channel c.

// Forward: moments(all planes) -> tables(c) -> y.
template <typename scalar_t, typename acc_t, typename Tables>
void run_forward(const PlaneView& v, at::Tensor& y, const int64_t* rows, AffineTables<acc_t>& t, bool relu,
                 acc_t* pmean, acc_t* pm2, const Tables& tables) {
  if (!v.channels_last) {
    at::parallel_for(0, v.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        channel_moments<scalar_t, acc_t>(v, c, pmean, pm2);
        tables(c);
        channel_affine<scalar_t, acc_t>(v, y, c, rows, t, relu);
      }
    });
    return;
  }
  nsc_moments<scalar_t, acc_t>(v, pmean, pm2);
  at::parallel_for(0, v.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) tables(c);
  });
  nsc_affine<scalar_t, acc_t>(v, y, rows, t, relu);
}

// Forward without a reduction (normalization by given moments): one elementwise pass.
template <typename scalar_t, typename acc_t>
void run_affine(const PlaneView& v, at::Tensor& y, const int64_t* rows, const AffineTables<acc_t>& t, bool relu) {
  if (v.channels_last) {
    nsc_affine<scalar_t, acc_t>(v, y, rows, t, relu);
    return;
  }
  // Nothing to reuse from cache here: walk the planes in memory order.
  const scalar_t* x = v.x.data_ptr<scalar_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(v.S, 1));
  at::parallel_for(0, v.N * v.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = rows[p / v.C] * v.C + p % v.C;
      plane_affine<scalar_t, acc_t>(x + p * v.S, out + p * v.S, v.S, t.center[k], t.scale[k], t.beta[k], relu);
    }
  });
}

// Backward: sums(all planes) -> coefficients(c) -> dx.
template <typename scalar_t, typename acc_t, typename Coefs>
void run_backward(const PlaneView& v, const at::Tensor& dy, at::Tensor& dx, const int64_t* rows,
                  const AffineTables<acc_t>& t, InputGradTables<acc_t>& k, bool relu, acc_t* ps1, acc_t* ps2,
                  const Coefs& coefs) {
  if (!v.channels_last) {
    at::parallel_for(0, v.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        channel_grad_sums<scalar_t, acc_t>(v, dy, c, rows, t, relu, ps1, ps2);
        coefs(c);
        channel_input_grad<scalar_t, acc_t>(v, dy, dx, c, rows, t, k, relu);
      }
    });
    return;
  }
  nsc_grad_sums<scalar_t, acc_t>(v, dy, rows, t, relu, ps1, ps2);
  at::parallel_for(0, v.C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) coefs(c);
  });
  nsc_input_grad<scalar_t, acc_t>(v, dy, dx, rows, t, k, relu);
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
