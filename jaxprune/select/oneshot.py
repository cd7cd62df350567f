"""One-shot selection policies: `adaptive` (GFI-AP's global ranking), `uniform`, `threshold`.

Each maps ``{group: f[n]}`` scores (higher keeps) and one `Budget` to keep sets for
`jaxprune.prune`. All honour the same `WidthRules` (``round_to``, ``min_keep``,
``max_pruning_ratio``, ``prunable``) and refuse, before any work, scores that are not finite and
budgets those rules make unreachable, naming the groups that bind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxprune.graph import Architecture
from jaxprune.select.budget import (
    Budget,
    BudgetKind,
    CostModel,
    Keep,
    Normalize,
    Ranking,
    Scores,
    WidthRules,
    check_ratio,
    check_reachable,
    check_scores,
    normalize_scores,
    top_keep,
)


def _remove_lowest_first(
    cost: CostModel,
    rules: WidthRules,
    floors: np.ndarray,
    ordered_groups: np.ndarray,
    budget: float,
    floor: float,
) -> np.ndarray:
    """Widths after removing channels in the given order (their groups) down to ``budget``.

    Removing the i lowest channels takes group g down to ``legal(n_g - removed_g)``. The longest
    prefix still over the budget is found by bisection; from there, a removal that would land at
    or under the budget is taken only if it lands at or above ``floor``, otherwise that channel is
    kept (its removal overshoots: a whole rounded unit, or one channel of an expensive early conv)
    and removal goes on down the order. If nothing lands in ``[floor, budget]``, the shortest
    prefix under the budget is taken and removed units are re-added, best first, while it holds.
    """
    full, n_groups = cost.full_widths, cost.full_widths.size

    def widths_after(removed: np.ndarray) -> np.ndarray:
        return rules.legal(full - removed, full, floors)

    def prefix(k: int) -> np.ndarray:
        return np.bincount(ordered_groups[:k], minlength=n_groups)

    lo, hi = 0, ordered_groups.size  # the whole order is under the budget (checked)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(widths_after(prefix(mid))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo == 0:
        return full.copy()

    removed = prefix(lo - 1)
    for g in ordered_groups[lo - 1 :]:
        trial = removed.copy()
        trial[g] += 1
        trial_cost = cost(widths_after(trial))
        if trial_cost > budget:
            removed = trial
        elif trial_cost >= floor:
            return widths_after(trial)

    # Re-adding a unit of a group only gets dearer as other groups grow: a group that fails is done.
    widths = widths_after(prefix(lo))
    done = np.zeros(n_groups, bool)
    for g in ordered_groups[lo - 1 :: -1]:
        if done[g] or widths[g] >= full[g]:
            continue
        trial = widths.copy()
        trial[g] = rules.legal(widths[g] + 1, full[g], floors[g])
        if cost(trial) <= budget:
            widths = trial
        else:
            done[g] = True
    return widths


def adaptive(
    arch: Architecture,
    scores: Scores,
    input_shape: tuple[int, int, int] | None = None,
    macs_ratio: float | None = None,
    params_ratio: float | None = None,
    filters_ratio: float | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    normalize: Normalize | str | None = None,
    tolerance: float = 0.005,
    *,
    budget: Budget | None = None,
    max_pruning_ratio: float | None = None,
    prunable: Sequence[str] | None = None,
    ranking: Ranking | str = Ranking.SCORE,
) -> Keep:
    """GFI-AP's adaptive pruning: one global ranking, lowest channels removed first.

    All channels of the prunable groups are sorted by (normalised) score — or, with
    ``ranking="score_per_cost"``, by score per unit of cost its removal saves (a channel of a conv
    on 8x8 maps saves 64x one on 1x1 maps; this keeps the most total score for the budget, the
    greedy knapsack) — and removed lowest first until the network is at or under the budget.
    Widths are rounded up to a multiple of ``round_to`` (or stay full) and never fall below their
    floor (``min_keep``, ``max_pruning_ratio``; frozen groups stay whole): a group at its floor is
    skipped while removal goes on elsewhere. To land close to the budget, a removal that would take
    the network more than ``tolerance`` under it is skipped and removal goes on down the ranking.
    Each probe evaluates the `CostModel` in O(layers): ResNet-50 (11,456 channels) takes
    milliseconds.

    Args:
      arch: the architecture the scores belong to.
      scores: ``{group: f[n]}`` for every group; higher means keep.
      input_shape: (H, W, C) for counting MACs; default the architecture's.
      macs_ratio, params_ratio, filters_ratio: the budget as one keyword (fraction kept), or
      budget: the budget as one `Budget` value; exactly one of the four.
      round_to: every width a multiple of this, or the group's full width.
      min_keep: channels every group keeps at least.
      normalize: per-group rescaling before the global ranking (each method's default is in
        `jaxprune.methods.METHODS`); None: scores as given.
      tolerance: how far under the budget the result may land, as a fraction of the full cost
        (MACs and params; a filters budget lands exactly). ``1.0``: strict lowest-first order.
      max_pruning_ratio: no group loses more than this fraction of its channels.
      prunable: glob patterns of the groups that may be cut (e.g. ``["*/conv1"]``); the others
        keep every channel and still count in the budget.
      ranking: ``"score"`` or ``"score_per_cost"`` (see above).

    Returns:
      ``{group: int64[k]}`` increasing indices for every group.

    Raises:
      ValueError: before any work, for not exactly one budget, a ratio outside (0, 1], bad rules,
        scores whose groups or shapes do not match or that are not finite, or a budget below the
        cost of the smallest network the rules allow (naming the binding groups).

    References:
      Mondal et al. 2022 (GFI-AP), Computer Vision and Image Understanding.
    """
    budget = Budget.from_ratios(
        budget, macs_ratio=macs_ratio, params_ratio=params_ratio, filters_ratio=filters_ratio
    )
    rules = WidthRules(round_to, min_keep, max_pruning_ratio, prunable)
    return adaptive_with(arch, scores, budget, rules, normalize, tolerance, ranking, input_shape)


def adaptive_with(
    arch: Architecture,
    scores: Scores,
    budget: Budget,
    rules: WidthRules,
    normalize: Normalize | str | None = None,
    tolerance: float = 0.005,
    ranking: Ranking | str = Ranking.SCORE,
    input_shape: tuple[int, int, int] | None = None,
) -> Keep:
    """`adaptive` with its budget and width rules as values (what the pipeline passes down)."""
    ranking = Ranking(ranking)
    check_scores(arch, scores)
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance is a fraction of the full cost in [0, 1], got {tolerance}")
    cost = check_reachable(arch, budget, rules, input_shape)
    full, names = cost.full_widths, cost.group_names
    floors = rules.floors(names, full)

    normalized = normalize_scores(scores, normalize)
    ranked = normalized
    if ranking is Ranking.SCORE_PER_COST:
        per_channel = np.maximum(cost.channel_costs(), 1e-300)
        ranked = {g: normalized[g] / per_channel[i] for i, g in enumerate(names)}
    movable = np.flatnonzero(floors < full)
    flat = np.concatenate([ranked[names[i]] for i in movable]) if movable.size else np.zeros(0)
    group_of = np.repeat(movable, full[movable])
    order = np.argsort(flat, kind="stable")
    total = cost(full)
    widths = _remove_lowest_first(
        cost,
        rules,
        floors,
        group_of[order],
        budget.ratio * total,
        (budget.ratio - tolerance) * total,
    )
    return top_keep(normalized, names, widths)


def uniform(
    arch: Architecture,
    scores: Scores,
    ratio: float | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    *,
    macs_ratio: float | None = None,
    params_ratio: float | None = None,
    filters_ratio: float | None = None,
    budget: Budget | None = None,
    input_shape: tuple[int, int, int] | None = None,
    max_pruning_ratio: float | None = None,
    prunable: Sequence[str] | None = None,
) -> Keep:
    """The same fraction kept in every prunable group: the baseline GFI-AP's adaptive widths beat.

    With ``ratio``, each prunable group keeps its ``round(ratio * n)`` best channels, rounded to the
    nearest multiple of ``round_to`` (or full), at least its floor. With a budget instead (MACs,
    params or filters), the per-group fraction is the largest (found by bisection) whose network
    keeps at most that fraction, so uniform and `adaptive` compare at the same cost.

    Args:
      arch: the architecture.
      scores: ``{group: f[n]}`` for every group; higher means keep.
      ratio: fraction kept per group, in (0, 1].
      round_to: widths a multiple of this, or full.
      min_keep: channels every group keeps at least.
      macs_ratio, params_ratio, filters_ratio, budget: the budget instead of ``ratio``.
      input_shape: (H, W, C) for counting MACs; default the architecture's.
      max_pruning_ratio: no group loses more than this fraction of its channels.
      prunable: glob patterns of the groups that may be cut; the others stay whole.

    Returns:
      ``{group: int64[k]}`` increasing indices for every group.

    Raises:
      ValueError: before any work, for not exactly one of the ratios, a ratio outside (0, 1], bad
        rules, scores that do not match or are not finite, or a budget the rules make unreachable.
    """
    rules = WidthRules(round_to, min_keep, max_pruning_ratio, prunable)
    if ratio is not None and (macs_ratio, params_ratio, filters_ratio, budget) == (None,) * 4:
        return uniform_with(arch, scores, check_ratio("ratio", ratio), rules, input_shape)
    if ratio is not None:
        raise ValueError("give exactly one of ratio, budget, macs_ratio, params_ratio, ...")
    budget = Budget.from_ratios(
        budget, macs_ratio=macs_ratio, params_ratio=params_ratio, filters_ratio=filters_ratio
    )
    return uniform_with(arch, scores, budget, rules, input_shape)


def uniform_with(
    arch: Architecture,
    scores: Scores,
    budget: Budget | float,
    rules: WidthRules,
    input_shape: tuple[int, int, int] | None = None,
) -> Keep:
    """`uniform` with its budget (or per-group fraction, a float) and width rules as values."""
    sizes = check_scores(arch, scores)
    names = tuple(sizes)
    full = np.array([sizes[g] for g in names], np.int64)
    floors = rules.floors(names, full)
    round_to = rules.round_to

    def widths_at(fraction: float) -> np.ndarray:
        nearest = np.floor(fraction * full / round_to + 0.5).astype(np.int64) * round_to
        return rules.legal(nearest, full, floors)

    if not isinstance(budget, Budget):
        widths = widths_at(budget)
    else:
        cost = check_reachable(arch, budget, rules, input_shape)
        target = budget.ratio * cost(full)
        lo, hi = 0.0, 1.0  # cost(widths_at(0)) = cost(floors) <= target (checked)
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(widths_at(mid)) <= target else (lo, mid)
        widths = widths_at(lo)
    return top_keep(normalize_scores(scores, None), names, widths)


def check_threshold_rules(rules: WidthRules) -> None:
    """Refuses width rules the authors' threshold rule does not take (it has its own cap)."""
    if rules.max_pruning_ratio is not None or rules.round_to != 1 or rules.min_keep != 1:
        raise ValueError(
            "the threshold policy is the authors' rule (their own cap per layer): it takes "
            "prunable only, no max_pruning_ratio, round_to or min_keep"
        )


def threshold(
    arch: Architecture,
    scores: Scores,
    budget: Budget,
    *,
    prunable: Sequence[str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Keep:
    """GFI-AP as the authors' released code selects: one global threshold, with a cap per layer.

    With p = 1 - ``budget.ratio`` (a filters budget) and the raw scores of the N prunable
    channels, ``T = sorted(scores)[int(p * N)]``; every channel scored at or below T is removed,
    except that a group whose channels all lie at or below T loses only its ``int(g_p * n)``
    lowest, ``g_p = p + (1 - p) / 2``. Raw scores, no normalisation. For a MACs or params budget,
    p is the smallest fraction (bisection) whose network keeps at most that fraction: the
    authors' rule reaching another kind of budget.

    Args:
      arch: the architecture.
      scores: ``{group: f[n]}`` for every group; higher means keep.
      budget: for ``"filters"``, the fraction of the *prunable* channels kept (``1 - p``).
      prunable: glob patterns of the groups that may be cut (the authors': see
        `jaxprune.methods.authors_layers`); None: all.
      input_shape: (H, W, C) for counting MACs; default the architecture's.

    Returns:
      ``{group: int64[k]}`` increasing indices for every group.

    References:
      Mondal et al. 2022 (GFI-AP); github.com/miltonmondal/GFI-AP, ``GFI_AP_CIFAR/pruning_API.py``
      (``find_global_threshold``, ``prune_retrain_block``).
    """
    rules = WidthRules(prunable=prunable)
    sizes = check_scores(arch, scores)
    names = tuple(sizes)
    raw = normalize_scores(scores, None)
    cut = [g for g, frozen in zip(names, rules.frozen(names), strict=True) if not frozen]
    pooled = np.sort(np.concatenate([raw[g] for g in cut]))

    def widths_at(p: float) -> np.ndarray:
        t = pooled[min(int(p * pooled.size), pooled.size - 1)]
        g_p = p + (1 - p) / 2
        widths = []
        for g in names:
            n = sizes[g]
            if g not in cut:
                widths.append(n)
                continue
            below = int(np.sum(raw[g] <= t))
            widths.append(n - (int(g_p * n) if below == n else below))
        return np.array(widths, np.int64)

    if budget.kind is BudgetKind.FILTERS:
        widths = widths_at(1.0 - budget.ratio)
    else:
        cost = CostModel.build(arch, budget.kind, input_shape)
        target = budget.ratio * cost(cost.full_widths)
        most = 1.0 - 1e-12  # p -> 1: every prunable group at its cap
        if cost(widths_at(most)) > target:
            raise ValueError(
                f"{budget.kind.value} budget {budget.ratio:.4g} is impossible for the threshold "
                f"policy: with every prunable group at its cap the network keeps "
                f"{cost(widths_at(most)) / cost(cost.full_widths):.4g}"
            )
        lo, hi = 0.0, most  # cost(widths_at(hi)) <= target
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if cost(widths_at(mid)) <= target else (mid, hi)
        widths = widths_at(hi)
    return top_keep(raw, names, widths)
