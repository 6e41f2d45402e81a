// unirep::domain_batch_norm_forward / _backward on the CPU.
//
// Stat groups are domains (stats_per_domain) or the whole batch; tables are indexed by the
// sample's domain (rows = num_domains), so one elementwise pass serves pure batches, mixed
// batches, universal or per-domain affine and moments alike.
#include <torch/library.h>

#include "norm_passes.h"

namespace unirep {
namespace cpu {
namespace {

constexpr const char* kForward = "domain_batch_norm";

// Table rows of channel c for every domain d from the group moments: center = mean of d's
// group, scale = weight[d] * invstd, beta = bias[d].
template <typename acc_t>
void fill_tables(AffineTables<acc_t>& t, int64_t c, int64_t D, int64_t C, const acc_t* mean, const acc_t* var,
                 bool per_domain_moments, const ParamRows<acc_t>& w, const ParamRows<acc_t>& b, double eps) {
  for (int64_t d = 0; d < D; ++d) {
    const int64_t g = per_domain_moments ? d : 0;
    const acc_t inv = acc_t(1) / std::sqrt(var[g * C + c] + static_cast<acc_t>(eps));
    t.center[d * C + c] = mean[g * C + c];
    t.scale[d * C + c] = inv * w.at(d, c);
    t.beta[d * C + c] = b.at(d, c);
  }
}

// Values per channel that each domain contributes to the batch.
std::vector<double> domain_counts(const std::vector<int64_t>& rows, int64_t D, int64_t S) {
  std::vector<double> count(D, 0.0);
  for (int64_t r : rows) count[r] += static_cast<double>(S);
  return count;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& domain, int64_t pure_domain,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    int64_t num_domains, bool use_batch_stats, bool stats_per_domain, double eps, bool relu) {
  TORCH_CHECK(x_in.dim() >= 2, kForward, ": x must have shape (N, C, *spatial)");
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, S = v.S, D = num_domains;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const std::vector<int64_t> rows = sample_domains(domain, pure_domain, N, D, kForward);
  const std::vector<double> per_domain = domain_counts(rows, D, S);
  at::Tensor count = at::tensor(per_domain, at::TensorOptions().dtype(at::kDouble)).to(acc);
  at::Tensor y = at::empty_like(v.x);
  at::Tensor mean, var;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_batch_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamRows<acc_t> w(weight, num_domains, C, acc_t(1), acc, "weight");
    const ParamRows<acc_t> b(bias, num_domains, C, acc_t(0), acc, "bias");
    AffineTables<acc_t> tables(D, C);
    if (use_batch_stats) {
      const int64_t G = stats_per_domain ? D : 1;
      const double batch_n = static_cast<double>(N * S);
      for (int64_t g = 0; g < G; ++g) {
        TORCH_CHECK_VALUE((stats_per_domain ? per_domain[g] : batch_n) != 1, kForward, ": expected more than 1 value per channel in stat group ",
                          stats_per_domain ? "(domain) " : "(batch) ", g,
                          " when using batch statistics (training), got input of size ", x_in.sizes());
      }
      mean = at::zeros({G, C}, at::TensorOptions().dtype(acc));
      var = at::zeros({G, C}, at::TensorOptions().dtype(acc));
      acc_t* gm = mean.data_ptr<acc_t>();
      acc_t* gv = var.data_ptr<acc_t>();
      std::vector<acc_t> pmean(N * C), pm2(N * C);
      // Chan's merge of channel c's plane moments into group moments, in sample order.
      auto group_tables = [&](int64_t c) {
        std::vector<acc_t> cnt(G, acc_t(0));
        for (int64_t n = 0; n < N; ++n) {
          const int64_t g = stats_per_domain ? rows[n] : 0;
          const acc_t pm = pmean[n * C + c];
          const acc_t total = cnt[g] + S;
          const acc_t delta = pm - gm[g * C + c];
          gm[g * C + c] += delta * static_cast<acc_t>(S) / total;
          gv[g * C + c] += pm2[n * C + c] + delta * delta * cnt[g] * static_cast<acc_t>(S) / total;
          cnt[g] = total;
        }
        for (int64_t g = 0; g < G; ++g) gv[g * C + c] = cnt[g] > 0 ? gv[g * C + c] / cnt[g] : acc_t(0);
        fill_tables<acc_t>(tables, c, D, C, gm, gv, stats_per_domain, w, b, eps);
      };
      run_forward<scalar_t, acc_t>(v, y, rows.data(), tables, relu, pmean.data(), pm2.data(), group_tables);
    } else {
      TORCH_CHECK(running_mean.has_value() && running_var.has_value(), kForward,
                  ": running_mean and running_var are required when use_batch_stats=False");
      check_param_shape(running_mean, D, C, "running_mean");
      check_param_shape(running_var, D, C, "running_var");
      TORCH_CHECK_VALUE(running_mean->sizes() == running_var->sizes(), kForward, ": running_mean ",
                        running_mean->sizes(), " and running_var ", running_var->sizes(), " must have the same shape");
      // A fresh row-major copy: the tables read it by index, and later in-place updates of
      // the running stats must not change what the backward sees.
      mean = running_mean->to(acc).reshape({-1, C}).clone(at::MemoryFormat::Contiguous);
      var = running_var->to(acc).reshape({-1, C}).clone(at::MemoryFormat::Contiguous);
      // data_ptr checks the dtype on every call: taken once, not once per channel
      const acc_t* rmean = mean.data_ptr<acc_t>();
      const acc_t* rvar = var.data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        fill_tables<acc_t>(tables, c, D, C, rmean, rvar, running_mean->dim() == 2, w, b, eps);
      }
      run_affine<scalar_t, acc_t>(v, y, rows.data(), tables, relu);
    }
  });
  return {y, mean, var, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const c10::optional<at::Tensor>& domain, int64_t pure_domain,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& count, int64_t num_domains, bool use_batch_stats,
    bool stats_per_domain, double eps, bool relu) {
  const PlaneView v = plane_view(x_in);
  const int64_t N = v.N, C = v.C, D = num_domains;
  const at::ScalarType acc = at::toOpMathType(v.x.scalar_type());
  const std::vector<int64_t> rows = sample_domains(domain, pure_domain, N, D, "domain_batch_norm_backward");
  const at::Tensor dy = same_layout(grad_y, v);
  at::Tensor dx = at::empty_like(v.x);
  const int64_t wrows = param_grad_rows(weight, D);
  const int64_t brows = param_grad_rows(bias, D);
  at::Tensor dweight = at::zeros({wrows, C}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor dbias = at::zeros({brows, C}, at::TensorOptions().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "domain_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ParamRows<acc_t> w(weight, num_domains, C, acc_t(1), acc, "weight");
    const ParamRows<acc_t> b(bias, num_domains, C, acc_t(0), acc, "bias");
    const at::Tensor mean_acc = mean.to(acc).contiguous(), var_acc = var.to(acc).contiguous();
    const bool per_domain_moments = use_batch_stats ? stats_per_domain : mean.size(0) > 1;
    const acc_t* gmean = mean_acc.data_ptr<acc_t>();
    const acc_t* gvar = var_acc.data_ptr<acc_t>();
    AffineTables<acc_t> tables(D, C);
    for (int64_t c = 0; c < C; ++c) {
      fill_tables<acc_t>(tables, c, D, C, gmean, gvar, per_domain_moments, w, b, eps);
    }
    const at::Tensor count_d = count.to(at::kDouble).contiguous();
    const double* cnt = count_d.data_ptr<double>();
    const int64_t G = per_domain_moments ? D : 1;
    std::vector<double> row_s1(D * C, 0.0), row_s2(D * C, 0.0);
    InputGradTables<acc_t> k(D, C);
    double* dw = dweight.data_ptr<double>();
    double* db = dbias.data_ptr<double>();
    // Channel c's dweight/dbias entries from its sums per domain, and the dx coefficients of
    // every domain row: dx = invstd * (w g - mean_g(w g) - xhat mean_g(w g xhat)).
    auto coefficients = [&](int64_t c) {
      std::vector<double> t1(G, 0.0), t2(G, 0.0), ng(G, 0.0);
      for (int64_t d = 0; d < D; ++d) {
        const double s1 = row_s1[d * C + c], s2 = row_s2[d * C + c];
        const int64_t g = per_domain_moments ? d : 0;
        const double inv = 1.0 / std::sqrt(static_cast<double>(gvar[g * C + c]) + eps);
        const double wd = w.at(d, c);
        db[(brows > 1 ? d : 0) * C + c] += s1;
        dw[(wrows > 1 ? d : 0) * C + c] += inv * s2;
        t1[g] += wd * s1;
        t2[g] += wd * inv * s2;
        ng[g] += cnt[d];
      }
      for (int64_t d = 0; d < D; ++d) {
        const int64_t g = per_domain_moments ? d : 0;
        const double inv = 1.0 / std::sqrt(static_cast<double>(gvar[g * C + c]) + eps);
        const double m1 = use_batch_stats && ng[g] > 0 ? t1[g] / ng[g] : 0.0;
        const double m2 = use_batch_stats && ng[g] > 0 ? t2[g] / ng[g] : 0.0;
        k.ka[d * C + c] = static_cast<acc_t>(inv * w.at(d, c));
        k.kx[d * C + c] = static_cast<acc_t>(-inv * inv * m2);
        k.k0[d * C + c] = static_cast<acc_t>(-inv * m1);
      }
    };
    run_backward<scalar_t, acc_t>(v, dy, dx, rows.data(), tables, k, relu, row_s1.data(), row_s2.data(),
                                  coefficients);
  });
  return {dx, param_grad(dweight, weight, acc), param_grad(dbias, bias, acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(unirep, CPU, m) {
  m.impl("domain_batch_norm_forward", &forward);
  m.impl("domain_batch_norm_backward", &backward);
}

}  // namespace cpu
}  // namespace unirep
