"""GFI-AP's global filter importance (Mondal et al. 2022), one scale across the whole network.

Default (``signal="gradient"``, ``order=1``): with ``g_b = dL_b/dgates`` at gates = 1 for batch b
(``L_b`` its mean loss; see `jaxprune.importance.gates`),

    accumulate="batch":    GFI_c = mean_b |g_b,c|
    accumulate="example":  GFI_c = mean_b mean_{i in b} |dl_i/dgate_c|       (jax.vmap over i)

``order=2`` is the second-order Taylor estimate of the loss increase when channel c alone is
removed (its gate taken from 1 to 0), with the exact diagonal of the Hessian in the gates
(computed as `jaxprune.importance.hessian` explains, at a fraction of the oracle's cost):

    GFI2_c = mean_b ( -g_b,c + 1/2 * d^2 L_b / dgate_c^2 )        (signed: may be negative)

``signal="activation"`` is the score of the authors' released code: with ``y_l`` the output of
producer conv l before BatchNorm, ``M_l,k = mean over the images of class k of y_l`` (f[H, W, n]),

    A_c = max_k  mean_{l in producers}  mean_{h,w} |M_l,k[h, w, c]|

Training-time accumulation (the paper scores how the network learns): the train step
differentiates its loss with respect to ``(params, gates)`` with ``gates = ones_gates(arch)`` in
the same backward pass and hands the gate part to a running accumulator:

    state = gfi_accumulator_init(arch)                  # once, outside the train step
    (loss, aux), (param_grads, gate_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, ones_gates(arch), ...)
    state = gfi_accumulator_update(state, gate_grads)   # inside the jitted step, O(channels)
    scores = gfi_accumulator_scores(state)              # mean over steps of |g_step|

References:
  Mondal, Das, Dutta Roy, Singh, Lall, Joshi. Adaptive CNN filter pruning using global importance
  metric. Computer Vision and Image Understanding 222, 2022 (GFI-AP); code:
  github.com/miltonmondal/GFI-AP.
"""

import dataclasses
import enum
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.graph import Architecture, groups
from jaxprune.importance import filters
from jaxprune.importance.gates import (
    Batches,
    LossFn,
    Scores,
    cross_entropy,
    gate_gradients,
    in_group_order,
    mean_over_batches,
    per_example_gate_gradients,
    unflatten,
)
from jaxprune.importance.hessian import Diagonal, second_order_step


class Signal(enum.StrEnum):
    GRADIENT = "gradient"  # gate gradients (jax.grad with respect to per-channel gates)
    ACTIVATION = "activation"  # class-wise mean activations (the authors' released code)


class BatchNormMode(enum.StrEnum):
    EVAL = "eval"  # running statistics
    TRAIN = "train"  # each batch's own statistics


class Accumulate(enum.StrEnum):
    BATCH = "batch"  # |gradient of each batch's mean loss|
    EXAMPLE = "example"  # |gradient of each example's loss|, averaged


def gfi(
    arch: Architecture,
    variables: Any,
    batches: Batches | None = None,
    *,
    signal: Signal | str = Signal.GRADIENT,
    order: int = 1,
    accumulate: Accumulate | str = Accumulate.EXAMPLE,
    loss_fn: LossFn = cross_entropy,
    chunk_size: int = 64,
    diagonal: Diagonal | str = Diagonal.STRUCTURED,
    batch_norm: BatchNormMode | str = "eval",
) -> Scores:
    """Global filter importance of every channel; higher means keep (formulas: module docstring).

    Args:
      arch: the architecture.
      variables: its variables; BatchNorm runs in eval mode.
      batches: (images f32[N, H, W, C], labels int[N]) pairs.
      signal: ``"gradient"`` (gate gradients) or ``"activation"`` (the authors' code).
      order: 1 (gradient magnitude) or 2 (signed second-order loss increase); gradient signal only.
      accumulate: per-``"example"`` (default: ranks closer to the oracle) or per-``"batch"``
        gradient magnitudes; order 1 only (order 2 is linear in the loss, so the two agree).
      loss_fn: ``(logits, labels) -> scalar`` mean loss; default mean softmax cross-entropy.
      chunk_size: order 2: Hessian-diagonal entries computed together (bounds memory).
      diagonal: order 2: ``"structured"`` (default, fast) or ``"forward_over_reverse"`` (one
        Hessian-vector product per channel: the slow reference); both exact.
      batch_norm: activation signal: BatchNorm in ``"eval"`` mode (running statistics) or
        ``"train"`` mode (each batch's own statistics, as the authors' code scores).

    Returns:
      ``{group: f32[n]}`` with the keys of ``jp.groups(arch)``.

    References:
      Mondal et al. 2022 (GFI-AP), Computer Vision and Image Understanding.
    """
    signal, accumulate = Signal(signal), Accumulate(accumulate)
    batch_norm = BatchNormMode(batch_norm)
    if batch_norm is BatchNormMode.TRAIN and signal is not Signal.ACTIVATION:
        raise ValueError("batch_norm='train' applies to signal='activation' only")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if order == 2 and signal is Signal.ACTIVATION:
        raise ValueError("order=2 needs signal='gradient' (activations have no Taylor expansion)")
    if signal is Signal.ACTIVATION:
        train = batch_norm is BatchNormMode.TRAIN
        return in_group_order(arch, _activation_scores(arch, variables, batches, train))
    if order == 2:
        step = functools.partial(
            second_order_step,
            arch,
            variables,
            loss_fn=loss_fn,
            chunk_size=chunk_size,
            diagonal=Diagonal(diagonal),
        )
        return unflatten(arch, mean_over_batches(step, batches))
    if accumulate is Accumulate.EXAMPLE:

        def step(x, y):
            return _mean_abs(per_example_gate_gradients(arch, variables, x, y, loss_fn))
    else:

        def step(x, y):
            return jax.tree.map(jnp.abs, gate_gradients(arch, variables, x, y, loss_fn))

    return in_group_order(arch, mean_over_batches(step, batches))


@jax.jit
def _mean_abs(per_example: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda g: jnp.abs(g).mean(axis=0), per_example)


@functools.partial(jax.jit, static_argnames=("arch", "train"))
def _class_sums(
    arch: Architecture, variables: Any, images: jax.Array, labels: jax.Array, train: bool
) -> tuple[dict[str, list[jax.Array]], jax.Array]:
    """Per-class sums of every producer's output: group -> [f32[K, P, n]], and counts f32[K]."""
    onehot = jax.nn.one_hot(labels, arch.num_classes, dtype=jnp.float32)
    outputs = filters.producer_outputs(arch, variables, images, train)
    sums = {g: [jnp.einsum("nk,npc->kpc", onehot, y) for y in maps] for g, maps in outputs.items()}
    return sums, onehot.sum(axis=0)


def _activation_scores(
    arch: Architecture, variables: Any, batches: Batches | None, train: bool
) -> Scores:
    # The mean over batches of per-batch sums, divided by the mean of per-batch counts, is the
    # mean over all of a class's images, as the authors' code computes it.
    sums, counts = mean_over_batches(
        lambda x, y: _class_sums(arch, variables, x, y.astype(jnp.int32), train), batches
    )
    return _class_max(sums, counts)


@jax.jit
def _class_max(sums: dict[str, list[jax.Array]], counts: jax.Array) -> Scores:
    present = counts > 0
    scale = 1.0 / jnp.maximum(counts, 1e-12)[:, None, None]
    out = {}
    for group, layer_sums in sums.items():
        per_class = jnp.mean(
            jnp.stack([jnp.abs(s * scale).mean(axis=1) for s in layer_sums]), axis=0
        )  # f32[K, n]: mean over producers of the spatial mean of |class mean|
        out[group] = jnp.max(jnp.where(present[:, None], per_class, -jnp.inf), axis=0)
    return out


class GFIAccumulator(NamedTuple):
    """Running sum of |dL/dgates| over train steps (a pytree: jit, donate and checkpoint it).

    Attributes:
      abs_gate_grad_sum: ``{group: f32[n]}``, sum over steps of |dL_step/dgates|.
      num_steps: i32[] steps accumulated.
    """

    abs_gate_grad_sum: dict[str, jax.Array]
    num_steps: jax.Array


def gfi_accumulator_init(arch: Architecture) -> GFIAccumulator:
    """An empty accumulator for ``arch``'s groups."""
    zeros = {g: jnp.zeros((n,), jnp.float32) for g, n in groups(arch).items()}
    return GFIAccumulator(zeros, jnp.zeros((), jnp.int32))


def gfi_accumulator_update(
    state: GFIAccumulator, gate_grads: dict[str, jax.Array]
) -> GFIAccumulator:
    """Adds one step's gate gradients (dL/dgates at gates = 1 of the step's mean batch loss).

    Pure and jittable; call it inside the train step with the gate part of the gradient that the
    step already computes, so the scores cost no extra forward or backward pass.
    """
    if set(gate_grads) != set(state.abs_gate_grad_sum):
        raise ValueError(
            f"gate_grads has groups {sorted(gate_grads)}, the accumulator "
            f"{sorted(state.abs_gate_grad_sum)}"
        )
    summed = {
        g: total + jnp.abs(gate_grads[g]).astype(jnp.float32)
        for g, total in state.abs_gate_grad_sum.items()
    }
    return GFIAccumulator(summed, state.num_steps + 1)


@dataclasses.dataclass(frozen=True)
class GFIAccumulation:
    """GFI-AP's training-time score as the train step's `jaxprune.train.GateAccumulator`:

    options = train.StepOptions(accumulator=GFIAccumulation())
    state = train.create_train_state(arch, tx, seed, mesh, accumulator=GFIAccumulation())
    ...                                   # train; then
    scores = GFIAccumulation().scores(state.aux)
    """

    def init(self, arch: Architecture) -> GFIAccumulator:
        return gfi_accumulator_init(arch)

    def update(self, state: GFIAccumulator, gate_grads: dict[str, jax.Array]) -> GFIAccumulator:
        return gfi_accumulator_update(state, gate_grads)

    def steps(self, state: GFIAccumulator) -> int:
        """How many train steps ``state`` holds."""
        return int(jax.device_get(state.num_steps))

    def scores(self, state: GFIAccumulator) -> Scores:
        return gfi_accumulator_scores(state)


def gfi_accumulator_scores(state: GFIAccumulator) -> Scores:
    """``{group: f32[n]}`` = mean over the accumulated steps of |dL_step/dgates| (0 if none)."""
    steps = jnp.maximum(state.num_steps, 1).astype(jnp.float32)
    return {g: total / steps for g, total in state.abs_gate_grad_sum.items()}
