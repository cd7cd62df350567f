"""MAC and parameter counts, in the convention of the pruning papers.

A convolution costs one multiply-accumulate per kernel tap per output position,
``H_out * W_out * k * k * C_in * C_out``, padded taps included; a dense layer ``in * out``. Biases,
BatchNorm, activations, pooling and additions are not counted (they are <1% of a CNN's work).
Papers that say "FLOPs" for these numbers (GFI-AP, HRank, Taylor-FO-BN) mean MACs: VGG-16 on CIFAR
is "313.7M FLOPs" there. XLA's ``cost_analysis()['flops']`` counts 2 per MAC and leaves out the taps
that fall on SAME padding.
"""

from jaxprune.graph import Architecture, Layer


def layer_macs(layer: Layer) -> int:
    """Multiply-accumulates of one layer for one image."""
    if layer.kind == "conv":
        h, w = layer.out_hw
        return h * w * layer.kernel_size**2 * layer.in_channels * layer.out_channels
    if layer.kind == "dense":
        return layer.flatten_positions * layer.in_channels * layer.out_channels
    return 0


def layer_params(layer: Layer) -> int:
    """Trainable parameters of one layer (BatchNorm: scale and bias; running stats excluded)."""
    if layer.kind == "norm":
        return 2 * layer.out_channels
    fan_in = layer.kernel_size**2 * layer.in_channels * layer.flatten_positions
    return fan_in * layer.out_channels + (layer.out_channels if layer.use_bias else 0)


def macs_per_layer(
    arch: Architecture, input_shape: tuple[int, int, int] | None = None
) -> dict[str, int]:
    """Layer name (``stage1/block1/conv1``) -> MACs per image, conv and dense layers only."""
    return {
        layer.name: layer_macs(layer)
        for layer in arch.layers(input_shape)
        if layer.kind in ("conv", "dense")
    }


def params_per_layer(arch: Architecture) -> dict[str, int]:
    """Layer name -> trainable parameters."""
    return {layer.name: layer_params(layer) for layer in arch.layers(None)}


def count_macs(arch: Architecture, input_shape: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates for one image of ``input_shape`` (H, W, C; default: the arch's)."""
    return sum(macs_per_layer(arch, input_shape).values())


def count_params(arch: Architecture) -> int:
    """Trainable parameters, i.e. the number of scalars in ``variables['params']``."""
    if hasattr(arch, "count_params"):  # a traced network counts its variables themselves
        return arch.count_params()
    return sum(params_per_layer(arch).values())
