"""Budgets and one-shot selection: `adaptive` (GFI-AP's global ranking) and `uniform`.

A `CostModel` gives a network's MACs, params or filter count as a function of its group widths, so
a selection probes thousands of candidate widths without recounting the architecture.
"""

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxprune.flops import layer_macs, layer_params
from jaxprune.graph import Architecture, groups

Scores = Mapping[str, Any]
Keep = dict[str, np.ndarray]


class Normalize(enum.StrEnum):
    """Per-group rescaling of scores before a global ranking."""

    L2 = "l2"  # s / ||s||_2, as Molchanov et al. 2017 put layers on one scale
    MAX = "max"  # s / max |s|
    MEAN = "mean"  # s / mean |s|
    RANK = "rank"  # (rank + 1) / n in (0, 1]: ranks only, sizes ignored


class Policy(enum.StrEnum):
    """How a budget is shared among groups."""

    ADAPTIVE = "adaptive"  # one global ranking (GFI-AP): non-uniform widths
    UNIFORM = "uniform"  # the same fraction of every group


class Budget(enum.StrEnum):
    MACS = "macs"
    PARAMS = "params"
    FILTERS = "filters"


def normalize_scores(scores: Scores, normalize: Normalize | str | None) -> dict[str, np.ndarray]:
    """``scores`` as float64 numpy arrays, each group rescaled by ``normalize`` (None: as is)."""
    out = {g: np.asarray(s, np.float64).ravel() for g, s in scores.items()}
    if normalize is None:
        return out
    rule = _NORMALIZERS[Normalize(normalize)]
    return {g: rule(s) for g, s in out.items()}


def _safe_divide(s: np.ndarray, scale: float) -> np.ndarray:
    return s / scale if scale > 0 else s


_NORMALIZERS: dict[Normalize, Callable[[np.ndarray], np.ndarray]] = {
    Normalize.L2: lambda s: _safe_divide(s, float(np.linalg.norm(s))),
    Normalize.MAX: lambda s: _safe_divide(s, float(np.abs(s).max())),
    Normalize.MEAN: lambda s: _safe_divide(s, float(np.abs(s).mean())),
    Normalize.RANK: lambda s: (np.argsort(np.argsort(s, kind="stable")) + 1.0) / s.size,
}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """A network's MACs, params or filter count as a function of its group widths.

    Every layer's cost is bilinear in its (input, output) channels: a*in*out + b*out + c*in + d.
    The coefficients are read off `jaxprune.flops` itself, so counting lives in one place.
    Evaluating new widths costs O(layers) in numpy, never a recount of the architecture.
    """

    group_names: tuple[str, ...]
    full_widths: np.ndarray  # int[G]
    in_index: np.ndarray  # int[L], -1: fixed channel count
    out_index: np.ndarray
    fixed_in: np.ndarray  # f64[L]
    fixed_out: np.ndarray
    coef: np.ndarray  # f64[L, 4]: a, b, c, d
    filters_only: bool

    @classmethod
    def build(
        cls,
        arch: Architecture,
        budget: Budget,
        input_shape: tuple[int, int, int] | None = None,
    ) -> "CostModel":
        sizes = groups(arch)
        names = tuple(sizes)
        index = {g: i for i, g in enumerate(names)}
        count = layer_macs if budget is Budget.MACS else layer_params
        layers = [layer for layer in arch.layers(input_shape)]
        coef = np.zeros((len(layers), 4))
        for i, layer in enumerate(layers):
            f = {
                (cin, cout): count(dataclasses.replace(layer, in_channels=cin, out_channels=cout))
                for cin in (0, 1)
                for cout in (0, 1)
            }
            d = f[0, 0]
            coef[i] = (f[1, 1] - f[1, 0] - f[0, 1] + d, f[0, 1] - d, f[1, 0] - d, d)
        return cls(
            group_names=names,
            full_widths=np.array([sizes[g] for g in names], np.int64),
            in_index=np.array([index.get(layer.in_group, -1) for layer in layers], np.int64),
            out_index=np.array([index.get(layer.out_group, -1) for layer in layers], np.int64),
            fixed_in=np.array([layer.in_channels for layer in layers], np.float64),
            fixed_out=np.array([layer.out_channels for layer in layers], np.float64),
            coef=coef,
            filters_only=budget is Budget.FILTERS,
        )

    def __call__(self, widths: np.ndarray) -> float:
        """Cost of the network with ``widths`` (int[G], groups in forward order)."""
        widths = np.asarray(widths, np.float64)
        if self.filters_only:
            return float(widths.sum())
        cin = np.where(self.in_index >= 0, widths[self.in_index], self.fixed_in)
        cout = np.where(self.out_index >= 0, widths[self.out_index], self.fixed_out)
        a, b, c, d = self.coef.T
        return float(np.sum(a * cin * cout + b * cout + c * cin + d))


def check_ratio(name: str, ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} is the fraction kept and must lie in (0, 1], got {ratio}")
    return ratio


def _check_scores(arch: Architecture, scores: Scores) -> dict[str, int]:
    sizes = groups(arch)
    unknown = sorted(set(scores) - set(sizes))
    missing = [g for g in sizes if g not in scores]
    if unknown or missing:
        raise ValueError(
            f"scores must have exactly the groups of the architecture; unknown: {unknown}, "
            f"missing: {missing}"
        )
    for g, n in sizes.items():
        shape = np.shape(scores[g])
        if shape != (n,):
            raise ValueError(f"group {g!r}: scores have shape {shape}, expected ({n},)")
    return sizes


def check_rounding(round_to: int, min_keep: int) -> None:
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    if int(min_keep) != min_keep or min_keep < 1:
        raise ValueError(f"min_keep must be a positive integer, got {min_keep}")


def min_widths(full_widths: np.ndarray, round_to: int = 1, min_keep: int = 1) -> np.ndarray:
    """Smallest legal width of each group: ``min_keep`` rounded up to ``round_to``, or full."""
    floor = -(-min_keep // round_to) * round_to
    return np.minimum(full_widths, floor)


def legal_widths(
    wanted: np.ndarray, full_widths: np.ndarray, round_to: int = 1, min_keep: int = 1
) -> np.ndarray:
    """``wanted`` rounded *up* to a multiple of ``round_to`` (or full), at least the minimum."""
    rounded = np.minimum(-(-wanted // round_to) * round_to, full_widths)
    return np.maximum(rounded, min_widths(full_widths, round_to, min_keep))


def one_budget(**ratios: float | None) -> tuple[Budget, float]:
    given = {k: v for k, v in ratios.items() if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of {', '.join(ratios)} (the fraction kept); got {sorted(given)}"
        )
    ((name, ratio),) = given.items()
    return Budget(name.removesuffix("_ratio")), check_ratio(name, ratio)


def _top_keep(scores: dict[str, np.ndarray], names: tuple[str, ...], widths: np.ndarray) -> Keep:
    """Per group, the increasing indices of the ``width`` highest-scored channels (stable)."""
    keep = {}
    for g, width in zip(names, widths, strict=True):
        order = np.argsort(scores[g], kind="stable")  # ascending; ties: lower index first
        keep[g] = np.sort(order[order.size - int(width) :])
    return keep


def _remove_lowest_first(
    cost: CostModel,
    ordered_groups: np.ndarray,
    budget: float,
    floor: float,
    round_to: int,
    min_keep: int,
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
        return legal_widths(full - removed, full, round_to, min_keep)

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
        trial[g] = legal_widths(widths[g] + 1, full[g], round_to, min_keep)
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
) -> Keep:
    """GFI-AP's adaptive pruning: one global ranking, lowest channels removed first.

    All channels of all groups are sorted by (normalised) score and removed lowest first until the
    network is at or under the budget. Widths are rounded up to a multiple of ``round_to`` (or stay
    full) and never fall below ``min_keep``: a group at its minimum is skipped while removal goes
    on elsewhere. To land close to the budget, a removal that would take the network more than
    ``tolerance`` under it (a whole rounded unit, or one channel of an expensive early conv: 14% of
    LeNet-5's MACs) is skipped and removal goes on down the ranking. Widths come out non-uniform
    whenever scores differ between groups. Each probe evaluates the `CostModel` in O(layers):
    ResNet-50 (11,456 channels) takes milliseconds.

    Args:
      arch: the architecture the scores belong to.
      scores: ``{group: f[n]}`` for every group; higher means keep.
      input_shape: (H, W, C) for counting MACs; default the architecture's.
      macs_ratio: fraction of the MACs kept, in (0, 1].
      params_ratio: fraction of the parameters kept.
      filters_ratio: fraction of all channels kept (``1 - p`` for GFI-AP's pruning fraction p).
      round_to: every width a multiple of this, or the group's full width.
      min_keep: channels every group keeps at least.
      normalize: per-group rescaling before the global ranking (see
        ``jaxprune.importance.DEFAULT_NORMALIZE`` for each criterion's); None: scores as given.
      tolerance: how far under the budget the result may land, as a fraction of the full cost
        (for MACs and params; a filters budget lands exactly). ``1.0``: strict lowest-first
        order, whatever the overshoot.

    Returns:
      ``{group: int64[k]}`` increasing indices for every group.

    Raises:
      ValueError: before any work, for not exactly one ratio, a ratio outside (0, 1], bad
        ``round_to``/``min_keep``, scores whose groups or shapes do not match, or a budget below
        the cost of the smallest network ``min_keep`` and ``round_to`` allow.

    References:
      Mondal et al. 2022 (GFI-AP), Computer Vision and Image Understanding.
    """
    budget_kind, ratio = one_budget(
        macs_ratio=macs_ratio, params_ratio=params_ratio, filters_ratio=filters_ratio
    )
    check_rounding(round_to, min_keep)
    _check_scores(arch, scores)
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance is a fraction of the full cost in [0, 1], got {tolerance}")
    cost = CostModel.build(arch, budget_kind, input_shape)
    full = cost.full_widths
    budget = ratio * cost(full)
    smallest = cost(min_widths(full, round_to, min_keep))
    if smallest > budget * (1 + 1e-12):
        raise ValueError(
            f"{budget_kind} budget {ratio:.4g} is impossible: with min_keep={min_keep} and "
            f"round_to={round_to} the smallest network keeps {smallest / cost(full):.4g} of them"
        )

    names = cost.group_names
    normalized = normalize_scores(scores, normalize)
    flat = np.concatenate([normalized[g] for g in names])
    if not np.all(np.isfinite(flat)):
        raise ValueError("scores contain NaN or infinite values")
    group_of = np.repeat(np.arange(len(names)), full)
    order = np.argsort(flat, kind="stable")
    widths = _remove_lowest_first(
        cost, group_of[order], budget, budget - tolerance * cost(full), round_to, min_keep
    )
    return _top_keep(normalized, names, widths)


def uniform(
    arch: Architecture,
    scores: Scores,
    ratio: float | None = None,
    round_to: int = 1,
    min_keep: int = 1,
    *,
    macs_ratio: float | None = None,
    params_ratio: float | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> Keep:
    """The same fraction kept in every group: the baseline GFI-AP's adaptive widths beat.

    With ``ratio``, each group keeps its ``round(ratio * n)`` best channels, rounded to the nearest
    multiple of ``round_to`` (or full), at least ``min_keep``. With ``macs_ratio`` or
    ``params_ratio`` instead, the per-group fraction is the largest (found by bisection) whose
    network keeps at most that fraction of the MACs or params, so uniform and `adaptive` can be
    compared at the same cost.

    Args:
      arch: the architecture.
      scores: ``{group: f[n]}`` for every group; higher means keep.
      ratio: fraction kept per group, in (0, 1].
      round_to: widths a multiple of this, or full.
      min_keep: channels every group keeps at least.
      macs_ratio: fraction of the network's MACs kept, in (0, 1] (instead of ``ratio``).
      params_ratio: fraction of the network's params kept (instead of ``ratio``).
      input_shape: (H, W, C) for counting MACs; default the architecture's.

    Returns:
      ``{group: int64[k]}`` increasing indices for every group.

    Raises:
      ValueError: before any work, for not exactly one of the ratios, a ratio outside (0, 1], bad
        ``round_to``/``min_keep``, or a budget below what ``min_keep``/``round_to`` allow.
    """
    given = {"ratio": ratio, "macs_ratio": macs_ratio, "params_ratio": params_ratio}
    if sum(v is not None for v in given.values()) != 1:
        raise ValueError(f"give exactly one of {', '.join(given)}")
    check_rounding(round_to, min_keep)
    sizes = _check_scores(arch, scores)
    names = tuple(sizes)
    full = np.array([sizes[g] for g in names], np.int64)

    def widths_at(fraction: float) -> np.ndarray:
        nearest = np.floor(fraction * full / round_to + 0.5).astype(np.int64) * round_to
        return legal_widths(nearest, full, round_to, min_keep)

    if ratio is not None:
        widths = widths_at(check_ratio("ratio", ratio))
    else:
        kind = Budget.MACS if macs_ratio is not None else Budget.PARAMS
        target = check_ratio(
            f"{kind}_ratio", macs_ratio if macs_ratio is not None else params_ratio
        )
        cost = CostModel.build(arch, kind, input_shape)
        budget = target * cost(full)
        if cost(widths_at(0.0)) > budget * (1 + 1e-12):
            raise ValueError(
                f"{kind} budget {target:.4g} is impossible for uniform widths with "
                f"min_keep={min_keep} and round_to={round_to}"
            )
        lo, hi = 0.0, 1.0  # cost(widths_at(lo)) <= budget always holds
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(widths_at(mid)) <= budget else (lo, mid)
        widths = widths_at(lo)
    return _top_keep(normalize_scores(scores, None), names, widths)
