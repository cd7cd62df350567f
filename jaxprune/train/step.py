"""The train state and the data-parallel train and eval steps.

One step is one `jax.jit` over a ``"data"`` mesh (see `jaxprune.train.parallel`): the state is
replicated and donated, the batch is split over devices, and the loss is the mean over the global
batch, so the gradient all-reduce and BatchNorm's global batch statistics come from XLA's
partitioner with no explicit collective. The numbers are those of one device running the global
batch, up to the order of floating-point sums.

How this maps to ``jax.pmap``: pmap's idiom runs the step per device on a local batch and calls
``lax.pmean(grads, "batch")`` (and passes ``axis_name`` to BatchNorm) to average across devices.
Here the mean over the global batch is written once, as on one device; the sharding
(``P("data")`` on the batch, ``P()`` on the state) tells XLA's SPMD partitioner where rows live,
and it emits the same all-reduces pmap's collectives would.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxprune.graph import Architecture, groups
from jaxprune.train import parallel
from jaxprune.train.optim import cross_entropy

Metrics = dict[str, jax.Array]


class ComputeDtype(enum.StrEnum):
    """Dtype of activations and matmuls; parameters and optimizer state stay float32."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def jnp_dtype(self) -> Any:
        return jnp.bfloat16 if self is ComputeDtype.BFLOAT16 else jnp.float32


class GateAccumulator(Protocol):
    """What a caller hands the train step to receive every step's gate gradients.

    The step differentiates its loss with respect to ``(params, gates)`` at gates = 1 in its one
    backward pass and folds the gate part into ``TrainState.aux`` with ``update``: importance that
    costs no extra pass (GFI-AP's training-time score is one such accumulator,
    `jaxprune.importance.GFIAccumulation`). Instances must be hashable (frozen dataclasses).
    """

    def init(self, arch: Architecture) -> Any:
        """The empty accumulator state for ``arch``'s groups (a pytree)."""

    def update(self, state: Any, gate_grads: dict[str, jax.Array]) -> Any:
        """``state`` with one step's ``{group: f32[n]}`` gate gradients added (pure, jittable)."""


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      step: int32 scalar, number of updates applied in this run (drives the learning rate).
      params: the model's ``params`` collection, float32.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: state of `jaxprune.train.make_optimizer`'s transformation.
      aux: the state of the run's `GateAccumulator`, if it has one, else ``()``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    aux: Any = ()

    @property
    def variables(self) -> dict:
        """The model's variables as ``model.apply`` takes them."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


@flax.struct.dataclass
class _TrainStateBefore20261130:
    """`TrainState` as checkpoints written before 2026-11-30 hold it (``aux`` was ``gfi``)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    gfi: Any = ()


def legacy_target(target: TrainState) -> Any:
    """``target`` in the layout of checkpoints written before ``TrainState.aux`` got its name."""
    return _TrainStateBefore20261130(
        target.step, target.params, target.batch_stats, target.opt_state, target.aux
    )


def from_legacy(state: Any) -> TrainState:
    """A `TrainState` of a state restored with `legacy_target`."""
    return TrainState(state.step, state.params, state.batch_stats, state.opt_state, state.gfi)


def _init_state(
    arch: Architecture,
    tx: optax.GradientTransformation,
    key: jax.Array,
    accumulator: GateAccumulator | None,
) -> TrainState:
    x = jnp.zeros((1, *arch.input_shape), jnp.float32)
    variables = arch.module().init(key, x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        aux=accumulator.init(arch) if accumulator is not None else (),
    )


def create_train_state(
    arch: Architecture,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: Mesh,
    accumulator: GateAccumulator | None = None,
) -> TrainState:
    """A fresh state, initialised from ``seed`` directly into replicated arrays on ``mesh``.

    The values depend only on ``seed`` (not on the mesh), and every process of a multi-host run
    computes the same ones. ``accumulator`` adds its empty state as ``aux``.
    """
    init = jax.jit(
        lambda key: _init_state(arch, tx, key, accumulator), out_shardings=parallel.replicated(mesh)
    )
    # XLA's RngBitGenerator: the same values for a seed, and on CPU the init compiles ~4x faster
    # than with threefry keys (17 s -> 5 s for ResNet-20).
    return init(jax.random.key(seed, impl="rbg"))


def state_from_variables(
    arch: Architecture,
    variables: dict,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    opt_state: Any = None,
    accumulator: GateAccumulator | None = None,
) -> TrainState:
    """A step-0 state holding ``arch``'s ``variables`` (e.g. pruned ones), replicated on ``mesh``.

    Args:
      opt_state: the optimizer state to continue from (e.g. sliced by `jaxprune.prune_like`);
        None: a fresh one.
      accumulator: add its empty state as ``aux``.
    """
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params) if opt_state is None else opt_state,
        aux=accumulator.init(arch) if accumulator is not None else (),
    )
    return jax.device_put(state, parallel.replicated(mesh))


def abstract_train_state(
    arch: Architecture,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    accumulator: GateAccumulator | None = None,
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of ``arch``'s train state, computing nothing.

    The restore target of a checkpoint: shapes come from the architecture (``jax.eval_shape``),
    so a pruned architecture gives the narrower target.
    """
    shapes = jax.eval_shape(lambda key: _init_state(arch, tx, key, accumulator), jax.random.key(0))
    sharding = parallel.replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Options of the train step.

    Attributes:
      label_smoothing: see `jaxprune.train.cross_entropy`.
      compute_dtype: dtype of activations.
      collect_gate_grads: also return d(batch loss)/d(gates) at gates = 1 for every prunable group
        (from the same backward pass) as a third output.
      accumulator: fold those gate gradients into ``state.aux`` inside the step; the state must
        carry its state (``create_train_state(..., accumulator=...)``).
    """

    label_smoothing: float = 0.0
    compute_dtype: ComputeDtype = ComputeDtype.FLOAT32
    collect_gate_grads: bool = False
    accumulator: GateAccumulator | None = None


def make_train_step(
    arch: Architecture,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    options: StepOptions = StepOptions(),
) -> Callable[..., tuple]:
    """The jitted, data-parallel train step.

    Args:
      arch: the architecture being trained.
      tx: update direction from `make_optimizer` (without the learning rate).
      schedule: learning rate as a function of ``state.step``.
      mesh: the ``"data"`` mesh.
      options: loss and dtype options.

    Returns:
      ``step(state, images, labels) -> (state, metrics)``, or ``(state, metrics, gate_grads)`` with
      ``collect_gate_grads``. ``images`` f32[B, H, W, C] and ``labels`` int32[B] are global arrays
      sharded over ``"data"``; ``state`` is donated. ``metrics``: scalars ``loss`` (mean over the
      batch, with the parameters before this update), ``accuracy`` (of the batch, before the
      update), ``learning_rate`` (used by this update), ``grad_norm`` and ``finite`` (bool: loss,
      gradient norm and the updated parameters and BatchNorm statistics are finite). ``gate_grads``:
      group -> f32[channels].
    """
    model = arch.module(dtype=options.compute_dtype.jnp_dtype)
    group_sizes = groups(arch)

    def loss_fn(params, gates, batch_stats, images, labels):
        variables = (
            {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        )
        logits, updates = model.apply(
            variables, images, train=True, gates=gates, mutable=["batch_stats"]
        )
        loss = cross_entropy(logits, labels, options.label_smoothing).mean()
        return loss, (logits, updates.get("batch_stats", {}))

    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        gates = None
        if options.collect_gate_grads or options.accumulator is not None:
            gates = {g: jnp.ones((n,), jnp.float32) for g, n in group_sizes.items()}
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, (logits, batch_stats)), (grads, gate_grads) = grad_fn(
            state.params, gates, state.batch_stats, images, labels
        )
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        learning_rate = jnp.asarray(schedule(state.step), jnp.float32)
        params = optax.apply_updates(
            state.params, jax.tree.map(lambda d: -learning_rate * d, direction)
        )
        aux = state.aux
        if options.accumulator is not None:
            aux = options.accumulator.update(aux, gate_grads)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            aux=aux,
        )
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            # One flag for the loop's divergence check, fetched with the other metrics.
            "finite": jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & _tree_finite((params, batch_stats)),
        }
        if options.collect_gate_grads:
            return new_state, metrics, gate_grads
        return new_state, metrics

    replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    num_outputs = 3 if options.collect_gate_grads else 2
    return jax.jit(
        step,
        in_shardings=(replicated, batch, batch),
        out_shardings=(replicated,) * num_outputs,
        donate_argnums=0,
    )


def make_eval_step(
    arch: Architecture, mesh: Mesh, compute_dtype: ComputeDtype = ComputeDtype.FLOAT32
) -> Callable[..., Metrics]:
    """The jitted, data-parallel evaluation of one padded batch.

    Returns:
      ``eval_step(variables, images, labels, mask) -> {"correct", "loss_sum", "count"}``: sums
      over the rows where ``mask`` (bool[B]) is True, BatchNorm in inference mode.
    """
    model = arch.module(dtype=compute_dtype.jnp_dtype)

    def eval_step(variables, images, labels, mask):
        logits = model.apply(variables, images, train=False)
        weights = mask.astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {
            "correct": jnp.sum(correct * weights),
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * weights),
            "count": jnp.sum(weights),
        }

    replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        eval_step, in_shardings=(replicated, batch, batch, batch), out_shardings=replicated
    )


def _tree_finite(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


_all_finite = jax.jit(_tree_finite)


def all_finite(tree: Any) -> bool:
    """Whether every float leaf of ``tree`` is finite (checked before a checkpoint is written)."""
    return bool(jax.device_get(_all_finite(tree)))
