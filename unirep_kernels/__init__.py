"""unirep_kernels: fused kernels for domain-muxed normalization.

Functional ops (the contract of DESIGN.md): :func:`domain_batch_norm`,
:func:`domain_instance_norm`; the one check of a domain argument: :func:`check_domain`
(and its type, :data:`Domain`). Layers: :class:`DomainBatchNorm2d`,
:class:`DomainInstanceNorm2d`, :class:`DomainScale2d`, :func:`convert_domain_norm`, and the
:func:`domain` context. Backends: :func:`backends`, :func:`use_backend`; where the CUDA
backend checks domain indices: :func:`set_domain_check`.
"""

from . import reference
from ._checks import Domain, check_domain, set_domain_check
from .backends import backends, use_backend
from .nn import (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d, convert_domain_norm, current_domain,
                 domain)
from .ops import domain_batch_norm, domain_instance_norm

__all__ = [
    "backends", "use_backend", "set_domain_check", "check_domain", "Domain", "domain", "current_domain",
    "domain_batch_norm", "domain_instance_norm", "DomainBatchNorm2d", "DomainInstanceNorm2d", "DomainScale2d",
    "convert_domain_norm", "reference",
]
__version__ = "0.1.0"
