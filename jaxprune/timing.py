"""Wall-clock throughput of a model: what pruning buys, measured rather than assumed.

Each figure is the median over repeated timed calls of one compiled function, after warm-up calls
that compile it and fault its buffers in; ``jax.block_until_ready`` ends every call.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call (median and all repeats) and the images each call processes."""

    seconds: tuple[float, ...]
    batch_size: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median_s


def time_calls(
    fn: Callable[[], Any], batch_size: int, warmup: int = 2, repeats: int = 10
) -> Timing:
    """Times ``fn()`` (which must return JAX arrays) ``repeats`` times after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds), batch_size)


def inference_timing(
    arch: Any,
    variables: Any,
    batch_size: int,
    dtype: Any = jnp.float32,
    warmup: int = 2,
    repeats: int = 10,
) -> Timing:
    """Eval-mode forward pass of ``arch`` on a random batch of ``batch_size`` images."""
    model = arch.module(dtype=dtype)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(batch_size, *arch.input_shape)), jnp.float32
    )
    return time_calls(lambda: forward(variables, x), batch_size, warmup, repeats)
