"""From the pipeline's uint8 images to what the model sees, on the device.

Batches leave the input pipeline as uint8 (4x fewer bytes through the workers' shared memory and
the host-to-device copy than float32); `normalize` turns them into the model's float32 input
after the transfer, as one small jitted function that keeps the batch's sharding. It is the one
place where pixels are scaled, for training, evaluation and scoring alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalization_constants(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(scale, shift)`` with ``x * scale + shift == (x / 255 - mean) / std`` per channel.

    Computed in float64 and rounded once, so that the result is the float64 formula up to two
    float32 roundings (of the product and of the sum).
    """
    std64 = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    shift = (-np.asarray(mean, np.float64) / std64).astype(np.float32)
    return scale, shift


def normalize_on_host(
    images: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """`normalize` in numpy on the host, as the pipeline computed it before it handed over uint8:
    the reference of the tests and the float32 baseline of `experiments/bench_data.py`.

    Args:
      images: uint8[..., W, C].

    Returns:
      float32, the shape of ``images``.
    """
    width, channels = images.shape[-2:]
    scale, shift = normalization_constants(mean, std)
    out = np.multiply(images.reshape(-1, width * channels), np.tile(scale, width), dtype=np.float32)
    out += np.tile(shift, width)
    return out.reshape(images.shape)


@functools.partial(jax.jit, static_argnames=("mean", "std"))
def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """Maps uint8 pixels to float32 ``(x / 255 - mean) / std`` per channel, on the device.

    Elementwise, so the output has the input's sharding (a batch split over ``"data"`` stays
    split, and 1 device computes what 8 do).

    Args:
      images: uint8[B, H, W, C] (a `jax.Array`, or numpy, which is transferred first).
      mean: C per-channel means of x / 255 (static: a tuple, as `Dataset.mean`).
      std: C per-channel standard deviations of x / 255 (static, as `Dataset.std`).

    Returns:
      f32[B, H, W, C].
    """
    scale, shift = normalization_constants(mean, std)
    return images.astype(jnp.float32) * scale + shift
