// Schemas of every op of unirep_kernels._C (one home for each op's signature), and the
// device-generic update of running statistics: the one compiled home of that rule, used
// by every compiled backend (cpp, cuda, triton); reference.update_running_stats is its oracle.
//
// Kernels: csrc/cpu/*_kernel.cpp (CPU), csrc/cuda/*.cu (CUDA, when built). Fake kernels and
// autograd formulas are registered from Python in unirep_kernels/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

namespace unirep {
namespace {

// Running moments after one batch; see reference.update_running_stats for the rules. Pure
// tensor arithmetic with no host synchronisation, so it serves every device. Counts the
// batch in num_batches_tracked (when given) last: the op consumes the forward's outputs, so
// even in a compiled graph the count moves only after a forward that succeeded.
void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& var, const at::Tensor& count, double momentum,
                          const std::optional<at::Tensor>& num_batches_tracked) {
  TORCH_CHECK(mean.dim() == 2 && var.sizes() == mean.sizes(), "update_running_stats: mean/var must be (G, C)");
  const int64_t D = count.numel();
  const int64_t C = mean.size(1);
  TORCH_CHECK(running_mean.numel() == C || running_mean.numel() == D * C,
              "update_running_stats: running_mean must be (C,) or (num_domains, C)");
  const at::Tensor n = count.to(mean.scalar_type());
  const at::Tensor present = n > 0;
  const double m = momentum;
  at::Tensor new_mean, new_var;
  const bool per_domain_groups = mean.size(0) == D;
  if (per_domain_groups) {
    const at::Tensor unbiased = var * (n / (n - 1).clamp_min(1)).unsqueeze(1);
    if (running_mean.dim() == 2) {
      const at::Tensor keep = present.unsqueeze(1);
      new_mean = at::where(keep, running_mean * (1 - m) + mean * m, running_mean);
      new_var = at::where(keep, running_var * (1 - m) + unbiased * m, running_var);
    } else {
      // Present groups applied in increasing domain order: group d is later scaled by
      // (1 - m) once for every present group after it.
      const at::Tensor p = present.to(mean.scalar_type());
      const at::Tensor after = p.flip(0).cumsum(0).flip(0) - p;
      const at::Tensor coef = (p * m * at::pow(1 - m, after)).unsqueeze(1);
      const at::Tensor decay = at::pow(at::scalar_tensor(1 - m, mean.options()), p.sum());
      new_mean = running_mean * decay + (coef * mean).sum(0);
      new_var = running_var * decay + (coef * unbiased).sum(0);
    }
  } else {
    const at::Tensor total = n.sum();
    const at::Tensor unbiased = var[0] * total / (total - 1).clamp_min(1);
    if (running_mean.dim() == 2) {
      const at::Tensor keep = present.unsqueeze(1);
      new_mean = at::where(keep, running_mean * (1 - m) + mean[0] * m, running_mean);
      new_var = at::where(keep, running_var * (1 - m) + unbiased * m, running_var);
    } else {
      new_mean = running_mean * (1 - m) + mean[0] * m;
      new_var = running_var * (1 - m) + unbiased * m;
    }
  }
  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
  if (num_batches_tracked.has_value()) {
    num_batches_tracked->add_(1);
  }
}

}  // namespace

TORCH_LIBRARY(unirep, m) {
  m.def(
      "domain_batch_norm_forward(Tensor x, Tensor? domain, int pure_domain, Tensor? weight, Tensor? bias, "
      "Tensor? running_mean, Tensor? running_var, int num_domains, bool use_batch_stats, bool stats_per_domain, "
      "float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var, Tensor count)");
  m.def(
      "domain_batch_norm_backward(Tensor grad_y, Tensor x, Tensor? domain, int pure_domain, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor var, Tensor count, int num_domains, bool use_batch_stats, "
      "bool stats_per_domain, float eps, bool relu) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "domain_instance_norm_forward(Tensor x, Tensor? domain, int pure_domain, Tensor? weight, Tensor? bias, "
      "int num_domains, float eps, bool relu) -> (Tensor y, Tensor mean, Tensor var)");
  m.def(
      "domain_instance_norm_backward(Tensor grad_y, Tensor x, Tensor? domain, int pure_domain, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor var, int num_domains, float eps, bool relu) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "Tensor count, float momentum, Tensor(c!)? num_batches_tracked=None) -> ()");
}

TORCH_LIBRARY_IMPL(unirep, CompositeExplicitAutograd, m) {
  m.impl("update_running_stats", &update_running_stats);
}

}  // namespace unirep

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unirep_kernels._C: domain-muxed normalization kernels (ops live under torch.ops.unirep)";
#ifdef UNIREP_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
