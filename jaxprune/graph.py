"""The channel graph of an architecture: its layers and the prunable channel groups that tie them.

This is the one place where an architecture's structure is described for pruning. Surgery
(`jaxprune.surgery`), counting (`jaxprune.flops`) and importance (`jaxprune.importance`) all read
`layers(arch)`; `groups(arch)` is derived from it.

A *group* is a set of channels that must be removed together: the output channels of one conv (and
its BatchNorm) in a plain network, or, in a ResNet, every tensor that the identity shortcuts of a
stage add together (the residual stream). A layer names the group that indexes its output axis
(``out_group``) and the group that indexes its input axis (``in_group``); ``None`` means the axis is
not prunable (image channels, logits).
"""

import dataclasses
from typing import Literal, Protocol

LayerKind = Literal["conv", "dense", "norm"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parameterised layer as surgery and counting see it.

    Attributes:
      path: module path of its variables, e.g. ``("stage2", "block1", "conv1")``.
      kind: ``"conv"`` (kernel f[k, k, in, out], optional bias), ``"dense"`` (kernel f[in, out],
        bias) or ``"norm"`` (BatchNorm: params scale/bias, batch_stats mean/var, all f[out]).
      in_channels: input channels (for dense after a flatten: channels of the flattened map).
      out_channels: output channels (features).
      in_group: group indexing the input channels, or None.
      out_group: group indexing the output channels, or None.
      kernel_size: square kernel size k (1 for dense and norm).
      stride: conv stride.
      padding: zeros added on each side (PyTorch convention).
      out_hw: output spatial size (H, W); (1, 1) for dense layers.
      use_bias: whether the layer has a bias.
      flatten_positions: for a dense layer reading a flattened NHWC map, the number of spatial
        positions P; its kernel has P * in_channels rows, row index = position * in_channels + c.
    """

    path: tuple[str, ...]
    kind: LayerKind
    in_channels: int
    out_channels: int
    in_group: str | None = None
    out_group: str | None = None
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    out_hw: tuple[int, int] = (1, 1)
    use_bias: bool = False
    flatten_positions: int = 1

    @property
    def name(self) -> str:
        return "/".join(self.path)


class Architecture(Protocol):
    """What every architecture dataclass provides (see `jaxprune.models`)."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]

    def layers(self, input_shape: tuple[int, int, int] | None = None) -> list[Layer]: ...

    def resize(self, group_sizes: dict[str, int]) -> "Architecture": ...

    def module(self, dtype=...): ...

    def to_dict(self) -> dict: ...


def conv_out_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis."""
    return (size + 2 * padding - kernel_size) // stride + 1


def layers(arch: Architecture, input_shape: tuple[int, int, int] | None = None) -> list[Layer]:
    """The layers of ``arch`` in forward order, with spatial sizes for ``input_shape`` (H, W, C)."""
    return arch.layers(input_shape)


def groups(arch: Architecture) -> dict[str, int]:
    """Prunable channel groups of ``arch`` -> number of channels, in forward order.

    Every layer whose output axis a group indexes must agree on its size; a mismatch is a bug in
    the architecture's description and raises.
    """
    sizes: dict[str, int] = {}
    for layer in arch.layers(None):
        if layer.out_group is None:
            continue
        known = sizes.setdefault(layer.out_group, layer.out_channels)
        if known != layer.out_channels:
            raise AssertionError(
                f"group {layer.out_group!r}: layer {layer.name} has {layer.out_channels} "
                f"channels, another layer of the group has {known}"
            )
    return sizes


def group_layers(arch: Architecture) -> dict[str, list[Layer]]:
    """Group -> the layers whose *output* channels it indexes (the producers), in forward order."""
    producers: dict[str, list[Layer]] = {g: [] for g in groups(arch)}
    for layer in arch.layers(None):
        if layer.out_group is not None:
            producers[layer.out_group].append(layer)
    return producers
