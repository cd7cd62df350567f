"""The oracle: the exact loss increase when one channel alone is removed.

    oracle_c = mean_b ( L_b(gates = 1 - e_c) - L_b(gates = 1) )

``e_c`` the one-hot vector of channel c over all groups; BatchNorm in eval mode, so gating a channel
to zero is exactly removing it (the surgery tests pin that equivalence). Signed: removing a channel
can lower the loss. It is the ground truth the other criteria are judged by (`agreement`).

Cost: one forward pass per channel per batch. The removals of a batch run in one jitted step,
``jax.vmap`` over gate vectors, ``chunk_size`` at a time (`jax.lax.map`) to bound memory.

References:
  Molchanov, Mallya, Tyree, Frosio, Kautz. Importance estimation for neural network pruning.
  CVPR 2019 (the removal "oracle" as ground truth for ranking criteria).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture
from jaxprune.importance.gates import (
    Batches,
    LossFn,
    Scores,
    cross_entropy,
    gate_loss,
    mean_over_batches,
    num_channels,
    unflatten,
)


def oracle(
    arch: Architecture,
    variables: Any,
    batches: Batches | None = None,
    *,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 32,
) -> Scores:
    """Loss increase when each channel alone is gated to zero, averaged over batches.

    Args:
      arch: the architecture.
      variables: its variables; BatchNorm runs in eval mode.
      batches: (images f32[N, H, W, C], labels int[N]) pairs.
      loss_fn: ``(logits, labels) -> scalar`` mean loss; default mean softmax cross-entropy.
      chunk_size: removals evaluated together: memory grows with ``chunk_size * N``.

    Returns:
      ``{group: f32[n]}``, signed; higher means keep.

    References:
      Molchanov et al. 2019, Importance estimation for neural network pruning (CVPR).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    step = functools.partial(
        removal_losses, arch, variables, loss_fn=loss_fn, chunk_size=chunk_size
    )
    return unflatten(arch, mean_over_batches(step, batches))


@functools.partial(jax.jit, static_argnames=("arch", "loss_fn", "chunk_size"))
def removal_losses(
    arch: Architecture,
    variables: Any,
    images: jax.Array,
    labels: jax.Array,
    loss_fn: LossFn,
    chunk_size: int,
) -> jax.Array:
    """One batch: f32[total] loss increases, channels of all groups in forward order."""
    total = num_channels(arch)
    ones = jnp.ones((total,), jnp.float32)

    def loss_without(index):
        gates = unflatten(arch, ones.at[index].set(0.0))
        return gate_loss(arch, variables, gates, images, labels, loss_fn)

    base = gate_loss(arch, variables, unflatten(arch, ones), images, labels, loss_fn)
    removed = jax.lax.map(loss_without, jnp.arange(total), batch_size=min(chunk_size, total))
    return removed - base
