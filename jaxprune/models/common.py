"""Building blocks shared by the model families: conv, BatchNorm, gates, (de)serialisation."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.ops import conv2d

Gates = Mapping[str, jax.Array] | None

# He-normal in fan-out mode, as torchvision initialises ResNet and VGG convolutions.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Module):
    """Square convolution, NHWC input, HWIO kernel ``kernel`` and optional ``bias``.

    Parameters are float32; the computation runs in ``dtype``. The convolution itself is the seam
    `jaxprune.ops.conv2d`: `lax.conv_general_dilated`, or the CPU layer's plan once
    ``jaxprune.cpu.enable()`` ran.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


BATCH_NORM_MOMENTUM = 0.9  # running = m * running + (1 - m) * batch (PyTorch's momentum 0.1)


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """BatchNorm as PyTorch defines it (momentum 0.1 there = 0.9 here, eps 1e-5).

    Under data-parallel `jax.jit` the batch axis is the global batch, so training statistics are
    those of the global batch with no explicit collective.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def apply_gate(x: jax.Array, gates: Gates, group: str) -> jax.Array:
    """Multiplies the channels (last axis) of ``x`` by ``gates[group]`` when that group is gated."""
    if gates is None or group not in gates:
        return x
    gate = jnp.asarray(gates[group])
    if gate.shape != (x.shape[-1],):
        raise ValueError(
            f"gate for group {group!r} has shape {gate.shape}, expected ({x.shape[-1]},)"
        )
    return x * gate.astype(x.dtype)


def check_gate_names(gates: Gates, group_sizes: Mapping[str, int]) -> None:
    """Refuses gates for groups the architecture does not have (they would silently do nothing)."""
    if gates is None:
        return
    unknown = sorted(set(gates) - set(group_sizes))
    if unknown:
        raise ValueError(f"unknown gate groups {unknown}; valid groups: {list(group_sizes)}")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """f[N, H, W, C] -> f[N, C]."""
    return jnp.mean(x, axis=(1, 2))


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def to_tuples(value: Any) -> Any:
    """Turns the lists of a JSON-decoded value back into tuples (nested)."""
    if isinstance(value, list | tuple):
        return tuple(to_tuples(v) for v in value)
    return value


def to_lists(value: Any) -> Any:
    """Turns the tuples of a value into lists (nested), as JSON holds them."""
    if isinstance(value, list | tuple):
        return [to_lists(v) for v in value]
    return value


def arch_to_dict(arch: Any, family: str) -> dict:
    """JSON-able dict of a frozen architecture dataclass, tagged with its family."""
    fields = {f.name: to_lists(getattr(arch, f.name)) for f in dataclasses.fields(arch)}
    return {"family": family, **fields}


def arch_from_fields(cls: type, fields: Mapping[str, Any]) -> Any:
    """Rebuilds an architecture dataclass from JSON-decoded fields, refusing unknown ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"unknown fields {unknown} for {cls.__name__}; valid: {sorted(names)}")
    return cls(**{k: to_tuples(v) for k, v in fields.items()})
