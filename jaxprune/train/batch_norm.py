"""Re-estimating BatchNorm's running statistics after the network changed (e.g. was pruned).

Cutting channels changes what every later BatchNorm sees, so the running statistics saved with
the unpruned network no longer match; a few train-mode forward passes, no gradient, replace them
with the pruned network's own. It is nearly free and recovers much of the accuracy lost at the
cut before any fine-tuning (measured in ``experiments/RESULTS.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture
from jaxprune.models.common import BATCH_NORM_MOMENTUM


@functools.partial(jax.jit, static_argnames=("arch",))
def _batch_moments(arch: Architecture, variables: Any, images: jax.Array) -> Any:
    """Every BatchNorm's batch mean and (biased) variance on ``images``, f32[C] each.

    Train-mode BatchNorm updates ``running = m * running + (1 - m) * batch``; from zero running
    statistics the update is ``(1 - m) * batch``.
    """
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, updated = arch.module().apply(
        {**variables, "batch_stats": zeros}, images, True, mutable=["batch_stats"]
    )
    return jax.tree.map(lambda s: s / (1.0 - BATCH_NORM_MOMENTUM), updated["batch_stats"])


def recalibrate_batch_norm(arch: Architecture, variables: Any, images: Iterable[jax.Array]) -> Any:
    """``variables`` with every BatchNorm's running mean and variance re-estimated on ``images``.

    The new statistics are the mean over batches of each batch's mean and variance (the
    cumulative average PyTorch uses with ``momentum=None``), measured layer after layer as the
    network runs in train mode. Parameters are unchanged.

    Args:
      arch: the architecture.
      variables: ``{"params", "batch_stats"}``; returned as is if it has no ``batch_stats``.
      images: batches f32[N, H, W, C] (no augmentation needed).

    Returns:
      The variables with new ``batch_stats``.
    """
    if not variables.get("batch_stats"):
        return variables
    total, count = None, 0
    for batch in images:
        moments = _batch_moments(arch, variables, jnp.asarray(batch))
        total = moments if total is None else jax.tree.map(jnp.add, total, moments)
        count += 1
    if count == 0:
        raise ValueError("recalibrate_batch_norm needs at least one batch")
    return {**variables, "batch_stats": jax.tree.map(lambda s: s / count, total)}
