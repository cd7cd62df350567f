"""Sequential pruning: FSABP's layer-by-layer procedure (`backward`, `forward`) and `iterative`.

Each prunes as it goes, calling the user's criterion on the current network and an optional
fine-tune callback, and returns a `PruneResult` whose keep sets index the starting network.

They run on zoo architectures and on traced networks (`jaxprune.trace.TracedNet`) alike: a traced
network prunes itself (``net.narrowed``: the pruned program traced again, same group names) and
masks itself (``net.mask``); `_prune` and `mask_channels` are the one place that tells the two
apart.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxprune.graph import Architecture, group_layers, groups
from jaxprune.select.budget import (
    Budget,
    CostModel,
    Keep,
    Normalize,
    Ranking,
    Scores,
    WidthRules,
    check_reachable,
    check_rounding,
    legal_widths,
)
from jaxprune.select.oneshot import adaptive_with
from jaxprune.surgery import prune
from jaxprune.trace.net import TracedNet

Criterion = Callable[[Architecture, Any], Scores]
Evaluate = Callable[[Architecture, Any], float]
Finetune = Callable[[Architecture, Any], Any]


@dataclasses.dataclass(frozen=True)
class LayerStep:
    """One group of FSABP's layer-by-layer procedure.

    Attributes:
      group: the group pruned.
      channels_before: its width before this step.
      channels_kept: its width after.
      accuracy: ``evaluate`` of the network with this group pruned, before fine-tuning.
      evaluations: ``evaluate`` calls the count search used.
    """

    group: str
    channels_before: int
    channels_kept: int
    accuracy: float
    evaluations: int


@dataclasses.dataclass(frozen=True)
class RoundStep:
    """One round of `iterative`: ratios are fractions of the starting network's cost."""

    round: int
    target_ratio: float
    achieved_ratio: float
    group_sizes: dict[str, int]


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What a sequential procedure returns.

    Attributes:
      keep: ``{group: int64[k]}`` kept channels, as indices of the *starting* network.
      arch: the pruned architecture (``jp.prune(start_arch, start_variables, keep)[0]``; for a
        traced network, a `jaxprune.trace.TracedNet` of the pruned program).
      variables: its variables, fine-tuned by the callback if one was given.
      log: one `LayerStep` per group (`backward`, `forward`) or `RoundStep` per round.
    """

    keep: Keep
    arch: Architecture
    variables: Any
    log: tuple[LayerStep | RoundStep, ...]


def mask_channels(arch: Architecture, variables: Any, group: str, channels: Any) -> dict:
    """Zeroes every parameter producing ``channels`` of ``group`` (kernels, biases, BN scale/bias).

    The network then computes exactly what it computes with those channels gated to zero (and so
    what the pruned network computes), at unchanged shapes: a candidate count is evaluated with
    no recompilation. A traced network zeroes every parameter indexing the channels
    (`jaxprune.trace.TracedNet.mask`: its gates sit where channels are read).
    """
    if isinstance(arch, TracedNet):
        return arch.mask(variables, group, channels)
    channels = np.asarray(channels, np.int64)
    flat = traverse_util.flatten_dict(variables["params"])
    for layer in group_layers(arch)[group]:
        names = ("scale", "bias") if layer.kind == "norm" else ("kernel", "bias")
        for name in names:
            key = (*layer.path, name)
            if key in flat:
                flat[key] = jnp.asarray(flat[key]).at[..., channels].set(0.0)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


def _prune(arch: Architecture, variables: Any, keep: Keep) -> tuple[Architecture, Any]:
    """`jaxprune.prune`; a traced network's ``narrowed`` (the pruned network traced again)."""
    if isinstance(arch, TracedNet):
        return arch.narrowed(variables, keep)
    return prune(arch, variables, keep)


def conv_groups(arch: Architecture) -> list[str]:
    """Groups produced by a convolution, in forward order (FSABP prunes these).

    Forward order is the order of ``jp.groups(arch)``: for the zoo, the order ``layers()``
    declares; for a traced network, program order, i.e. the order in which the model's code first
    runs each group's first producer (a residual stream comes where its first conv runs; parallel
    branches in the order the code calls them).
    """
    return [g for g, ls in group_layers(arch).items() if any(lr.kind == "conv" for lr in ls)]


def _search_width(
    arch: Architecture,
    variables: Any,
    group: str,
    ranking: np.ndarray,
    candidates: np.ndarray,
    evaluate: Evaluate,
    floor: float,
) -> tuple[int, float, int]:
    """Bisection for the smallest candidate width whose accuracy is at least ``floor``.

    Assumes accuracy grows with the width; the full width (the last candidate) is accepted without
    evaluation. Returns (width, its accuracy, evaluations).
    """
    n = ranking.size
    accuracies: dict[int, float] = {}

    def accuracy_at(width: int) -> float:
        masked = mask_channels(arch, variables, group, ranking[: n - width])
        accuracies[width] = float(evaluate(arch, masked))
        return accuracies[width]

    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if accuracy_at(int(candidates[mid])) >= floor:
            hi = mid
        else:
            lo = mid + 1
    width = int(candidates[lo])
    evaluations = len(accuracies)
    accuracy = accuracies[width] if width in accuracies else accuracy_at(width)
    return width, accuracy, evaluations


def _sequential(
    arch: Architecture,
    variables: Any,
    criterion: Criterion,
    evaluate: Evaluate,
    tolerance: float,
    order: list[str],
    finetune: Finetune | None,
    round_to: int,
    min_keep: int,
) -> PruneResult:
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be a non-negative accuracy drop, got {tolerance}")
    check_rounding(round_to, min_keep)
    sizes = groups(arch)
    unknown = sorted(set(order) - set(sizes))
    if unknown:
        raise ValueError(f"unknown groups {unknown}; valid groups: {list(sizes)}")
    floor = float(evaluate(arch, variables)) - tolerance
    origin = {g: np.arange(n) for g, n in sizes.items()}
    log = []
    for group in order:
        n = groups(arch)[group]
        ranking = np.argsort(np.asarray(criterion(arch, variables)[group]), kind="stable")
        candidates = np.unique(legal_widths(np.arange(1, n + 1), np.full(n, n), round_to, min_keep))
        width, accuracy, evaluations = _search_width(
            arch, variables, group, ranking, candidates, evaluate, floor
        )
        if width < n:
            kept = np.sort(ranking[n - width :])
            arch, variables = _prune(arch, variables, {group: kept})
            origin[group] = origin[group][kept]
            if finetune is not None:
                variables = finetune(arch, variables)
        log.append(LayerStep(group, n, width, accuracy, evaluations))
    return PruneResult(origin, arch, variables, tuple(log))


def backward(
    arch: Architecture,
    variables: Any,
    criterion: Criterion,
    evaluate: Evaluate,
    tolerance: float,
    *,
    groups_to_prune: list[str] | None = None,
    finetune: Finetune | None = None,
    round_to: int = 1,
    min_keep: int = 1,
) -> PruneResult:
    """FSABP's procedure: prune layer by layer from the last conv back to the first.

    "Last to first" is `conv_groups` reversed (for a traced network: reverse program order).

    For each group: score the *current* network with ``criterion``, then bisect on the number of
    lowest-scored channels removed for the smallest width whose accuracy (``evaluate`` on held-out
    data, with those channels' parameters zeroed: see `mask_channels`) stays at least the starting
    network's accuracy minus ``tolerance``; prune to it for real, then call ``finetune``.

    Args:
      arch: starting architecture.
      variables: its variables.
      criterion: ``(arch, variables) -> {group: f[n]}``, higher keeps; bind batches with
        ``functools.partial`` (e.g. ``importance.fsabp``).
      evaluate: ``(arch, variables) -> accuracy`` on held-out data.
      tolerance: largest accuracy drop allowed from the starting network, in ``evaluate``'s units.
      groups_to_prune: groups in forward order; default every conv-produced group.
      finetune: optional ``(arch, variables) -> variables`` called after each pruned group.
      round_to: widths a multiple of this, or full.
      min_keep: channels every group keeps at least.

    Returns:
      `PruneResult` with one `LayerStep` per group, in the order pruned.

    References:
      Geng & Niu 2022 (FSABP), Machine Learning 111.
    """
    order = list(groups_to_prune) if groups_to_prune is not None else conv_groups(arch)
    return _sequential(
        arch, variables, criterion, evaluate, tolerance, order[::-1], finetune, round_to, min_keep
    )


def forward(
    arch: Architecture,
    variables: Any,
    criterion: Criterion,
    evaluate: Evaluate,
    tolerance: float,
    *,
    groups_to_prune: list[str] | None = None,
    finetune: Finetune | None = None,
    round_to: int = 1,
    min_keep: int = 1,
) -> PruneResult:
    """`backward`'s rule applied from the first conv to the last (the order FSABP compares with)."""
    order = list(groups_to_prune) if groups_to_prune is not None else conv_groups(arch)
    return _sequential(
        arch, variables, criterion, evaluate, tolerance, order, finetune, round_to, min_keep
    )


def iterative(
    arch: Architecture,
    variables: Any,
    criterion: Criterion,
    rounds: int,
    *,
    input_shape: tuple[int, int, int] | None = None,
    macs_ratio: float | None = None,
    params_ratio: float | None = None,
    filters_ratio: float | None = None,
    budget: Budget | None = None,
    finetune: Finetune | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    normalize: Normalize | str | None = None,
    tolerance: float = 0.005,
    max_pruning_ratio: float | None = None,
    prunable: list[str] | None = None,
    ranking: Ranking | str = Ranking.SCORE,
) -> PruneResult:
    """``rounds`` rounds of: score the current network, `adaptive` prune, fine-tune.

    Round i aims at ``1 - (1 - ratio) * i / rounds`` of the starting network's cost, so equal
    amounts go each round and the last lands on the budget. ``max_pruning_ratio`` holds against
    the *starting* widths across all rounds.

    Args:
      arch, variables: the starting network.
      criterion: ``(arch, variables) -> {group: f[n]}``.
      rounds: number of rounds, at least 1.
      input_shape, macs_ratio, params_ratio, filters_ratio, budget, round_to, min_keep,
      normalize, tolerance, max_pruning_ratio, prunable, ranking: as for `adaptive`; the budget is
        the fraction of the starting network kept at the end.
      finetune: optional ``(arch, variables) -> variables`` after each round.

    Returns:
      `PruneResult` with one `RoundStep` per round.
    """
    budget = Budget.from_ratios(
        budget, macs_ratio=macs_ratio, params_ratio=params_ratio, filters_ratio=filters_ratio
    )
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    rules = WidthRules(round_to, min_keep, max_pruning_ratio, prunable)
    cost = check_reachable(arch, budget, rules, input_shape)
    start_cost = cost(cost.full_widths)
    start_floors = dict(
        zip(cost.group_names, rules.floors(cost.group_names, cost.full_widths), strict=True)
    )
    origin = {g: np.arange(n) for g, n in groups(arch).items()}
    log = []
    for i in range(1, rounds + 1):
        target = 1.0 - (1.0 - budget.ratio) * i / rounds
        now = CostModel.build(arch, budget.kind, input_shape)
        round_ratio = min(1.0, target * start_cost / now(now.full_widths))
        keep = adaptive_with(
            arch,
            criterion(arch, variables),
            Budget(budget.kind, round_ratio),
            dataclasses.replace(rules, max_pruning_ratio=None, at_least=start_floors),
            normalize,
            min(1.0, tolerance * start_cost / now(now.full_widths)),
            ranking,
            input_shape,
        )
        arch, variables = _prune(arch, variables, keep)
        origin = {g: origin[g][keep[g]] for g in origin}
        if finetune is not None:
            variables = finetune(arch, variables)
        after = CostModel.build(arch, budget.kind, input_shape)
        log.append(RoundStep(i, target, after(after.full_widths) / start_cost, groups(arch)))
    return PruneResult(origin, arch, variables, tuple(log))
