"""The criteria GFI-AP and FSABP are judged against: Taylor-FO-BN, filter norms, FPGM, random.

Weight-based criteria read a group's filters through `filters.filter_matrix`: for a ResNet stage
group the filter of a residual channel is the concatenation of that channel's filters in every
producer conv (stem or projection, and the last conv of each block), i.e. the weights removed with
it. Their values are per-layer quantities (a norm depends on the fan-in), not one global scale:
normalise them per group before a global ranking (``jaxprune.select.adaptive(normalize=...)``;
defaults in ``jaxprune.methods.METHODS``).
"""

import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture, groups
from jaxprune.importance.filters import filter_matrix
from jaxprune.importance.fsabp import gram_distances
from jaxprune.importance.gates import (
    Batches,
    LossFn,
    Scores,
    cross_entropy,
    gate_gradients,
    in_group_order,
    mean_over_batches,
    num_channels,
    unflatten,
)


def taylor_fo_bn(
    arch: Architecture,
    variables: Any,
    batches: Batches | None = None,
    *,
    loss_fn: LossFn = cross_entropy,
) -> Scores:
    """Taylor-FO-BN: the squared gate gradient, averaged over minibatches.

    ``score_c = mean_b (dL_b/dgate_c)^2 = mean_b (sum_{n,h,w} z_c dL_b/dz_c)^2``, z the BN
    output (for LeNet, which has no BN, the conv output). Behind BN this equals the paper's
    ``(gamma dL/dgamma + beta dL/dbeta)^2``. For a ResNet stage group the one gate sums the
    contributions of every tied BN before squaring (the paper sums squared per-layer scores).

    Args:
      arch: the architecture.
      variables: its variables; BatchNorm runs in eval mode.
      batches: (images, labels) pairs.
      loss_fn: ``(logits, labels) -> scalar`` mean loss.

    Returns:
      ``{group: f32[n]}``, higher means keep.

    References:
      Molchanov, Mallya, Tyree, Frosio, Kautz. Importance estimation for neural network pruning.
      CVPR 2019.
    """
    return in_group_order(
        arch,
        mean_over_batches(
            lambda x, y: jax.tree.map(jnp.square, gate_gradients(arch, variables, x, y, loss_fn)),
            batches,
        ),
    )


def l1(arch: Architecture, variables: Any, batches: Batches | None = None) -> Scores:
    """Sum of absolute kernel weights of each filter (biases excluded); ``batches`` unused.

    References:
      Li, Kadav, Durdanovic, Samet, Graf. Pruning filters for efficient ConvNets. ICLR 2017.
    """
    del batches
    return in_group_order(arch, _norms(arch, variables, 1))


def l2(arch: Architecture, variables: Any, batches: Batches | None = None) -> Scores:
    """Euclidean norm of each filter's kernel weights (biases excluded); ``batches`` unused.

    References:
      Li et al. 2017 (ICLR), who report L2 ranks filters like L1.
    """
    del batches
    return in_group_order(arch, _norms(arch, variables, 2))


@functools.partial(jax.jit, static_argnames=("arch", "ord"))
def _norms(arch: Architecture, variables: Any, ord: int) -> Scores:
    return {
        g: jnp.linalg.norm(filter_matrix(arch, variables, g), ord, axis=1) for g in groups(arch)
    }


class FPGMCenter(enum.StrEnum):
    MEDIAN = "median"  # distance to the geometric median (the paper's definition)
    SUM_OF_DISTANCES = "sum_of_distances"  # sum of distances to all filters (the authors' code)


def fpgm(
    arch: Architecture,
    variables: Any,
    batches: Batches | None = None,
    *,
    center: FPGMCenter | str = FPGMCenter.MEDIAN,
    iterations: int = 64,
) -> Scores:
    """Filter Pruning via Geometric Median: filters near the group's median are redundant.

    ``center="median"``: ``score_i = ||F_i - GM||`` with GM the geometric median of the group's
    filters (kernel weights, biases excluded), found by ``iterations`` Weiszfeld steps under
    `jax.lax.fori_loop`. ``center="sum_of_distances"``: ``score_i = sum_j ||F_i - F_j||``, which
    is what the authors' released code ranks by (the objective the median minimises).

    Args:
      arch: the architecture.
      variables: its variables.
      batches: unused.
      center: see above.
      iterations: Weiszfeld iterations.

    Returns:
      ``{group: f32[n]}``, higher means keep.

    References:
      He, Liu, Wang, Hu, Yang. Filter pruning via geometric median for deep convolutional neural
      networks acceleration. CVPR 2019.
    """
    del batches
    return in_group_order(arch, _fpgm(arch, variables, FPGMCenter(center), iterations))


@functools.partial(jax.jit, static_argnames=("arch", "center", "iterations"))
def _fpgm(arch: Architecture, variables: Any, center: FPGMCenter, iterations: int) -> Scores:
    out = {}
    for g in groups(arch):
        filters = filter_matrix(arch, variables, g)
        if center is FPGMCenter.MEDIAN:
            median = geometric_median(filters, iterations)
            out[g] = jnp.linalg.norm(filters - median, axis=1)
        else:
            gram = jnp.matmul(filters, filters.T, precision=jax.lax.Precision.HIGHEST)
            out[g] = gram_distances(gram).sum(axis=1)
    return out


def geometric_median(points: jax.Array, iterations: int = 64, eps: float = 1e-8) -> jax.Array:
    """Weiszfeld's iteration for the point minimising the sum of distances to f32[n, d] points."""

    def step(_, median):
        weights = 1.0 / jnp.maximum(jnp.linalg.norm(points - median, axis=1), eps)
        return weights @ points / weights.sum()

    return jax.lax.fori_loop(0, iterations, step, points.mean(axis=0))


def random(
    arch: Architecture, variables: Any = None, batches: Batches | None = None, *, seed: int = 0
) -> Scores:
    """Uniform random scores in [0, 1), seeded: the floor any criterion must beat.

    References:
      Mittal, Bhardwaj, Khapra, Ravindran. Recovering from random pruning: on the plasticity of
      deep convolutional neural networks. WACV 2018.
    """
    del variables, batches
    return in_group_order(arch, _random(arch, seed))


def _random(arch: Architecture, seed: int) -> Scores:
    values = jax.random.uniform(jax.random.key(seed), (num_channels(arch),), jnp.float32)
    return unflatten(arch, values)
