// unirep::domain_instance_norm_forward / _backward on the CPU.
//
// Statistics per (sample, channel) plane; the affine comes from the sample's domain. The
// tables are indexed by sample (rows = N): norm_passes.h's instance drivers run each plane
// (or channels_last sample block) from statistics to output while it is in cache.
#include <torch/library.h>

#include "norm_passes.h"

namespace unirep {
namespace cpu {
namespace {

// Table rows of sample n, channels [c0, c1): the plane's own moments, the sample domain's
// affine; also each plane's 1 / sqrt(var + eps) when `invstd` is given.
template <typename acc_t>
void fill_tables(AffineTables<acc_t>& t, int64_t n, int64_t c0, int64_t c1, int64_t C, const acc_t* mean,
                 const acc_t* var, const std::vector<int64_t>& domains, const ParamRows<acc_t>& w,
                 const ParamRows<acc_t>& b, double eps, acc_t* invstd = nullptr) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k = n * C + c;
    const acc_t inv = acc_t(1) / std::sqrt(var[k] + static_cast<acc_t>(eps));
    if (invstd != nullptr) invstd[k] = inv;
    t.center[k] = mean[k];
    t.scale[k] = inv * w.at(domains[n], c);
    t.beta[k] = b.at(domains[n], c);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& domain,
                                                       int64_t pure_domain, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, int64_t num_domains,
                                                       double eps, bool relu) {
  TORCH_CHECK(x_in.dim() >= 2, "domain_instance_norm: x must have shape (N, C, *spatial)");
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const std::vector<int64_t> domains = sample_domains(domain, pure_domain, N, num_domains, "domain_instance_norm");
  at::Tensor y = at::empty_like(v.x);
  at::Tensor mean = at::empty({N, C}, at::TensorOptions().dtype(acc));
  at::Tensor var = at::empty({N, C}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_instance_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamRows<acc_t> w(weight, num_domains, C, acc_t(1), acc, "weight");
    const ParamRows<acc_t> b(bias, num_domains, C, acc_t(0), acc, "bias");
    acc_t* pm = mean.data_ptr<acc_t>();
    acc_t* pv = var.data_ptr<acc_t>();
    AffineTables<acc_t> tables(N, C);
    auto plane_tables = [&](int64_t n, int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) pv[n * C + c] /= static_cast<acc_t>(S);  // M2 -> biased variance
      fill_tables<acc_t>(tables, n, c0, c1, C, pm, pv, domains, w, b, eps);
    };
    run_instance_forward<scalar_t, acc_t>(v, y, tables, relu, pm, pv, plane_tables);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                        const c10::optional<at::Tensor>& domain, int64_t pure_domain,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                        const at::Tensor& var, int64_t num_domains, double eps,
                                                        bool relu) {
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S, D = num_domains;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const std::vector<int64_t> domains =
      sample_domains(domain, pure_domain, N, num_domains, "domain_instance_norm_backward");
  const at::Tensor dy = same_layout(grad_y, v);
  at::Tensor dx = at::empty_like(v.x);
  const int64_t wrows = param_grad_rows(weight, D);
  const int64_t brows = param_grad_rows(bias, D);
  at::Tensor dweight = at::zeros({wrows, C}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor dbias = at::zeros({brows, C}, at::TensorOptions().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_instance_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamRows<acc_t> w(weight, num_domains, C, acc_t(1), acc, "weight");
    const ParamRows<acc_t> b(bias, num_domains, C, acc_t(0), acc, "bias");
    const at::Tensor mean_acc = mean.to(acc).contiguous(), var_acc = var.to(acc).contiguous();
    const acc_t* pv = var_acc.data_ptr<acc_t>();
    AffineTables<acc_t> tables(N, C);
    std::vector<acc_t> invstd(N * C);
    const acc_t* pm = mean_acc.data_ptr<acc_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        fill_tables<acc_t>(tables, n, 0, C, C, pm, pv, domains, w, b, eps, invstd.data());
      }
    });
    std::vector<acc_t> ps1(N * C), ps2(N * C);
    InputGradTables<acc_t> k(N, C);
    const acc_t per_value = acc_t(1) / static_cast<acc_t>(S);
    // Plane (n, c)'s dx coefficients, from its own sums only (in the accumulation type, as
    // its forward tables: a few flops per plane, which matters for 8x8 planes).
    auto coefficients = [&](int64_t n, int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i = n * C + c;
        const acc_t inv = invstd[i], wd = w.at(domains[n], c);
        const acc_t m1 = wd * ps1[i] * per_value;
        const acc_t m2 = wd * inv * ps2[i] * per_value;
        k.ka[i] = inv * wd;
        k.kx[i] = -inv * inv * m2;
        k.k0[i] = -inv * m1;
      }
    };
    run_instance_backward<scalar_t, acc_t>(v, dy, dx, tables, k, relu, ps1.data(), ps2.data(), coefficients);
    // dweight / dbias of each channel: its planes' sums in sample order.
    double* dw = dweight.data_ptr<double>();
    double* db = dbias.data_ptr<double>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t i = n * C + c;
          db[(brows > 1 ? domains[n] : 0) * C + c] += ps1[i];
          dw[(wrows > 1 ? domains[n] : 0) * C + c] += static_cast<double>(invstd[i]) * ps2[i];
        }
      }
    });
  });
  return {dx, param_grad(dweight, weight, acc), param_grad(dbias, bias, acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirep, CPU, m) {
  m.impl("domain_instance_norm_forward", &forward);
  m.impl("domain_instance_norm_backward", &backward);
}

}  // namespace cpu
}  // namespace unirep
