"""Multi-domain data for unirep: the built-in benchmark, loaders for the paper's real
datasets in their published formats, the paper's preprocessing and multi-domain samplers.

Quick start::

    from unirep.data import builtin_benchmark
    data = builtin_benchmark()                      # 8 domains, cached under ~/.cache/unirep
    for images, labels, domain in data.loader(128, num_steps=100, device="cuda"):
        ...                                          # pure round-robin batches, whitened+augmented
"""

from .builtin import (BUILTIN_DOMAINS, builtin_benchmark, builtin_domain, default_cache_dir,
                      generate_domain)
from .dataset import NO_FLIP_KINDS, DomainDataset, MultiDomainData, label_permutation
from .errors import DataFormatError
from .formats import FORMATS, detect_format, load_dataset
from .loader import BatchLoader, iter_eval
from .samplers import IndexStream, MixedSampler, RoundRobinSampler, allocate_shares
from .transforms import augment, channel_stats, resize_uint8, to_rgb, whiten

__all__ = [
    "BUILTIN_DOMAINS", "builtin_benchmark", "builtin_domain", "default_cache_dir",
    "generate_domain", "NO_FLIP_KINDS", "DomainDataset", "MultiDomainData", "label_permutation",
    "DataFormatError",
    "FORMATS", "detect_format", "load_dataset", "BatchLoader", "iter_eval", "IndexStream",
    "MixedSampler", "RoundRobinSampler", "allocate_shares", "augment", "channel_stats",
    "resize_uint8", "to_rgb", "whiten",
]
