"""The autograd formulas of the normalization ops, shared by every namespace that defines
them with the signatures of ``csrc/ops.cpp`` (``unirep`` for the C++/CUDA kernels,
``unirep_triton`` for the Triton ones): the forward op's backward is the namespace's
``*_backward`` op."""

from __future__ import annotations

import torch


def _no_double_backward(name: str) -> None:
    # The backward ops have no derivative of their own: refuse create_graph=True instead of
    # returning silently wrong second derivatives.
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise NotImplementedError(f"{name}: double backward (create_graph=True) is not supported; "
                                  "use backend='reference' for higher-order gradients")


def _param_grads(ctx, grad_x, grad_w, grad_b, trailing: int):
    """Gradients in the forward's argument order: x, domain, pure_domain, weight, bias, rest."""
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, None, None, grad_w if needs[3] else None,
            grad_b if needs[4] else None) + (None,) * trailing


def register_autograd(namespace: str) -> None:
    """Register the backward of ``{namespace}::domain_batch_norm_forward`` and
    ``{namespace}::domain_instance_norm_forward``."""
    ops = getattr(torch.ops, namespace)

    def bn_setup(ctx, inputs, output):
        x, domain, pure_domain, weight, bias, _, _, num_domains, use_batch_stats, stats_per_domain, eps, relu = inputs
        _, mean, var, count = output
        ctx.mark_non_differentiable(mean, var, count)
        ctx.save_for_backward(x, domain, weight, bias, mean, var, count)
        ctx.options = (pure_domain, num_domains, use_batch_stats, stats_per_domain, eps, relu)

    def bn_backward(ctx, grad_y, _grad_mean, _grad_var, _grad_count):
        _no_double_backward("domain_batch_norm")
        x, domain, weight, bias, mean, var, count = ctx.saved_tensors
        pure_domain, num_domains, use_batch_stats, stats_per_domain, eps, relu = ctx.options
        grads = ops.domain_batch_norm_backward(grad_y, x, domain, pure_domain, weight, bias, mean, var, count,
                                               num_domains, use_batch_stats, stats_per_domain, eps, relu)
        return _param_grads(ctx, *grads, trailing=7)

    def in_setup(ctx, inputs, output):
        x, domain, pure_domain, weight, bias, num_domains, eps, relu = inputs
        _, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, domain, weight, bias, mean, var)
        ctx.options = (pure_domain, num_domains, eps, relu)

    def in_backward(ctx, grad_y, _grad_mean, _grad_var):
        _no_double_backward("domain_instance_norm")
        x, domain, weight, bias, mean, var = ctx.saved_tensors
        pure_domain, num_domains, eps, relu = ctx.options
        grads = ops.domain_instance_norm_backward(grad_y, x, domain, pure_domain, weight, bias, mean, var,
                                                  num_domains, eps, relu)
        return _param_grads(ctx, *grads, trailing=3)

    torch.library.register_autograd(f"{namespace}::domain_batch_norm_forward", bn_backward, setup_context=bn_setup)
    torch.library.register_autograd(f"{namespace}::domain_instance_norm_forward", in_backward,
                                    setup_context=in_setup)
