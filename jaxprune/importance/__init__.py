"""Filter importance criteria: pure functions ``(arch, variables, batches=None, **options)``.

Every criterion returns ``{group: f32[n]}`` with exactly the keys of ``jp.groups(arch)``; **higher
means keep**. ``batches`` is an iterable of ``(images f32[N, H, W, C], labels int[N])``; data
criteria use mean softmax cross-entropy with BatchNorm in eval mode unless given ``loss_fn``, and
average over batches as the mean of per-batch means. All of them run under ``jax.jit``.

    scores = importance.gfi(arch, variables, batches)            # GFI-AP (gate gradients)
    scores = importance.CRITERIA["fsabp"](arch, variables)       # by name
    # each method's data, normalisation and policy: `jaxprune.methods.METHODS`
    importance.agreement(scores, importance.oracle(arch, variables, batches)).pooled

Definitions, papers and where jaxprune departs from them: ``docs/criteria.md``.
"""

from collections.abc import Callable

from jaxprune.importance.agreement import Agreement, agreement, spearman
from jaxprune.importance.baselines import FPGMCenter, fpgm, l1, l2, random, taylor_fo_bn
from jaxprune.importance.fsabp import Distance, Mode, fsabp
from jaxprune.importance.gates import Scores, cross_entropy
from jaxprune.importance.gfi import (
    Accumulate,
    BatchNormMode,
    GFIAccumulation,
    GFIAccumulator,
    Signal,
    gfi,
)
from jaxprune.importance.oracle import oracle

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

# The user's surface. The gate and filter machinery (gate_gradients, ones_gates, filter_matrix,
# producer_outputs, ...) stays importable from its module for tests and experiments.
__all__ = [
    "CRITERIA",
    "Accumulate",
    "Agreement",
    "BatchNormMode",
    "Distance",
    "FPGMCenter",
    "GFIAccumulation",
    "GFIAccumulator",
    "Mode",
    "Scores",
    "Signal",
    "agreement",
    "cross_entropy",
    "fpgm",
    "fsabp",
    "gfi",
    "l1",
    "l2",
    "oracle",
    "random",
    "spearman",
    "taylor_fo_bn",
]
