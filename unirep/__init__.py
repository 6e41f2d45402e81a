"""unirep: universal representations across visual domains (Bilen & Vedaldi, 2017).

The paper's models, data pipeline and trainer, built on the domain-muxed normalization
kernels of :mod:`unirep_kernels`, whose layers are re-exported here; and the domain
lifecycle of a trained network: :func:`add_domain`, :func:`recalibrate`,
:func:`export_domain` (``python -m unirep.adapt`` on the command line).
"""

from unirep_kernels import (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d, convert_domain_norm,
                            domain, domain_batch_norm, domain_instance_norm)

from .export import export_domain
from .lifecycle import add_domain, recalibrate
from .models import build_model

__all__ = ["build_model", "add_domain", "recalibrate", "export_domain", "DomainBatchNorm2d", "DomainInstanceNorm2d", "DomainScale2d", "convert_domain_norm", "domain",
           "domain_batch_norm", "domain_instance_norm"]
