"""Low-level array operations used by the models (convolution with a per-backend fast path)."""

from jaxprune.ops.conv import conv2d, conv_impl

__all__ = ["conv2d", "conv_impl"]
