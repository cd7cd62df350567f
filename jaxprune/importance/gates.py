"""Gate machinery shared by the data-driven criteria: the loss in the gates and its derivatives.

Every model takes ``gates={group: f32[n]}`` that multiply a group's channels after BatchNorm (after
conv + bias for LeNet), before the ReLU. At ``gates = 1`` the network is unchanged, so derivatives
of the loss with respect to the gates at one are the sensitivities of the loss to each channel:

    dL/dgate_c = sum over (n, h, w) of z_c * dL/dz_c          (z: the tensor the gate multiplies)

which is also what Taylor-FO-BN (Molchanov et al. 2019) computes from BatchNorm's scale and shift.
For a ResNet stage group the one gate multiplies every tensor the group ties, so its derivative sums
the contributions of all of them: the derivative of removing the whole residual channel.

Only the gates are differentiated, never the weights: on XLA:CPU the weight-gradient convolution is
what makes a full backward pass slow (ResNet-56, 10 batches of 128, on a 2-core x86-64 in
November 2026: 5.5 s with respect to the gates against 16 s with the weights too).

Batches are iterated in Python around one jitted per-batch step: on a 2-core CPU (ResNet-20, 5
batches of 64) that was several times faster than a rolled ``lax.scan`` over stacked batches. The
same Python loop also runs inside an outer ``jax.jit`` (unrolled there), so every criterion stays
jittable.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.graph import Architecture, groups

Scores = dict[str, jax.Array]
Batch = tuple[Any, Any]
Batches = Iterable[Batch]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of f32[N, K] logits against int[N] labels (the default loss)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def ones_gates(arch: Architecture) -> dict[str, jax.Array]:
    """``{group: ones f32[n]}``: the gates at which the network is unchanged."""
    return {g: jnp.ones((n,), jnp.float32) for g, n in groups(arch).items()}


def num_channels(arch: Architecture) -> int:
    """Total channels over all groups (the length of a flat gate vector)."""
    return sum(groups(arch).values())


def unflatten(arch: Architecture, flat: jax.Array) -> dict[str, jax.Array]:
    """Splits a flat f32[total] vector (groups in forward order) into ``{group: f32[n]}``."""
    sizes = groups(arch)
    offsets = np.cumsum([0, *sizes.values()])
    return {g: flat[offsets[i] : offsets[i + 1]] for i, g in enumerate(sizes)}


def flatten(arch: Architecture, scores: dict[str, jax.Array]) -> jax.Array:
    """Inverse of `unflatten`."""
    return jnp.concatenate([jnp.asarray(scores[g]) for g in groups(arch)])


def in_group_order(arch: Architecture, scores: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``scores`` with its keys in forward group order (jit returns dicts with sorted keys)."""
    return {g: scores[g] for g in groups(arch)}


def gate_loss(
    arch: Architecture,
    variables: Any,
    gates: dict[str, jax.Array],
    images: jax.Array,
    labels: jax.Array,
    loss_fn: LossFn,
) -> jax.Array:
    """The loss of the gated network, BatchNorm in eval mode."""
    logits = arch.module().apply(variables, images, train=False, gates=gates)
    return loss_fn(logits, labels)


@functools.partial(jax.jit, static_argnames=("arch", "loss_fn"))
def gate_gradients(
    arch: Architecture, variables: Any, images: jax.Array, labels: jax.Array, loss_fn: LossFn
) -> dict[str, jax.Array]:
    """dL/dgates at gates = 1 for one batch: ``{group: f32[n]}`` (L: the batch's loss)."""
    loss = functools.partial(
        gate_loss, arch, variables, images=images, labels=labels, loss_fn=loss_fn
    )
    return jax.grad(loss)(ones_gates(arch))


@functools.partial(jax.jit, static_argnames=("arch", "loss_fn"))
def per_example_gate_gradients(
    arch: Architecture, variables: Any, images: jax.Array, labels: jax.Array, loss_fn: LossFn
) -> dict[str, jax.Array]:
    """dl_i/dgates at gates = 1 for every example i: ``{group: f32[N, n]}``.

    ``jax.vmap`` over examples of the gradient of the one-example loss; with the weights not
    differentiated this costs about what `gate_gradients` costs (the per-example sums over
    (h, w) replace one sum over (n, h, w)).
    """

    def one(image, label):
        loss = functools.partial(
            gate_loss, arch, variables, images=image[None], labels=label[None], loss_fn=loss_fn
        )
        return jax.grad(loss)(ones_gates(arch))

    return jax.vmap(one)(images, labels)


def mean_over_batches(step: Callable[[Any, Any], Any], batches: Batches) -> Any:
    """Mean over ``batches`` of ``step(images, labels)`` (a pytree): the mean of per-batch values.

    Raises:
      ValueError: when ``batches`` is empty (or None).
    """
    if batches is None:
        raise ValueError("this criterion needs batches: a sequence of (images, labels) pairs")
    total, count = None, 0
    for batch in batches:
        images, labels = batch[0], batch[1]
        value = step(jnp.asarray(images), jnp.asarray(labels))
        total = value if total is None else jax.tree.map(jnp.add, total, value)
        count += 1
    if count == 0:
        raise ValueError("batches is empty: give at least one (images, labels) pair")
    return jax.tree.map(lambda t: t / count, total)
