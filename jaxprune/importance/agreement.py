"""How well a criterion ranks channels like a reference (usually the oracle): Spearman's rho."""

import dataclasses
from collections.abc import Mapping

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Spearman rank correlations of scores with a reference.

    Attributes:
      per_group: group -> rho over the group's channels (nan for a group of one channel or of
        constant scores).
      pooled: rho over all channels of all groups together: what a global ranking sees.
    """

    per_group: dict[str, float]
    pooled: float


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two 1-D arrays (ties get their average rank); nan if undefined."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(a, b).statistic)


def agreement(scores: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Agreement:
    """Spearman's rho of ``scores`` against ``reference``, per group and pooled over the network.

    Args:
      scores: ``{group: f[n]}`` from a criterion.
      reference: ``{group: f[n]}`` with the same groups and shapes (e.g. ``oracle``, or its
        absolute value for criteria that rank by magnitude).

    Returns:
      `Agreement`. The pooled value compares raw scores across groups, so it is only meaningful for
      criteria on one global scale (or after the normalisation a global selection would use).
    """
    if set(scores) != set(reference):
        raise ValueError(f"groups differ: {sorted(scores)} and {sorted(reference)}")
    order = list(reference)
    per_group = {g: spearman(scores[g], reference[g]) for g in order}
    pooled = spearman(
        np.concatenate([np.asarray(scores[g]).ravel() for g in order]),
        np.concatenate([np.asarray(reference[g]).ravel() for g in order]),
    )
    return Agreement(per_group, pooled)
