"""FSABP's filter similarity coefficient (Geng & Niu 2022): distance to the nearest other filter.

    coefficient_i = min_{j != i} d(F_i, F_j)          (over the filters of one group)

so a filter that another filter of its group duplicates scores 0 and goes first. ``F_i`` is, with
``mode="weights"``, the flattened kernel of filter i plus its bias where the layer has one (for a
ResNet stage group: concatenated over every producer conv, see `filters`), dense groups included;
with ``mode="features"``, its output map (before BatchNorm) over all positions of all images of
the given batches. All pairwise distances of a group come from one Gram matrix ``G = F F^T``
(accumulated batch by batch for features), never a loop over filters:

    euclidean: d_ij = sqrt(G_ii + G_jj - 2 G_ij)       (features: divided by the positions count,
                                                         i.e. a root-mean-square difference)
    cosine:    d_ij = 1 - G_ij / sqrt(G_ii G_jj)       (scale-free; zero filters get distance 1)

References:
  Geng, Niu. Pruning convolutional neural networks via filter similarity analysis. Machine
  Learning 111, 2022 (FSABP).
"""

import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture, groups
from jaxprune.importance import filters
from jaxprune.importance.gates import Batches, Scores, in_group_order, mean_over_batches


class Mode(enum.StrEnum):
    WEIGHTS = "weights"
    FEATURES = "features"


class Distance(enum.StrEnum):
    EUCLIDEAN = "euclidean"
    COSINE = "cosine"


def fsabp(
    arch: Architecture,
    variables: Any,
    batches: Batches | None = None,
    *,
    mode: Mode | str = Mode.WEIGHTS,
    distance: Distance | str = Distance.EUCLIDEAN,
) -> Scores:
    """Filter similarity coefficient: each filter's distance to the nearest other of its group.

    Args:
      arch: the architecture.
      variables: its variables.
      batches: (images, labels) pairs; used by ``mode="features"`` only.
      mode: ``"weights"`` (kernel + bias) or ``"features"`` (output maps over ``batches``).
      distance: ``"euclidean"`` (default) or ``"cosine"``.

    Returns:
      ``{group: f32[n]}``, higher means keep; a group of one channel scores +inf.

    References:
      Geng & Niu 2022, Pruning convolutional neural networks via filter similarity analysis.
    """
    if Mode(mode) is Mode.WEIGHTS:
        grams = _weight_grams(arch, variables)
    else:
        grams = mean_over_batches(lambda x, y: _feature_grams(arch, variables, x), batches)
    return in_group_order(arch, _nearest(grams, Distance(distance)))


@functools.partial(jax.jit, static_argnames=("distance",))
def _nearest(grams: dict[str, jax.Array], distance: Distance) -> Scores:
    return {g: nearest_distance(gram, distance) for g, gram in grams.items()}


@functools.partial(jax.jit, static_argnames=("arch",))
def _weight_grams(arch: Architecture, variables: Any) -> dict[str, jax.Array]:
    """Group -> f32[n, n] Gram matrix of its filters (kernels and biases)."""
    grams = {}
    for g in groups(arch):
        f = filters.filter_matrix(arch, variables, g, include_bias=True)
        grams[g] = jnp.matmul(f, f.T, precision=jax.lax.Precision.HIGHEST)
    return grams


@functools.partial(jax.jit, static_argnames=("arch",))
def _feature_grams(arch: Architecture, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
    """One batch: group -> f32[n, n] Gram matrix of output maps, per output position."""
    out = {}
    for g, maps in filters.producer_outputs(arch, variables, images).items():
        positions = sum(y.shape[0] * y.shape[1] for y in maps)
        gram = sum(
            jnp.einsum("npc,npd->cd", y, y, precision=jax.lax.Precision.HIGHEST) for y in maps
        )
        out[g] = gram / positions
    return out


def gram_distances(gram: jax.Array, distance: Distance | str = Distance.EUCLIDEAN) -> jax.Array:
    """f32[n, n] pairwise distances of the rows whose Gram matrix is ``gram``."""
    sq = jnp.diagonal(gram)
    if Distance(distance) is Distance.COSINE:
        norms = jnp.sqrt(jnp.maximum(sq, 0.0))
        denom = norms[:, None] * norms[None, :]
        return 1.0 - jnp.where(denom > 0, gram / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0))


def nearest_distance(gram: jax.Array, distance: Distance | str = Distance.EUCLIDEAN) -> jax.Array:
    """f32[n]: each row's distance to the nearest *other* row (+inf when n = 1)."""
    d = gram_distances(gram, distance)
    return jnp.min(jnp.where(jnp.eye(d.shape[0], dtype=bool), jnp.inf, d), axis=1)
