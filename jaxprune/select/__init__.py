"""Selection policies: from importance scores to keep sets for `jaxprune.prune`.

    budget = select.Budget("macs", 0.5)                              # one value, validated once
    keep = select.adaptive(arch, scores, budget=budget)              # GFI-AP: one global ranking
    keep = select.adaptive(arch, scores, macs_ratio=0.5, max_pruning_ratio=0.8,
                           prunable=["*/conv1"])
    keep = select.uniform(arch, scores, budget=budget)               # the same fraction per group
    keep = select.threshold(arch, scores, select.Budget("filters", 0.6))   # the authors' rule
    result = select.backward(arch, variables, criterion, evaluate, tolerance=0.01)   # FSABP
    result = select.iterative(arch, variables, criterion, rounds=3, macs_ratio=0.5)

Every ratio is the **fraction kept**, in (0, 1]: ``macs_ratio=0.5`` leaves half the MACs,
``filters_ratio=1 - p`` is the paper's "prune a fraction p of all filters". Impossible requests
(budgets the width rules make unreachable, non-finite scores) are refused before any work. The
sequential procedures (`backward`, `forward`, `iterative`) prune as they go and return a
`PruneResult`, whose keep sets index the network they started from.
"""

from jaxprune.select.budget import (
    Budget,
    BudgetKind,
    CostModel,
    Keep,
    Normalize,
    Policy,
    Ranking,
    WidthRules,
    normalize_scores,
)
from jaxprune.select.oneshot import adaptive, threshold, uniform
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
    "Budget",
    "BudgetKind",
    "CostModel",
    "Keep",
    "LayerStep",
    "Normalize",
    "Policy",
    "PruneResult",
    "Ranking",
    "RoundStep",
    "WidthRules",
    "adaptive",
    "backward",
    "conv_groups",
    "forward",
    "iterative",
    "mask_channels",
    "normalize_scores",
    "threshold",
    "uniform",
]
