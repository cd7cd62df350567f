"""Optimizers, learning-rate schedules and the classification loss.

The optimizer is an optax transformation *without* the learning rate: the train step multiplies its
output by ``-schedule(step)`` with the run's own step counter. Fine-tuning after pruning therefore
starts a fresh schedule (step 0) while keeping the optimizer state (momentum, Adam moments and
Adam's bias-correction count) that `jaxprune.prune_like` sliced.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Warm-up length when none is given, as a fraction of the run: it keeps SGD at lr 0.1 from
# overshooting in the first steps (LeNet-5 on Fashion-MNIST gains ~4 points in one epoch).
DEFAULT_WARMUP_FRACTION = 0.05


class OptimizerName(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class ScheduleName(enum.StrEnum):
    COSINE = "cosine"
    STEP = "step"
    CONSTANT = "constant"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule of a run.

    Attributes:
      name: SGD (momentum, optionally Nesterov) or Adam.
      learning_rate: peak learning rate, reached at the end of the warm-up.
      momentum: SGD momentum (Adam's beta1 is 0.9, beta2 0.999).
      nesterov: Nesterov momentum for SGD.
      weight_decay: decoupled weight decay (Loshchilov & Hutter 2019): ``p -= lr * wd * p`` apart
        from the gradient, so it bypasses the momentum and Adam's scaling. Applied to conv and
        dense kernels only, not to biases or BatchNorm.
      schedule: cosine decay to 0, step decay, or constant, after a linear warm-up.
      warmup_steps: linear warm-up from 0 to ``learning_rate``; None: 5% of the run's steps.
      step_boundaries: for the step schedule, fractions of the run at which the rate is multiplied
        by ``step_factor``.
      step_factor: decay factor of the step schedule.
    """

    name: OptimizerName = OptimizerName.SGD
    learning_rate: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: ScheduleName = ScheduleName.COSINE
    warmup_steps: int | None = None
    step_boundaries: tuple[float, ...] = (0.5, 0.75)
    step_factor: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "name", OptimizerName(self.name))
        object.__setattr__(self, "schedule", ScheduleName(self.schedule))
        object.__setattr__(self, "step_boundaries", tuple(self.step_boundaries))
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if (self.warmup_steps or 0) < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps and weight_decay must not be negative")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["step_boundaries"] = list(self.step_boundaries)
        return {k: str(v) if isinstance(v, enum.Enum) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> OptimizerConfig:
        return cls(**fields)


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step: linear warm-up, then the configured decay."""
    peak = config.learning_rate
    warmup = config.warmup_steps
    if warmup is None:
        warmup = round(DEFAULT_WARMUP_FRACTION * total_steps)
    warmup = min(warmup, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule is ScheduleName.COSINE:
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    elif config.schedule is ScheduleName.STEP:
        # Boundaries count from the end of the warm-up; the factors compound.
        boundaries = [round(f * total_steps) - warmup for f in config.step_boundaries]
        scales = {b: config.step_factor for b in boundaries if b > 0}
        decay = optax.piecewise_constant_schedule(peak, scales)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _kernels(params: Any) -> Any:
    """Weight-decay mask: conv and dense kernels (ndim >= 2), not biases or BatchNorm."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The update direction; the caller scales it by ``-learning_rate``.

    SGD: ``d = m + wd * p`` with ``m = momentum * m + g`` (PyTorch's convention, Nesterov
    optional). Adam: ``d = adam(g) + wd * p`` (AdamW as optax and PyTorch define it).
    """
    if config.name is OptimizerName.SGD:
        direction = optax.trace(decay=config.momentum, nesterov=config.nesterov)
    else:
        direction = optax.scale_by_adam()
    return optax.chain(direction, optax.add_decayed_weights(config.weight_decay, mask=_kernels))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, f32[N], with optional label smoothing.

    Args:
      logits: f[N, classes] (computed in float32 whatever the model's compute dtype).
      labels: int[N].
      label_smoothing: mass spread uniformly over all classes (Szegedy et al. 2016).
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
