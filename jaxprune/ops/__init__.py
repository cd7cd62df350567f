"""The operations the models call, behind one backend-neutral seam: `conv2d` (plain
`lax.conv_general_dilated` unless a speed layer such as `jaxprune.cpu` is enabled) and
`materialize` (the identity)."""

from jaxprune.ops.conv import Backend, ConvImpl, conv2d, conv_impl, install, installed, materialize

__all__ = ["Backend", "ConvImpl", "conv2d", "conv_impl", "install", "installed", "materialize"]
