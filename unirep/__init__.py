"""unirep: universal representations across visual domains (Bilen & Vedaldi, 2017).

The paper's models, data pipeline and trainer, built on the domain-muxed normalization
kernels of :mod:`unirep_kernels`, whose layers are re-exported here.
"""

from unirep_kernels import (DomainBatchNorm2d, DomainInstanceNorm2d, DomainScale2d, convert_domain_norm,
                            domain, domain_batch_norm, domain_instance_norm)

from .models import build_model

__all__ = ["build_model", "DomainBatchNorm2d", "DomainInstanceNorm2d", "DomainScale2d", "convert_domain_norm", "domain",
           "domain_batch_norm", "domain_instance_norm"]
