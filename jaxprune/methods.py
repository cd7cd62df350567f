"""The pruning methods by name: one registry entry holds everything the layers above need.

A `Method` is a criterion (a pure function from `jaxprune.importance`) together with how its
scores are selected: whether it reads data and which data, its per-group normalisation, its
default policy and the groups it may cut. The command line, the pipeline and the experiments
read this table and nothing else:

    method = methods.get("gfi")                 # ValueError listing the valid names otherwise
    scores = method.score(arch, variables, batches)
    keep = method.select(arch, scores, select.Budget("macs", 0.5))

References for each criterion are in its docstring and in ``docs/criteria.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

from jaxprune import importance, select
from jaxprune.graph import Architecture, group_layers
from jaxprune.select import Budget, Normalize, Policy, Ranking, WidthRules
from jaxprune.select.oneshot import adaptive_with, check_threshold_rules, uniform_with

# The default cap for selection from the command line and the demo: no group loses more than 80%
# of its channels (a global ranking otherwise empties layers: VGG-16 kept 1-3 of 512).
DEFAULT_MAX_PRUNING_RATIO = 0.8


def authors_layers(arch: Architecture) -> tuple[str, ...]:
    """Group patterns GFI-AP's released code prunes in ``arch``.

    ResNets: the groups inside blocks only (a basic block's first conv, a bottleneck's first two),
    never the stem, the residual streams or the projections. Plain networks (VGG, LeNet): every
    group a convolution produces, never a dense layer.

    References:
      github.com/miltonmondal/GFI-AP, ``GFI_AP_CIFAR/API_multi.py`` (the layer lists) and
      ``variable_list.py`` (VGG's 13 convs).
    """
    producers = group_layers(arch)
    inner = tuple(g for g in producers if "/block" in g)
    if inner:
        return inner
    kinds = {g: {lr.kind for lr in ls} - {"norm"} for g, ls in producers.items()}
    return tuple(g for g, k in kinds.items() if k == {"conv"})


@dataclasses.dataclass(frozen=True)
class ScoringData:
    """What data a criterion scores on.

    Attributes:
      num_batches: training batches to score on; None: one whole epoch.
      augment: with the training augmentation (the authors score the augmented training set).
    """

    num_batches: int | None = 8
    augment: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning method.

    Attributes:
      name: the registry key (``--method``).
      criterion: ``(arch, variables, batches=None) -> {group: f32[n]}``, higher keeps.
      data: the scoring data, or None for a criterion that reads weights only.
      normalize: per-group rescaling before a global ranking (None: one network-wide scale).
      policy: default selection policy.
      prunable: ``arch -> glob patterns`` of the groups cut by default (None: every group).
      ranking: what `select.adaptive` orders channels by.
      summary: one line for ``--help`` and the docs.
      accumulator: a `jaxprune.train.GateAccumulator` that collects this method's scores during
        training at no extra cost (``TrainConfig.score_during_training``), or None.
    """

    name: str
    criterion: Callable[..., importance.Scores]
    data: ScoringData | None
    normalize: Normalize | None
    policy: Policy = Policy.ADAPTIVE
    prunable: Callable[[Architecture], tuple[str, ...]] | None = None
    ranking: Ranking = Ranking.SCORE
    summary: str = ""
    accumulator: Any = None

    @property
    def needs_data(self) -> bool:
        return self.data is not None

    def default_prunable(self, arch: Architecture) -> tuple[str, ...] | None:
        return self.prunable(arch) if self.prunable is not None else None

    def score(self, arch: Architecture, variables: Any, batches=None) -> importance.Scores:
        if self.needs_data and batches is None:
            raise ValueError(f"method {self.name!r} scores on data: give batches")
        return self.criterion(arch, variables, batches=batches)

    def select(
        self,
        arch: Architecture,
        scores: importance.Scores,
        budget: Budget,
        rules: WidthRules | None = None,
        policy: Policy | str | None = None,
        ranking: Ranking | str | None = None,
    ) -> select.Keep:
        """Keep sets for ``budget`` under ``rules`` (default: this method's prunable groups)."""
        policy = Policy(policy or self.policy)
        if rules is None:
            rules = WidthRules(prunable=self.default_prunable(arch))
        if policy is Policy.THRESHOLD:
            check_threshold_rules(rules)
            return select.threshold(arch, scores, budget, prunable=rules.prunable)
        if policy is Policy.UNIFORM:
            return uniform_with(arch, scores, budget, rules)
        return adaptive_with(
            arch, scores, budget, rules, self.normalize, ranking=ranking or self.ranking
        )


_gfi_authors = functools.partial(importance.gfi, signal="activation", batch_norm="train")
functools.update_wrapper(_gfi_authors, importance.gfi)

METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method(
            "gfi",
            importance.gfi,
            ScoringData(),
            Normalize.MEAN,
            summary="GFI-AP, recommended: per-example gate gradients, normalised per group, "
            "one global ranking over every group (capped on the command line)",
            accumulator=importance.GFIAccumulation(),
        ),
        Method(
            "gfi_ap_authors",
            _gfi_authors,
            ScoringData(num_batches=None, augment=True),
            None,
            policy=Policy.THRESHOLD,
            prunable=authors_layers,
            summary="GFI-AP as the authors' code runs it: class-mean activations, global "
            "threshold with their cap, their layers",
        ),
        Method(
            "taylor_fo_bn",
            importance.taylor_fo_bn,
            ScoringData(),
            None,
            summary="Taylor-FO-BN (Molchanov et al. 2019)",
        ),
        Method("l1", importance.l1, None, Normalize.MEAN, summary="filter L1 norm (Li et al.)"),
        Method("l2", importance.l2, None, Normalize.MEAN, summary="filter L2 norm"),
        Method("fpgm", importance.fpgm, None, Normalize.MEAN, summary="FPGM (He et al. 2019)"),
        Method("random", importance.random, None, None, summary="random scores"),
        Method(
            "fsabp",
            importance.fsabp,
            None,
            Normalize.MEAN,
            summary="filter similarity (Geng & Niu 2022), one-shot",
        ),
        Method(
            "oracle",
            importance.oracle,
            ScoringData(),
            None,
            summary="exact loss increase of removing each channel alone",
        ),
    )
}


def get(name: str | Method) -> Method:
    """The method called ``name`` (a `Method` is returned as is: a user's own variant, e.g.
    ``dataclasses.replace(methods.get("gfi"), name="gfi_raw", normalize=None)``); ValueError
    listing the valid names otherwise."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
