"""The zoo traced: the groups found in each model's program are the ones its `layers()` declares
(the same (variable path, axis) sets), with the same MACs and parameter counts. The hand-written
`layers()` stays the zoo's source of truth for surgery; this test keeps it and the program equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

# every zoo model, at a small input (the ImageNet ResNets at 32x32); shapes only, nothing computed
# (the deepest ResNets, whose tracing takes seconds, in the slow tier only)
_DEEP = {"resnet50", "resnet101", "resnet110"}
ZOO = [
    pytest.param(name, (32, 32, 3), marks=pytest.mark.slow)
    if name in _DEEP
    else (name, None if name == "lenet5" else (32, 32, 3))
    for name in jp.models.names()
]


def _declared(arch) -> set[frozenset]:
    """Per group, the (variable path, axis) pairs the hand-written layers() say it indexes."""
    members: dict[str, set] = {g: set() for g in jp.groups(arch)}
    for layer in arch.layers(None):
        p = "/".join(layer.path)
        if layer.out_group is not None:
            out = members[layer.out_group]
            if layer.kind == "norm":
                out |= {
                    (f"params/{p}/scale", 0),
                    (f"params/{p}/bias", 0),
                    (f"batch_stats/{p}/mean", 0),
                    (f"batch_stats/{p}/var", 0),
                }
            else:
                out.add((f"params/{p}/kernel", 3 if layer.kind == "conv" else 1))
                if layer.use_bias:
                    out.add((f"params/{p}/bias", 0))
        if layer.kind != "norm" and layer.in_group is not None and layer.flatten_positions == 1:
            members[layer.in_group].add((f"params/{p}/kernel", 2 if layer.kind == "conv" else 0))
    return {frozenset(m) for m in members.values()}


def _small(name, input_shape):
    arch = jp.models.create(name, input_shape=input_shape)
    return arch.resize({g: max(2, n // 8) for g, n in jp.groups(arch).items()})


@pytest.fixture(autouse=True)
def _no_materialize(monkeypatch):
    """The ResNets' CPU-only `materialize` divides the stream by a 1.0 computed from its first
    element, which ties the stream to a slice (an unprunable use as far as the channel rules can
    tell): traced without it, as on GPU/TPU, where it is the identity."""
    import jaxprune.models.resnet as resnet

    monkeypatch.setattr(resnet, "materialize", lambda x: x)


@pytest.mark.parametrize("name,input_shape", ZOO)
def test_traced_zoo_groups_equal_declared(name, input_shape):
    arch = _small(name, input_shape)
    x = jax.ShapeDtypeStruct((2, *arch.input_shape), jnp.float32)
    variables = jax.eval_shape(lambda: arch.module().init(jax.random.key(0), jnp.ones(x.shape)))
    net = jp.trace(lambda v, x: arch.module().apply(v, x, train=False), variables, x, name=name)
    assert sorted(net.groups.values()) == sorted(jp.groups(arch).values())
    traced = {frozenset(m) for m in net.base.group_signature().values()}
    assert traced == _declared(arch)
    assert jp.count_macs(net) == jp.count_macs(arch)
    assert jp.count_params(net) == jp.count_params(arch)


@pytest.mark.parametrize(
    "name,input_shape",
    [("lenet5", None), pytest.param("vgg11", (16, 16, 3), marks=pytest.mark.slow)],
)
def test_traced_gate_gradients_equal_the_zoo_gates(name, input_shape):
    """In a plain ReLU network the gate where a group is contracted and the zoo's gate after
    BatchNorm have the same gradient (relu(g z) = g relu(z), max-pooling commutes with g > 0), so
    Taylor-FO-BN scores of the traced and the declared network agree."""
    from jaxprune import importance

    arch = _small(name, input_shape)
    x = jax.random.normal(jax.random.key(1), (4, *arch.input_shape))
    variables = jax.jit(arch.module().init)(jax.random.key(0), x)
    net = jp.trace(lambda v, x: arch.module().apply(v, x, train=False), variables, x)
    batches = [(x, jnp.arange(4) % 10)]
    traced = importance.taylor_fo_bn(net, variables, batches)
    declared = importance.taylor_fo_bn(arch, variables, batches)
    for g_declared, g_traced in _traced_names(arch, net).items():
        np.testing.assert_allclose(traced[g_traced], declared[g_declared], rtol=1e-4, atol=1e-9)


def _traced_names(arch, net) -> dict[str, str]:
    """Declared group -> the traced group indexing its first producer's kernel output axis."""
    by_signature = {m: g for g, m in net.base.group_signature().items()}
    out = {}
    for g_declared in jp.groups(arch):
        layer = jp.group_layers(arch)[g_declared][0]
        kernel = ("params/" + "/".join(layer.path) + "/kernel", 3 if layer.kind == "conv" else 1)
        out[g_declared] = next(g for m, g in by_signature.items() if kernel in m)
    return out


@pytest.mark.parametrize(
    "criterion",
    [
        dict(name="gfi", signal="activation"),
        pytest.param(dict(name="fsabp", mode="features"), marks=pytest.mark.slow),
        pytest.param(dict(name="fsabp", mode="weights"), marks=pytest.mark.slow),
        dict(name="l1"),  # the weight criteria's path (FPGM's, FSABP's: the slow tier)
        pytest.param(dict(name="fpgm"), marks=pytest.mark.slow),
    ],
    ids=["gfi_activation", "fsabp_features", "fsabp_weights", "l1", "fpgm"],
)
def test_traced_feature_and_weight_scores_equal_the_zoo(criterion):
    """The traced program's producer outputs (conv output + bias) and filters are the zoo's:
    LeNet-5's feature, activation and weight scores agree."""
    from jaxprune import importance

    options = dict(criterion)
    fn = importance.CRITERIA[options.pop("name")]
    arch = _small("lenet5", None)
    x = jax.random.normal(jax.random.key(1), (6, *arch.input_shape))
    variables = jax.jit(arch.module().init)(jax.random.key(0), x)
    net = jp.trace(lambda v, x: arch.module().apply(v, x, train=False), variables, x)
    batches = [(x, jnp.array([0, 1, 1, 3, 0, 1]))]
    traced = fn(net, variables, batches, **options)
    declared = fn(arch, variables, batches, **options)
    for g_declared, g_traced in _traced_names(arch, net).items():
        # the same float32 arithmetic (convs of <= 150 products, Gram matrices): ~1e-6 relative
        np.testing.assert_allclose(traced[g_traced], declared[g_declared], rtol=1e-5, atol=1e-6)
