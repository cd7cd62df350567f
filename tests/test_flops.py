"""MAC and parameter counts agree with the published numbers and with XLA's own count."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxprune as jp

# Published MACs at the default input shape ("FLOPs" in the pruning papers), and params.
PUBLISHED_MACS = {
    "vgg16": 313.73e6,  # HRank, GFI-AP (CIFAR-10)
    "resnet20": 40.8e6,
    "resnet56": 125.5e6,  # 125.49M with option-A shortcuts; ours adds two 1x1 projections
    "resnet110": 252.9e6,
    "resnet50": 4.1e9,  # torchvision ResNet-50, 224x224
}


@pytest.mark.parametrize("name, macs", PUBLISHED_MACS.items())
def test_macs_match_published(name, macs):
    assert jp.count_macs(jp.models.create(name)) == pytest.approx(macs, rel=0.015)


def test_params_match_published():
    assert jp.count_params(jp.models.create("resnet50", num_classes=1000)) == 25_557_032
    assert jp.count_params(jp.models.create("lenet5")) == 61_706


def test_macs_scale_with_input_and_fall_with_pruning():
    arch = jp.models.create("resnet56")
    assert jp.count_macs(arch, (64, 64, 3)) == pytest.approx(4 * jp.count_macs(arch), rel=0.001)
    half = arch.resize({g: n // 2 for g, n in jp.groups(arch).items()})
    assert jp.count_macs(half) == pytest.approx(jp.count_macs(arch) / 4, rel=0.01)
    assert sum(jp.macs_per_layer(arch).values()) == jp.count_macs(arch)


@pytest.mark.parametrize(
    "name",
    [
        "resnet56",
        "lenet5",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("vgg16", "resnet50")),
    ],
)
def test_xla_counts_two_flops_per_mac_per_layer(name):
    """Each layer's MACs, with its padded taps made real input, are half of XLA's flop count."""
    arch = jp.models.create(name)
    seen = set()
    for layer in jp.layers(arch):
        key = (layer.kind, layer.kernel_size, layer.stride, layer.in_channels, layer.out_channels,
               layer.out_hw, layer.flatten_positions)  # fmt: skip
        if layer.kind == "norm" or key in seen:
            continue
        seen.add(key)
        if layer.kind == "conv":
            k, s = layer.kernel_size, layer.stride
            padded_hw = [(o - 1) * s + k for o in layer.out_hw]
            x = jnp.zeros((1, *padded_hw, layer.in_channels))
            w = jnp.zeros((k, k, layer.in_channels, layer.out_channels))
            fn = lambda x, w, s=s: lax.conv_general_dilated(  # noqa: E731
                x, w, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            x = jnp.zeros((1, layer.flatten_positions * layer.in_channels))
            w = jnp.zeros((layer.flatten_positions * layer.in_channels, layer.out_channels))
            fn = jnp.dot
        assert _xla_flops(fn, x, w) == 2 * jp.flops.layer_macs(layer), layer.name


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]
