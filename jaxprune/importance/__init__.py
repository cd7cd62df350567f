"""Filter importance criteria: pure functions ``(arch, variables, batches=None, **options)``.

Every criterion returns ``{group: f32[n]}`` with exactly the keys of ``jp.groups(arch)``; **higher
means keep**. ``batches`` is an iterable of ``(images f32[N, H, W, C], labels int[N])``; data
criteria use mean softmax cross-entropy with BatchNorm in eval mode unless given ``loss_fn``, and
average over batches as the mean of per-batch means. All of them run under ``jax.jit``.

    scores = importance.gfi(arch, variables, batches)            # GFI-AP (gate gradients)
    scores = importance.CRITERIA["fsabp"](arch, variables)       # by name
    importance.agreement(scores, importance.oracle(arch, variables, batches)).pooled

Definitions, papers and where jaxprune departs from them: ``docs/criteria.md``.
"""

from collections.abc import Callable

from jaxprune.importance.agreement import Agreement, agreement, spearman
from jaxprune.importance.baselines import FPGMCenter, fpgm, l1, l2, random, taylor_fo_bn
from jaxprune.importance.filters import filter_matrix, producer_outputs
from jaxprune.importance.fsabp import Distance, Mode, fsabp, nearest_distance
from jaxprune.importance.gates import (
    Batches,
    LossFn,
    Scores,
    cross_entropy,
    gate_gradients,
    ones_gates,
    per_example_gate_gradients,
)
from jaxprune.importance.gfi import (
    Accumulate,
    GFIAccumulator,
    Signal,
    gfi,
    gfi_accumulator_init,
    gfi_accumulator_scores,
    gfi_accumulator_update,
)
from jaxprune.importance.oracle import oracle
from jaxprune.select import Normalize

Criterion = Callable[..., Scores]

CRITERIA: dict[str, Criterion] = {
    "gfi": gfi,
    "taylor_fo_bn": taylor_fo_bn,
    "l1": l1,
    "l2": l2,
    "fpgm": fpgm,
    "random": random,
    "fsabp": fsabp,
    "oracle": oracle,
}

# Per-group normalisation a global ranking (`jaxprune.select.adaptive`) should apply to each
# criterion: None for scores on one network-wide scale (loss changes, gradients); for per-layer
# quantities (norms and distances grow with a layer's fan-in) division by the group's mean, as
# Torch-Pruning's magnitude importance does by default. (L2 normalisation, Molchanov et al. 2017,
# shrinks a wide group's scores by sqrt(n): on LeNet-5 it empties fc1 and fc2 first.)
DEFAULT_NORMALIZE: dict[str, Normalize | None] = {
    "gfi": None,
    "taylor_fo_bn": None,
    "oracle": None,
    "random": None,
    "l1": Normalize.MEAN,
    "l2": Normalize.MEAN,
    "fpgm": Normalize.MEAN,
    "fsabp": Normalize.MEAN,
}

# Criteria that read data (``batches`` required).
NEEDS_BATCHES = frozenset({"gfi", "taylor_fo_bn", "oracle"})

__all__ = [
    "CRITERIA",
    "DEFAULT_NORMALIZE",
    "NEEDS_BATCHES",
    "Accumulate",
    "Agreement",
    "Batches",
    "Criterion",
    "Distance",
    "FPGMCenter",
    "GFIAccumulator",
    "LossFn",
    "Mode",
    "Scores",
    "Signal",
    "agreement",
    "cross_entropy",
    "filter_matrix",
    "fpgm",
    "fsabp",
    "gate_gradients",
    "gfi",
    "gfi_accumulator_init",
    "gfi_accumulator_scores",
    "gfi_accumulator_update",
    "l1",
    "l2",
    "nearest_distance",
    "ones_gates",
    "oracle",
    "per_example_gate_gradients",
    "producer_outputs",
    "random",
    "spearman",
    "taylor_fo_bn",
]
