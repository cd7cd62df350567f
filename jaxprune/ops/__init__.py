"""Low-level array operations used by the models: the convolution with a per-backend fast path,
and the XLA:CPU settings and workarounds (`xla_cpu`)."""

from jaxprune.ops import xla_cpu
from jaxprune.ops.conv import conv2d, conv_impl
from jaxprune.ops.xla_cpu import materialize

__all__ = ["conv2d", "conv_impl", "materialize", "xla_cpu"]
