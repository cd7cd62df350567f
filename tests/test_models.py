"""Architectures as data: presets, JSON round trip, variables that match the channel graph."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_variables
from flax import traverse_util

import jaxprune as jp
from jaxprune.models.common import Conv

# Every preset, for the tests that build one; the two deepest (over a second each to initialize,
# nothing their shallower kin lack) in the slow tier only.
BUILT = [
    pytest.param(n, marks=pytest.mark.slow) if n in ("resnet101", "resnet110") else n
    for n in jp.models.names()
]


def test_names_cover_every_family():
    assert jp.models.names() == [
        "lenet5", "vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet32", "resnet56",
        "resnet110", "resnet18", "resnet34", "resnet50", "resnet101",
    ]  # fmt: skip


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet57'.*resnet56"):
        jp.models.create("resnet57")


@pytest.mark.parametrize("name", jp.models.names())
def test_dict_round_trip_through_json(name):
    arch = jp.models.create(name, num_classes=7)
    assert jp.models.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    pruned = arch.resize({g: max(1, n // 3) for g, n in jp.groups(arch).items()})
    assert pruned != arch
    assert jp.models.from_dict(json.loads(json.dumps(pruned.to_dict()))) == pruned


def test_from_dict_refuses_unknown_fields_and_families():
    d = jp.models.create("vgg11").to_dict()
    with pytest.raises(ValueError, match="unknown fields \\['depth'\\]"):
        jp.models.from_dict({**d, "depth": 11})
    with pytest.raises(ValueError, match="unknown architecture family 'mlp'"):
        jp.models.from_dict({**d, "family": "mlp"})


@pytest.mark.parametrize("name", BUILT)
def test_variables_match_the_channel_graph(name):
    """Every array has the shape its layer describes, and count_params counts all of them."""
    arch = jp.models.create(name, num_classes=10)
    shapes = jp.surgery.variable_shapes(arch)
    params = traverse_util.flatten_dict(shapes["params"])
    assert jp.count_params(arch) == sum(int(np.prod(v.shape)) for v in params.values())
    for layer in jp.layers(arch):
        if layer.kind == "conv":
            expected = (layer.kernel_size, layer.kernel_size, layer.in_channels, layer.out_channels)
            assert params[(*layer.path, "kernel")].shape == expected
        elif layer.kind == "dense":
            rows = layer.flatten_positions * layer.in_channels
            assert params[(*layer.path, "kernel")].shape == (rows, layer.out_channels)
        else:
            assert params[(*layer.path, "scale")].shape == (layer.out_channels,)
            stats = traverse_util.flatten_dict(shapes["batch_stats"])
            assert stats[(*layer.path, "mean")].shape == (layer.out_channels,)


@pytest.mark.parametrize("name", BUILT)
def test_conv_output_sizes_match_the_model(name):
    """The spatial sizes the MAC count uses are the ones the model really produces."""
    arch = jp.models.create(name)
    model = arch.module()
    x = jax.ShapeDtypeStruct((1, *arch.input_shape), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x)
        return model.apply(variables, x, capture_intermediates=lambda m, _: isinstance(m, Conv))

    _, state = jax.eval_shape(run, x)
    outputs = traverse_util.flatten_dict(state["intermediates"])
    for layer in jp.layers(arch):
        if layer.kind == "conv":
            (shape,) = [o.shape for o in outputs[(*layer.path, "__call__")]]
            assert shape == (1, *layer.out_hw, layer.out_channels), layer.name


@pytest.mark.parametrize("name", jp.models.names())
def test_submodule_names_are_readable(name):
    arch = jp.models.create(name)
    paths = traverse_util.flatten_dict(jp.surgery.variable_shapes(arch)["params"])
    for path in paths:
        assert not any(part.split("_")[-1].isdigit() for part in path), path


@pytest.mark.slow
def test_bf16_compute_keeps_float32_params():
    arch = jp.models.create("resnet20", input_shape=(8, 8, 3))
    variables = random_variables(arch)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *arch.input_shape)), jnp.float32)
    full = arch.module().apply(variables, x)
    half_model = arch.module(dtype=jnp.bfloat16)
    half = half_model.apply(variables, x)
    assert half.dtype == jnp.float32
    assert all(
        v.dtype == jnp.float32 for v in jax.tree.leaves(half_model.init(jax.random.key(0), x))
    )
    # bfloat16 keeps 8 significant bits: each of ResNet-20's ~20 layers rounds its activations by
    # up to 2**-8 of their scale, a few percent through the network; 10% of the logits' scale.
    assert float(jnp.max(jnp.abs(half - full))) < 0.1 * float(jnp.max(jnp.abs(full)))


def test_unknown_gate_group_raises():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    with pytest.raises(ValueError, match="unknown gate groups \\['conv3'\\]"):
        arch.module().apply(variables, jnp.ones((1, 28, 28, 1)), gates={"conv3": jnp.ones(4)})


def test_gate_of_wrong_size_raises():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    with pytest.raises(ValueError, match="'conv1' has shape \\(4,\\), expected \\(6,\\)"):
        arch.module().apply(variables, jnp.ones((1, 28, 28, 1)), gates={"conv1": jnp.ones(4)})


def test_impossible_resnet_is_refused():
    arch = jp.models.create("resnet20")
    with pytest.raises(ValueError, match="stage 2 changes shape, so it needs a projection"):
        dataclasses.replace(arch, projections=(False, False, True))
