"""Budgets and the widths a selection may choose.

A `Budget` is one value — what is counted (MACs, params or filters) and the fraction kept — built
once (by the caller or the command line) and passed down unchanged. A `CostModel` gives a
network's MACs, params or filter count as a function of its group widths, so a selection probes
thousands of candidate widths without recounting the architecture. `WidthRules` says how narrow
each group may go: rounding, a minimum, ``max_pruning_ratio`` and ``prunable`` (the controls a
global ranking needs so that it cannot empty a layer).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
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
    THRESHOLD = "threshold"  # GFI-AP's released code: one global score threshold, capped


class Ranking(enum.StrEnum):
    """What a global ranking (`adaptive`) orders channels by."""

    SCORE = "score"  # lowest (normalised) score first
    SCORE_PER_COST = "score_per_cost"  # lowest score per unit of cost saved first (knapsack-greedy)


class BudgetKind(enum.StrEnum):
    """What a budget counts."""

    MACS = "macs"
    PARAMS = "params"
    FILTERS = "filters"


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the pruned network may keep: ``ratio`` = the FRACTION KEPT of ``kind``, in (0, 1].

    ``Budget("macs", 0.5)`` keeps half the MACs; ``Budget("filters", 1 - p)`` is GFI-AP's "prune a
    fraction p of the filters". Validated once, here.
    """

    kind: BudgetKind
    ratio: float

    def __post_init__(self):
        try:
            kind = BudgetKind(self.kind)
        except ValueError:
            valid = ", ".join(k.value for k in BudgetKind)
            raise ValueError(f"unknown budget kind {self.kind!r}; valid kinds: {valid}") from None
        object.__setattr__(self, "kind", kind)
        ratio = float(self.ratio)
        if not 0.0 < ratio <= 1.0:  # also refuses NaN
            raise ValueError(
                f"{kind.value}_ratio is the fraction kept and must lie in (0, 1], got {ratio}"
            )
        object.__setattr__(self, "ratio", ratio)

    @classmethod
    def from_ratios(cls, budget: Budget | None = None, **ratios: float | None) -> Budget:
        """The one budget given either as ``budget`` or as exactly one ``<kind>_ratio=`` keyword."""
        given = {k: v for k, v in ratios.items() if v is not None}
        if (budget is not None) + len(given) != 1:
            names = ", ".join(["budget", *ratios])
            raise ValueError(
                f"give exactly one of {names} (the fraction kept); got "
                f"{sorted(given) + (['budget'] if budget is not None else [])}"
            )
        if budget is not None:
            return budget if isinstance(budget, Budget) else cls(*budget)
        ((name, ratio),) = given.items()
        return cls(BudgetKind(name.removesuffix("_ratio")), ratio)

    def __str__(self) -> str:
        return f"{self.ratio:.4g} of the {self.kind.value}"


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
        budget: BudgetKind | Budget,
        input_shape: tuple[int, int, int] | None = None,
    ) -> CostModel:
        kind = budget.kind if isinstance(budget, Budget) else BudgetKind(budget)
        sizes = groups(arch)
        names = tuple(sizes)
        index = {g: i for i, g in enumerate(names)}
        count = layer_macs if kind is BudgetKind.MACS else layer_params
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
            filters_only=kind is BudgetKind.FILTERS,
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

    def channel_costs(self) -> np.ndarray:
        """f64[G]: what removing one channel of each group saves, from the full network.

        Every layer's cost is bilinear in its widths, so this is the first-order saving: a conv
        on 1x1 maps saves 1/64 of what one on 8x8 maps saves.
        """
        full = self.full_widths
        base = self(full)
        return np.array(
            [base - self(full - np.eye(full.size, dtype=np.int64)[g]) for g in range(full.size)]
        )


def check_ratio(name: str, ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} is the fraction kept and must lie in (0, 1], got {ratio}")
    return ratio


def check_scores(arch: Architecture, scores: Scores) -> dict[str, int]:
    """The group sizes, after checking ``scores`` has exactly those groups, shapes, finite values.

    NaN or infinite scores (a diverged run) are refused by every policy: a NaN ranks nowhere.
    """
    sizes = groups(arch)
    unknown = sorted(set(scores) - set(sizes))
    missing = [g for g in sizes if g not in scores]
    if unknown or missing:
        raise ValueError(
            f"scores must have exactly the groups of the architecture; unknown: {unknown}, "
            f"missing: {missing}"
        )
    for g, n in sizes.items():
        values = np.asarray(scores[g])
        if values.shape != (n,):
            raise ValueError(f"group {g!r}: scores have shape {values.shape}, expected ({n},)")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"group {g!r}: scores contain NaN or infinite values")
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


def matching_groups(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` matched by any glob pattern (``fnmatch``: ``*`` also crosses ``/``).

    Raises:
      ValueError: a pattern that matches no group (a typo would silently freeze nothing).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"prunable pattern {pattern!r} matches no group; groups: {', '.join(names)}"
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@dataclasses.dataclass(frozen=True)
class WidthRules:
    """How narrow each group may go (the constraints every policy honours).

    Attributes:
      round_to: every width a multiple of this, or the group's full width.
      min_keep: channels every prunable group keeps at least.
      max_pruning_ratio: no group loses more than this fraction of its channels (None: no cap).
      prunable: glob patterns of the groups that may be cut (None: all); the others keep every
        channel and still count in the budget.
      at_least: ``{group: width}`` absolute floors (a sequential procedure holds its starting
        network's ``max_pruning_ratio`` this way across rounds).
    """

    round_to: int = 1
    min_keep: int = 1
    max_pruning_ratio: float | None = None
    prunable: tuple[str, ...] | None = None
    at_least: Mapping[str, int] | None = None

    def __post_init__(self):
        check_rounding(self.round_to, self.min_keep)
        r = self.max_pruning_ratio
        if r is not None and not 0.0 <= r < 1.0:
            raise ValueError(
                f"max_pruning_ratio is the largest fraction of a group removed, in [0, 1); got {r}"
            )
        if isinstance(self.prunable, str):
            object.__setattr__(self, "prunable", (self.prunable,))
        elif self.prunable is not None:
            object.__setattr__(self, "prunable", tuple(self.prunable))

    def frozen(self, names: Sequence[str]) -> np.ndarray:
        """bool[G]: the groups ``prunable`` leaves whole."""
        if self.prunable is None:
            return np.zeros(len(names), bool)
        cut = set(matching_groups(names, self.prunable))
        return np.array([n not in cut for n in names])

    def floors(self, names: Sequence[str], full: np.ndarray) -> np.ndarray:
        """int[G]: the smallest legal width of each group under every rule."""
        floor = min_widths(full, self.round_to, self.min_keep)
        if self.max_pruning_ratio is not None:
            capped = np.array([math.ceil(n * (1 - self.max_pruning_ratio) - 1e-9) for n in full])
            floor = np.maximum(floor, self.legal(capped, full, floor))
        if self.at_least is not None:
            given = np.array([self.at_least.get(n, 0) for n in names])
            floor = np.maximum(floor, self.legal(np.minimum(given, full), full, floor))
        return np.where(self.frozen(names), full, floor)

    def legal(self, wanted: np.ndarray, full: np.ndarray, floors: np.ndarray) -> np.ndarray:
        """``wanted`` rounded up to ``round_to`` (or full), and at least ``floors``."""
        rounded = np.minimum(-(-np.asarray(wanted) // self.round_to) * self.round_to, full)
        return np.maximum(rounded, floors)

    def binding(self, names: Sequence[str], full: np.ndarray, widths: np.ndarray) -> list[str]:
        """Groups held at a floor that ``max_pruning_ratio`` or ``prunable`` raised."""
        plain = min_widths(full, self.round_to, self.min_keep)
        floors = self.floors(names, full)
        held = (widths <= floors) & (floors > plain)
        return [n for n, h in zip(names, held, strict=True) if h]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["prunable"] = list(self.prunable) if self.prunable is not None else None
        out.pop("at_least")
        return out


def check_reachable(
    arch: Architecture, budget: Budget, rules: WidthRules, input_shape=None
) -> CostModel:
    """The `CostModel` of ``budget``'s kind, after refusing a budget the rules make unreachable.

    Raises:
      ValueError: naming the groups whose floors bind (the cap, the frozen groups) and how far
        the smallest network allowed lies above the budget.
    """
    cost = CostModel.build(arch, budget.kind, input_shape)
    full = cost.full_widths
    floors = rules.floors(cost.group_names, full)
    smallest = cost(floors) / cost(full)
    if smallest > budget.ratio * (1 + 1e-12):
        plain = min_widths(full, rules.round_to, rules.min_keep)
        excess = {
            g: cost(np.where(np.arange(full.size) == i, plain, floors)) - cost(floors)
            for i, g in enumerate(cost.group_names)
            if floors[i] > plain[i]
        }
        binding = sorted(excess, key=excess.get)[:8]
        why = f"min_keep={rules.min_keep} and round_to={rules.round_to}"
        if binding:
            why += (
                f", max_pruning_ratio={rules.max_pruning_ratio} and prunable="
                f"{list(rules.prunable) if rules.prunable is not None else None} (binding groups: "
                f"{', '.join(binding)}{', ...' if len(excess) > 8 else ''})"
            )
        raise ValueError(
            f"{budget.kind.value} budget {budget.ratio:.4g} is impossible: with {why} the "
            f"smallest network keeps {smallest:.4g} of them"
        )
    return cost


def top_keep(scores: dict[str, np.ndarray], names: Sequence[str], widths: np.ndarray) -> Keep:
    """Per group, the increasing indices of the ``width`` highest-scored channels (stable)."""
    keep = {}
    for g, width in zip(names, widths, strict=True):
        order = np.argsort(scores[g], kind="stable")  # ascending; ties: lower index first
        keep[g] = np.sort(order[order.size - int(width) :])
    return keep
