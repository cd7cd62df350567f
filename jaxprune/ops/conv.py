"""2-D convolution in NHWC/HWIO layout."""

import jax
from jax import lax


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0) -> jax.Array:
    """Cross-correlation of ``x`` with ``kernel`` (the convention of every CNN framework).

    Args:
      x: f[N, H, W, C_in] input.
      kernel: f[kh, kw, C_in, C_out] filters.
      stride: the same stride along H and W.
      padding: zeros added on each side of H and W (PyTorch's ``padding=p``).

    Returns:
      f[N, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, C_out].
    """
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
