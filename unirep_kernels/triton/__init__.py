"""The ``"triton"`` backend: Triton kernels for domain-muxed BN, BN+ and IN, forward and
backward, registered as the custom ops ``torch.ops.unirep_triton.*`` (see :mod:`._ops`;
kernels and their byte counts in :mod:`.kernels`, overview in docs/triton.md).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow: tests only).
Imported lazily by the dispatch table (:data:`unirep_kernels.backends.BACKENDS`) the first
time the backend is selected, so ``import unirep_kernels`` never needs triton. The
functional ops of :mod:`unirep_kernels.ops` validate their arguments, call these ops and
update the running stats with the compiled ``torch.ops.unirep.update_running_stats``.
"""

from . import _ops  # noqa: F401  (registers torch.ops.unirep_triton.*)
