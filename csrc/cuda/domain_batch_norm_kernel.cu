// unirep::domain_batch_norm_forward / _backward on CUDA.
//
// Training forward: Welford partials per (sample, chunk, channel) -> group moments (one
// thread per (group, channel), merging partials in sample order) -> per-domain tables ->
// one elementwise pass. Eval: tables from the running stats -> one elementwise pass.
// Backward: gradient partials -> one thread per (domain, channel) computes that domain's
// weight/bias gradient and dx coefficients (sample order, float64, no atomics) -> one
// elementwise pass. Every kernel runs on the current stream; nothing syncs with the host.
#include <torch/library.h>

#include "norm_kernels.cuh"

namespace unirep {
namespace cuda {
namespace {

constexpr const char* kForward = "domain_batch_norm";
constexpr const char* kBackward = "domain_batch_norm_backward";

// Group moments (biased variance) of stat group g, channel c, from the chunk partials of
// the samples in g. A present group with a single value cannot be normalized by its own
// statistics: that is an input error (caught on the host in eager mode).
template <typename acc_t>
__global__ void group_moments_kernel(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2,
                                     const int32_t* __restrict__ rows, int64_t N, int64_t C, int64_t S, Chunking ch,
                                     bool per_domain, acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = blockIdx.y;
  if (c >= C) return;
  int64_t count = 0;
  acc_t m = 0, m2 = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (per_domain && rows[n] != g) continue;
    for (int64_t k = 0; k < ch.K; ++k) {
      const int64_t i = (n * ch.K + k) * C + c;
      const int64_t values = chunk_values(ch, S, k);
      const acc_t fraction = static_cast<acc_t>(values) / static_cast<acc_t>(count + values);
      const acc_t delta = pmean[i] - m;
      m += delta * fraction;
      m2 += pm2[i] + delta * delta * static_cast<acc_t>(count) * fraction;
      count += values;
    }
  }
  CUDA_KERNEL_ASSERT_MSG(count != 1, "unirep: expected more than 1 value per channel in every stat group when "
                                     "using batch statistics (training)");
  mean[g * C + c] = m;
  var[g * C + c] = count > 0 ? m2 / static_cast<acc_t>(count) : acc_t(0);
}

// Rows of domain d: center = mean of d's group, scale = weight[d] * invstd, beta = bias[d].
template <typename acc_t>
__global__ void tables_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var, bool per_domain_moments,
                              ParamArg<acc_t> weight, ParamArg<acc_t> bias, int64_t C, double eps,
                              acc_t* __restrict__ tables) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t d = blockIdx.y, D = gridDim.y;
  if (c >= C) return;
  const int64_t g = per_domain_moments ? d : 0;
  const acc_t inv = acc_t(1) / sqrt(var[g * C + c] + static_cast<acc_t>(eps));
  tables[d * C + c] = mean[g * C + c];
  tables[(D + d) * C + c] = inv * weight.at(d, c);
  tables[(2 * D + d) * C + c] = bias.at(d, c);
}

// One thread per (domain d, channel c), over the gradient partials in sample order:
//   dbias[d] = sum of g over d's samples, dweight[d] = invstd * sum of g (x - mean);
//   (C,) parameters take the sums over all samples (written by the d = 0 thread);
//   dx coefficients of row d (dx = ka g + kx (x - mean) + k0), from
//   dx = invstd (w g - mean_G(w g) - xhat mean_G(w g xhat)) over d's stat group G, whose
//   last two terms exist only when the batch statistics were used.
template <typename acc_t>
__global__ void backward_coefficients_kernel(const acc_t* __restrict__ ps1, const acc_t* __restrict__ ps2,
                                             const int32_t* __restrict__ rows, int64_t N, int64_t C, int64_t S,
                                             Chunking ch, const acc_t* __restrict__ var, bool per_domain_moments,
                                             bool use_batch_stats, double eps, ParamArg<acc_t> weight,
                                             bool weight_per_domain, bool bias_per_domain, double* __restrict__ dweight,
                                             double* __restrict__ dbias, acc_t* __restrict__ coefs) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t d = blockIdx.y, D = gridDim.y;
  if (c >= C) return;
  const int64_t group_d = per_domain_moments ? d : 0;
  const double inv_d = 1.0 / sqrt(static_cast<double>(var[group_d * C + c]) + eps);
  // Only the d = 0 thread of a (C,) weight needs every sample's own invstd (a sqrt each);
  // every other sum uses d's group, whose invstd is inv_d.
  const bool sums_all_groups = d == 0 && !weight_per_domain;
  double s1_d = 0, s2_d = 0, t1 = 0, t2 = 0, all_s1 = 0, all_s2 = 0;
  int64_t group_samples = 0;
  for (int64_t n = 0; n < N; ++n) {
    double a1 = 0, a2 = 0;
    for (int64_t k = 0; k < ch.K; ++k) {
      a1 += static_cast<double>(ps1[(n * ch.K + k) * C + c]);
      a2 += static_cast<double>(ps2[(n * ch.K + k) * C + c]);
    }
    const int64_t r = rows[n];
    const int64_t g = per_domain_moments ? r : 0;
    if (r == d) {
      s1_d += a1;
      s2_d += a2;
    }
    if (g == group_d) {
      const double w = static_cast<double>(weight.at(r, c));
      t1 += w * a1;
      t2 += w * a2;
      ++group_samples;
    }
    all_s1 += a1;
    if (sums_all_groups) all_s2 += a2 / sqrt(static_cast<double>(var[g * C + c]) + eps);
  }
  t2 *= inv_d;
  if (bias_per_domain) dbias[d * C + c] = s1_d;
  else if (d == 0) dbias[c] = all_s1;
  if (weight_per_domain) dweight[d * C + c] = inv_d * s2_d;
  else if (d == 0) dweight[c] = all_s2;
  const double values = static_cast<double>(group_samples * S);
  const double m1 = use_batch_stats && values > 0 ? t1 / values : 0.0;
  const double m2 = use_batch_stats && values > 0 ? t2 / values : 0.0;
  coefs[d * C + c] = static_cast<acc_t>(inv_d * static_cast<double>(weight.at(d, c)));
  coefs[(D + d) * C + c] = static_cast<acc_t>(-inv_d * inv_d * m2);
  coefs[(2 * D + d) * C + c] = static_cast<acc_t>(-inv_d * m1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& domain, int64_t pure_domain,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    int64_t num_domains, bool use_batch_stats, bool stats_per_domain, double eps, bool relu) {
  const int64_t D = num_domains;
  check_inputs(x_in, weight, bias, D, kForward);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const at::TensorOptions acc_options = v.x.options().dtype(acc);
  const SampleRows rows = sample_rows(domain, pure_domain, v.x, N, D, S, /*with_count=*/true, kForward);
  at::Tensor y = at::empty_like(v.x);
  at::Tensor mean, var;
  bool per_domain_moments;
  if (!use_batch_stats) {
    TORCH_CHECK(running_mean.has_value() && running_var.has_value(), kForward,
                ": running_mean and running_var are required when use_batch_stats=False");
    check_param_shape(running_mean, D, C, "running_mean");
    check_param_shape(running_var, D, C, "running_var");
    TORCH_CHECK_VALUE(running_mean->sizes() == running_var->sizes(), kForward, ": running_mean ",
                      running_mean->sizes(), " and running_var ", running_var->sizes(), " must have the same shape");
    check_same_device(v.x, *running_mean, kForward, "running_mean");
    check_same_device(v.x, *running_var, kForward, "running_var");
    // A fresh row-major copy: later in-place updates of the running stats must not change
    // what the backward sees.
    mean = running_mean->to(acc).reshape({-1, C}).clone(at::MemoryFormat::Contiguous);
    var = running_var->to(acc).reshape({-1, C}).clone(at::MemoryFormat::Contiguous);
    per_domain_moments = running_mean->dim() == 2;
  } else {
    const int64_t G = stats_per_domain ? D : 1;
    per_domain_moments = stats_per_domain;
    mean = at::empty({G, C}, acc_options);
    var = at::empty({G, C}, acc_options);
  }
  at::Tensor tables = at::empty({3, D, C}, acc_options);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_batch_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamHolder<acc_t> w(weight, C, acc_t(1), acc), b(bias, C, acc_t(0), acc);
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(y.data_ptr());
    if (use_batch_stats) {
      const Chunking ch = plan_reduce<scalar_t>(v, aligned);
      at::Tensor partial_mean = at::empty({N, ch.K, C}, acc_options);
      at::Tensor partial_m2 = at::empty({N, ch.K, C}, acc_options);
      const MomentsReduction<scalar_t, acc_t> red{v.x.data_ptr<scalar_t>(), partial_mean.data_ptr<acc_t>(),
                                                  partial_m2.data_ptr<acc_t>()};
      launch_reduce<scalar_t>(red, v, ch, aligned);
      group_moments_kernel<acc_t><<<per_channel_grid(C, mean.size(0)), kTableBlock, 0, stream>>>(
          partial_mean.data_ptr<acc_t>(), partial_m2.data_ptr<acc_t>(), rows.rows.data_ptr<int32_t>(), N, C, S, ch,
          stats_per_domain, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    tables_kernel<acc_t><<<per_channel_grid(C, D), kTableBlock, 0, stream>>>(
        mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), per_domain_moments, w.arg, b.arg, C, eps,
        tables.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const AffineOp<scalar_t, acc_t> op{v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                       rows.rows.data_ptr<int32_t>(), tables_of<acc_t>(tables), C, relu};
    launch_elementwise<scalar_t>(op, v, aligned);
  });
  return {y, mean, var, rows.count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& domain, int64_t pure_domain,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& count, int64_t num_domains, bool use_batch_stats,
    bool stats_per_domain, double eps, bool relu) {
  (void)count;  // each thread counts its group's samples itself
  const int64_t D = num_domains;
  check_inputs(x_in, weight, bias, D, kBackward);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S;
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), kBackward, ": grad_y must have x's shape");
  TORCH_CHECK(mean.dim() == 2 && mean.size(1) == C && var.sizes() == mean.sizes(), kBackward,
              ": mean/var must be (G, C)");
  check_same_device(v.x, mean, kBackward, "mean");
  check_same_device(v.x, var, kBackward, "var");
  check_same_device(v.x, grad_y, kBackward, "grad_y");
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const at::TensorOptions acc_options = v.x.options().dtype(acc);
  const SampleRows rows = sample_rows(domain, pure_domain, v.x, N, D, S, /*with_count=*/false, kBackward);
  const at::Tensor dy = same_layout(grad_y, v);
  at::Tensor dx = at::empty_like(v.x);
  const int64_t wrows = param_grad_rows(weight, D), brows = param_grad_rows(bias, D);
  at::Tensor dweight = at::zeros({wrows, C}, v.x.options().dtype(at::kDouble));
  at::Tensor dbias = at::zeros({brows, C}, v.x.options().dtype(at::kDouble));
  const bool per_domain_moments = use_batch_stats ? stats_per_domain : mean.size(0) > 1;
  TORCH_CHECK(mean.size(0) == (per_domain_moments ? D : 1), kBackward, ": mean/var have ", mean.size(0),
              " rows, expected ", per_domain_moments ? D : 1);
  const at::Tensor mean_acc = mean.to(acc).contiguous(), var_acc = var.to(acc).contiguous();
  at::Tensor tables = at::empty({3, D, C}, acc_options);
  at::Tensor coefs = at::empty({3, D, C}, acc_options);
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamHolder<acc_t> w(weight, C, acc_t(1), acc), b(bias, C, acc_t(0), acc);
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(dy.data_ptr()) && aligned16(dx.data_ptr());
    tables_kernel<acc_t><<<per_channel_grid(C, D), kTableBlock, 0, stream>>>(
        mean_acc.data_ptr<acc_t>(), var_acc.data_ptr<acc_t>(), per_domain_moments, w.arg, b.arg, C, eps,
        tables.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Chunking ch = plan_reduce<scalar_t>(v, aligned);
    at::Tensor partial_s1 = at::empty({N, ch.K, C}, acc_options);
    at::Tensor partial_s2 = at::empty({N, ch.K, C}, acc_options);
    const GradSumsReduction<scalar_t, acc_t> red{v.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(),
                                                 rows.rows.data_ptr<int32_t>(), tables_of<acc_t>(tables), C, relu,
                                                 partial_s1.data_ptr<acc_t>(), partial_s2.data_ptr<acc_t>()};
    launch_reduce<scalar_t>(red, v, ch, aligned);
    backward_coefficients_kernel<acc_t><<<per_channel_grid(C, D), kTableBlock, 0, stream>>>(
        partial_s1.data_ptr<acc_t>(), partial_s2.data_ptr<acc_t>(), rows.rows.data_ptr<int32_t>(), N, C, S, ch,
        var_acc.data_ptr<acc_t>(), per_domain_moments, use_batch_stats, eps, w.arg, wrows > 1, brows > 1,
        dweight.data_ptr<double>(), dbias.data_ptr<double>(), coefs.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t* k = coefs.data_ptr<acc_t>();
    const InputGradOp<scalar_t, acc_t> op{v.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                          rows.rows.data_ptr<int32_t>(), tables_of<acc_t>(tables),
                                          k, k + D * C, k + 2 * D * C, C, relu};
    launch_elementwise<scalar_t>(op, v, aligned);
  });
  return {dx, param_grad(dweight, weight, acc), param_grad(dbias, bias, acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirep, CUDA, m) {
  m.impl("domain_batch_norm_forward", &forward);
  m.impl("domain_batch_norm_backward", &backward);
}

}  // namespace cuda
}  // namespace unirep
