"""Selection policies: from importance scores to keep sets for `jaxprune.prune`.

    keep = select.adaptive(arch, scores, macs_ratio=0.5)        # GFI-AP: one global ranking
    keep = select.uniform(arch, scores, 0.5)                    # the same fraction per group
    result = select.backward(arch, variables, criterion, evaluate, tolerance=0.01)   # FSABP
    result = select.iterative(arch, variables, criterion, rounds=3, macs_ratio=0.5)

Every ratio is the **fraction kept**, in (0, 1]: ``macs_ratio=0.5`` leaves half the MACs,
``filters_ratio=1 - p`` is the paper's "prune a fraction p of all filters". Impossible requests are
refused before any work. The sequential procedures (`backward`, `forward`, `iterative`) prune
as they go and return a `PruneResult`, whose keep sets index the network they started from.
"""

from jaxprune.select.budget import (
    Budget,
    CostModel,
    Keep,
    Normalize,
    Policy,
    adaptive,
    legal_widths,
    min_widths,
    normalize_scores,
    uniform,
)
from jaxprune.select.sequential import (
    LayerStep,
    PruneResult,
    RoundStep,
    backward,
    conv_groups,
    forward,
    iterative,
    mask_channels,
)

__all__ = [
    "Policy",
    "Budget",
    "CostModel",
    "Keep",
    "LayerStep",
    "Normalize",
    "PruneResult",
    "RoundStep",
    "adaptive",
    "backward",
    "conv_groups",
    "forward",
    "iterative",
    "legal_widths",
    "mask_channels",
    "min_widths",
    "normalize_scores",
    "uniform",
]
