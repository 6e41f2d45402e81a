// unirep::domain_instance_norm_forward / _backward on CUDA.
//
// Statistics per (sample, channel) plane; the affine comes from the sample's domain. The
// tables are indexed by sample (rows = N), so the passes of norm_kernels.cuh apply with
// row = sample. Forward: Welford partials -> plane moments -> tables -> elementwise pass.
// Backward: gradient partials -> per-plane dx coefficients -> per-domain weight/bias
// gradients (one thread per (domain, channel), samples in order, no atomics) -> dx.
#include <torch/library.h>

#include "norm_kernels.cuh"

namespace unirep {
namespace cuda {
namespace {

constexpr const char* kForward = "domain_instance_norm";
constexpr const char* kBackward = "domain_instance_norm_backward";

// Moments of plane i = n * C + c from its K chunk partials (biased variance).
template <typename acc_t>
__global__ void plane_moments_kernel(const acc_t* __restrict__ pmean, const acc_t* __restrict__ pm2, int64_t N,
                                     int64_t C, int64_t S, Chunking ch, acc_t* __restrict__ mean,
                                     acc_t* __restrict__ var) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  int64_t count = 0;
  acc_t m = 0, m2 = 0;
  for (int64_t k = 0; k < ch.K; ++k) {
    const int64_t p = (n * ch.K + k) * C + c;
    const int64_t values = chunk_values(ch, S, k);
    const acc_t fraction = static_cast<acc_t>(values) / static_cast<acc_t>(count + values);
    const acc_t delta = pmean[p] - m;
    m += delta * fraction;
    m2 += pm2[p] + delta * delta * static_cast<acc_t>(count) * fraction;
    count += values;
  }
  mean[i] = m;
  var[i] = m2 / static_cast<acc_t>(S);
}

// Rows of plane i: its own moments, the affine of its sample's domain.
template <typename acc_t>
__global__ void tables_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                              const int32_t* __restrict__ rows, int64_t N, int64_t C, ParamArg<acc_t> weight,
                              ParamArg<acc_t> bias, double eps, acc_t* __restrict__ tables) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C, d = rows[n];
  const acc_t inv = acc_t(1) / sqrt(var[i] + static_cast<acc_t>(eps));
  tables[i] = mean[i];
  tables[N * C + i] = inv * weight.at(d, c);
  tables[2 * N * C + i] = bias.at(d, c);
}

// Plane i's dx coefficients (dx = ka g + kx (x - mean) + k0, from dx = invstd (w g -
// mean(w g) - xhat mean(w g xhat)) over the plane), and its contributions to the weight and
// bias gradients: sum(g) and invstd * sum(g (x - mean)), kept in float64 for the next kernel.
template <typename acc_t>
__global__ void plane_coefficients_kernel(const acc_t* __restrict__ ps1, const acc_t* __restrict__ ps2,
                                          const int32_t* __restrict__ rows, int64_t N, int64_t C, int64_t S,
                                          Chunking ch, const acc_t* __restrict__ var, double eps,
                                          ParamArg<acc_t> weight, acc_t* __restrict__ coefs,
                                          double* __restrict__ plane_dbias, double* __restrict__ plane_dweight) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  double a1 = 0, a2 = 0;
  for (int64_t k = 0; k < ch.K; ++k) {
    a1 += static_cast<double>(ps1[(n * ch.K + k) * C + c]);
    a2 += static_cast<double>(ps2[(n * ch.K + k) * C + c]);
  }
  const double inv = 1.0 / sqrt(static_cast<double>(var[i]) + eps);
  const double w = static_cast<double>(weight.at(rows[n], c));
  const double m1 = w * a1 / static_cast<double>(S);
  const double m2 = w * inv * a2 / static_cast<double>(S);
  coefs[i] = static_cast<acc_t>(inv * w);
  coefs[N * C + i] = static_cast<acc_t>(-inv * inv * m2);
  coefs[2 * N * C + i] = static_cast<acc_t>(-inv * m1);
  plane_dbias[i] = a1;
  plane_dweight[i] = inv * a2;
}

// Weight/bias gradients of domain d, channel c: its samples' plane contributions in sample
// order; a (C,) parameter takes every sample's (written by the d = 0 thread).
__global__ void param_grads_kernel(const double* __restrict__ plane_dbias, const double* __restrict__ plane_dweight,
                                   const int32_t* __restrict__ rows, int64_t N, int64_t C, bool weight_per_domain,
                                   bool bias_per_domain, double* __restrict__ dweight, double* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t d = blockIdx.y;
  if (c >= C) return;
  double b_d = 0, w_d = 0, b_all = 0, w_all = 0;
  for (int64_t n = 0; n < N; ++n) {
    const double b = plane_dbias[n * C + c], w = plane_dweight[n * C + c];
    if (rows[n] == d) {
      b_d += b;
      w_d += w;
    }
    b_all += b;
    w_all += w;
  }
  if (bias_per_domain) dbias[d * C + c] = b_d;
  else if (d == 0) dbias[c] = b_all;
  if (weight_per_domain) dweight[d * C + c] = w_d;
  else if (d == 0) dweight[c] = w_all;
}

unsigned plane_blocks(int64_t N, int64_t C) { return static_cast<unsigned>(ceil_div(N * C, kBlock)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& domain,
                                                       int64_t pure_domain, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, int64_t num_domains,
                                                       double eps, bool relu) {
  check_inputs(x_in, weight, bias, num_domains, kForward);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const at::TensorOptions acc_options = v.x.options().dtype(acc);
  const SampleRows rows = sample_rows(domain, pure_domain, v.x, N, num_domains, S, /*with_count=*/false, kForward);
  at::Tensor y = at::empty_like(v.x);
  at::Tensor mean = at::empty({N, C}, acc_options), var = at::empty({N, C}, acc_options);
  at::Tensor tables = at::empty({3, N, C}, acc_options);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_instance_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamHolder<acc_t> w(weight, C, acc_t(1), acc), b(bias, C, acc_t(0), acc);
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(y.data_ptr());
    const Chunking ch = plan_reduce<scalar_t>(v, aligned);
    at::Tensor partial_mean = at::empty({N, ch.K, C}, acc_options);
    at::Tensor partial_m2 = at::empty({N, ch.K, C}, acc_options);
    const MomentsReduction<scalar_t, acc_t> red{v.x.data_ptr<scalar_t>(), partial_mean.data_ptr<acc_t>(),
                                                partial_m2.data_ptr<acc_t>()};
    launch_reduce<scalar_t>(red, v, ch, aligned);
    plane_moments_kernel<acc_t><<<plane_blocks(N, C), kBlock, 0, stream>>>(
        partial_mean.data_ptr<acc_t>(), partial_m2.data_ptr<acc_t>(), N, C, S, ch, mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tables_kernel<acc_t><<<plane_blocks(N, C), kBlock, 0, stream>>>(
        mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), rows.rows.data_ptr<int32_t>(), N, C, w.arg, b.arg, eps,
        tables.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const AffineOp<scalar_t, acc_t> op{v.x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), /*rows=*/nullptr,
                                       tables_of<acc_t>(tables), C, relu};
    launch_elementwise<scalar_t>(op, v, aligned);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                        const c10::optional<at::Tensor>& domain, int64_t pure_domain,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                        const at::Tensor& var, int64_t num_domains, double eps,
                                                        bool relu) {
  const int64_t D = num_domains;
  check_inputs(x_in, weight, bias, D, kBackward);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S;
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), kBackward, ": grad_y must have x's shape");
  TORCH_CHECK(mean.numel() == N * C && var.numel() == N * C, kBackward, ": mean/var must be (N, C)");
  check_same_device(v.x, mean, kBackward, "mean");
  check_same_device(v.x, var, kBackward, "var");
  check_same_device(v.x, grad_y, kBackward, "grad_y");
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const at::TensorOptions acc_options = v.x.options().dtype(acc);
  const at::TensorOptions double_options = v.x.options().dtype(at::kDouble);
  const SampleRows rows = sample_rows(domain, pure_domain, v.x, N, D, S, /*with_count=*/false, kBackward);
  const at::Tensor dy = same_layout(grad_y, v);
  at::Tensor dx = at::empty_like(v.x);
  const int64_t wrows = param_grad_rows(weight, D), brows = param_grad_rows(bias, D);
  at::Tensor dweight = at::zeros({wrows, C}, double_options), dbias = at::zeros({brows, C}, double_options);
  at::Tensor plane_dweight = at::empty({N, C}, double_options), plane_dbias = at::empty({N, C}, double_options);
  const at::Tensor mean_acc = mean.to(acc).contiguous(), var_acc = var.to(acc).contiguous();
  at::Tensor tables = at::empty({3, N, C}, acc_options), coefs = at::empty({3, N, C}, acc_options);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_instance_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamHolder<acc_t> w(weight, C, acc_t(1), acc), b(bias, C, acc_t(0), acc);
    const bool aligned = aligned16(v.x.data_ptr()) && aligned16(dy.data_ptr()) && aligned16(dx.data_ptr());
    tables_kernel<acc_t><<<plane_blocks(N, C), kBlock, 0, stream>>>(
        mean_acc.data_ptr<acc_t>(), var_acc.data_ptr<acc_t>(), rows.rows.data_ptr<int32_t>(), N, C, w.arg, b.arg,
        eps, tables.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Chunking ch = plan_reduce<scalar_t>(v, aligned);
    at::Tensor partial_s1 = at::empty({N, ch.K, C}, acc_options);
    at::Tensor partial_s2 = at::empty({N, ch.K, C}, acc_options);
    const GradSumsReduction<scalar_t, acc_t> red{v.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), /*rows=*/nullptr,
                                                 tables_of<acc_t>(tables), C, relu, partial_s1.data_ptr<acc_t>(),
                                                 partial_s2.data_ptr<acc_t>()};
    launch_reduce<scalar_t>(red, v, ch, aligned);
    plane_coefficients_kernel<acc_t><<<plane_blocks(N, C), kBlock, 0, stream>>>(
        partial_s1.data_ptr<acc_t>(), partial_s2.data_ptr<acc_t>(), rows.rows.data_ptr<int32_t>(), N, C, S, ch,
        var_acc.data_ptr<acc_t>(), eps, w.arg, coefs.data_ptr<acc_t>(), plane_dbias.data_ptr<double>(),
        plane_dweight.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    param_grads_kernel<<<per_channel_grid(C, D), kTableBlock, 0, stream>>>(
        plane_dbias.data_ptr<double>(), plane_dweight.data_ptr<double>(), rows.rows.data_ptr<int32_t>(), N, C,
        wrows > 1, brows > 1, dweight.data_ptr<double>(), dbias.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const acc_t* k = coefs.data_ptr<acc_t>();
    const InputGradOp<scalar_t, acc_t> op{v.x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                          /*rows=*/nullptr, tables_of<acc_t>(tables), k, k + N * C, k + 2 * N * C,
                                          C, relu};
    launch_elementwise<scalar_t>(op, v, aligned);
  });
  return {dx, param_grad(dweight, weight, acc), param_grad(dbias, bias, acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirep, CUDA, m) {
  m.impl("domain_instance_norm_forward", &forward);
  m.impl("domain_instance_norm_backward", &backward);
}

}  // namespace cuda
}  // namespace unirep
