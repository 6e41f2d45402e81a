"""A small run of every CUDA op variant, for `compute-sanitizer --tool memcheck`
(benchmarks/gpu_check.sh): forward and backward of BN (pure, mixed with an absent domain,
universal and per-domain parameters, eval), BN on channels_last, (N, C) and half input,
and IN. Odd sizes and a misaligned view exercise the scalar paths. Exits non-zero if an
output is not finite."""

import torch

import unirep_kernels as uk


def check(y):
    torch.cuda.synchronize()
    assert torch.isfinite(y).all(), "non-finite output"


def bn_case(x, domain, D, per_domain=True, use_batch_stats=True, relu=False):
    C = x.shape[1]
    shape = (D, C) if per_domain else (C,)
    w = torch.randn(shape, device="cuda", requires_grad=True)
    b = torch.randn(shape, device="cuda", requires_grad=True)
    rm, rv = torch.randn(shape, device="cuda"), torch.rand(shape, device="cuda") + 0.5
    x = x.detach().requires_grad_()
    y = uk.domain_batch_norm(x, domain, w, b, rm, rv, num_domains=D, use_batch_stats=use_batch_stats, relu=relu,
                             backend="cuda")
    y.backward(torch.randn_like(y))
    check(y)
    check(x.grad)


def main():
    torch.manual_seed(0)
    D = 4
    x = torch.randn(8, 6, 9, 7, device="cuda") + 3
    mixed = torch.tensor([0, 1, 1, 0, 3, 3, 1, 0], device="cuda")  # domain 2 absent
    for per_domain in (True, False):
        for use_batch_stats in (True, False):
            bn_case(x, mixed, D, per_domain, use_batch_stats, relu=True)
            bn_case(x, 2, D, per_domain, use_batch_stats)
    bn_case(torch.randn(8, 16, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last), mixed, D)
    bn_case(torch.randn(8, 32, 16, 16, device="cuda"), mixed, D)           # vector loads
    bn_case(torch.randn(8, 24, device="cuda"), mixed, D)                    # (N, C)
    bn_case(torch.randn(8, 16, 8, 8, device="cuda").half(), mixed, D)
    misaligned = torch.randn(1 + 8 * 6 * 8 * 8, device="cuda")[1:].view(8, 6, 8, 8)
    bn_case(misaligned, mixed, D)
    xi = torch.randn(8, 6, 9, 7, device="cuda", requires_grad=True)
    w = torch.randn(D, 6, device="cuda", requires_grad=True)
    y = uk.domain_instance_norm(xi, mixed, w, None, num_domains=D, relu=True, backend="cuda")
    y.backward(torch.randn_like(y))
    check(y)
    check(xi.grad)
    print("memcheck case: all variants ran")


if __name__ == "__main__":
    main()
