"""Surgery is exact: the pruned network computes what the gated full network computes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import F32_EPS, pass_ulps, random_variables, small_arch

import jaxprune as jp


def random_keep(group_sizes: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A random non-empty, increasing subset of every group."""
    keep = {}
    for group, size in group_sizes.items():
        count = int(rng.integers(1, size + 1))
        keep[group] = np.sort(rng.choice(size, count, replace=False))
    return keep


def gates_for(group_sizes: dict[str, int], keep: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {g: jnp.zeros(n).at[keep[g]].set(1.0) for g, n in group_sizes.items()}


def relative_error(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# The fast tier: a plain chain (LeNet-5) and residual stages with BatchNorm (ResNet-20). Every other
# model (VGG's chains with BatchNorm, deeper ResNets, bottlenecks) is the slow tier's.
_FAST = {"lenet5", "resnet20"}


def _models(names, fast=_FAST):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize(
    "name",
    _models(jp.models.names()),
)
def test_pruned_equals_gated(name):
    arch = small_arch(name)
    variables = random_variables(arch, seed=1)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, *arch.input_shape)), jnp.float32)
    group_sizes = jp.groups(arch)
    keep = random_keep(group_sizes, rng)

    gated = jax.jit(arch.module().apply)(variables, x, gates=gates_for(group_sizes, keep))
    pruned_arch, pruned_vars = jp.prune(arch, variables, keep)
    pruned = jax.jit(pruned_arch.module().apply)(pruned_vars, x)

    assert jp.groups(pruned_arch) == {g: len(i) for g, i in keep.items()}
    assert jp.count_macs(pruned_arch) < jp.count_macs(arch)
    # Two forward passes whose sums differ in length (the pruned widths).
    assert relative_error(pruned, gated) <= pass_ulps(variables) * F32_EPS


# (the fast tier: LeNet-5's; ResNet-20's surgery is the fast tier's pruned-equals-gated above)
@pytest.mark.parametrize("name", _models(["lenet5", "vgg11", "resnet20", "resnet50"], {"lenet5"}))
def test_keep_everything_is_identity(name):
    arch = small_arch(name)
    variables = random_variables(arch)
    x = jnp.ones((2, *arch.input_shape))
    everything = {g: np.arange(n) for g, n in jp.groups(arch).items()}
    for keep in ({}, everything):
        same_arch, same_vars = jp.prune(arch, variables, keep)
        assert same_arch == arch
        np.testing.assert_array_equal(
            arch.module().apply(same_vars, x), arch.module().apply(variables, x)
        )


def test_prune_is_pure():
    arch = small_arch("resnet20")
    variables = random_variables(arch)
    before = jax.tree.map(np.array, variables)
    jp.prune(arch, variables, {"stage2": np.arange(5)})
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, variables))


def test_pruned_flatten_rows_of_lenet():
    """fc1 reads a flattened 5x5x16 map: pruning conv2 must drop whole channel-minor rows."""
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    keep = {"conv2": np.array([0, 3, 7])}
    pruned_arch, pruned_vars = jp.prune(arch, variables, keep)
    kernel = variables["params"]["fc1"]["kernel"].reshape(25, 16, 120)
    np.testing.assert_array_equal(
        pruned_vars["params"]["fc1"]["kernel"], kernel[:, keep["conv2"], :].reshape(75, 120)
    )
    assert pruned_arch.conv_widths == (6, 3)


def test_stage_group_slices_every_tensor_it_ties():
    arch = jp.models.create("resnet20")
    variables = random_variables(arch)
    keep = {"stage1": np.array([1, 4, 9]), "stage2": np.arange(0, 32, 2)}
    pruned_arch, pruned = jp.prune(arch, variables, keep)
    params = pruned["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 3)
    assert params["stage1"]["block3"]["conv2"]["kernel"].shape == (3, 3, 16, 3)
    assert params["stage1"]["block2"]["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert params["stage2"]["block1"]["proj_conv"]["kernel"].shape == (1, 1, 3, 16)
    assert pruned["batch_stats"]["stage2"]["block1"]["proj_bn"]["mean"].shape == (16,)
    assert pruned_arch.stem_width == 3 and pruned_arch.stage_widths == (3, 16, 64)


def test_resnet50_stem_is_its_own_group():
    group_sizes = jp.groups(jp.models.create("resnet50"))
    assert group_sizes["stem"] == 64 and group_sizes["stage1"] == 256
    assert group_sizes["stage1/block1/conv2"] == 64
    assert len(group_sizes) == 1 + 4 + 2 * 16


@pytest.mark.parametrize(
    "keep, message",
    [
        ({"nope": [0]}, "unknown groups"),
        ({"stage1": [0, 16]}, "stage1.*must lie in"),
        ({"stage1": [-1, 2]}, "stage1.*must lie in"),
        ({"stage2": [1, 1, 2]}, "stage2.*duplicates"),
        ({"stage2": [3, 1]}, "stage2.*increasing"),
        ({"stage3": []}, "stage3.*empty"),
        ({"stage3": [[0, 1]]}, "stage3.*1-D"),
        ({"stage3": [0.5, 1.0]}, "stage3.*integers"),
    ],
)
def test_bad_keep_sets_raise(keep, message):
    arch = jp.models.create("resnet20")
    variables = random_variables(arch)
    with pytest.raises(ValueError, match=message):
        jp.prune(arch, variables, keep)


def test_prune_like_slices_optimizer_state():
    arch = jp.models.create("resnet20")
    variables = random_variables(arch)
    optimizer = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = optimizer.init(variables["params"])
    opt_state = jax.tree.map(lambda x: x + 1.0, opt_state)  # non-zero momentum
    keep = {"stage3": np.arange(0, 64, 4), "stage1/block2/conv1": np.array([2, 5])}
    pruned_arch, pruned_vars = jp.prune(arch, variables, keep)
    pruned_state = jp.prune_like(arch, opt_state, keep)

    trace = pruned_state[1][0].trace
    assert jax.tree.structure(trace) == jax.tree.structure(pruned_vars["params"])
    jax.tree.map(
        lambda a, b: np.testing.assert_equal(a.shape, b.shape), trace, pruned_vars["params"]
    )
    expected = jp.prune(arch, {"params": opt_state[1][0].trace}, keep)[1]["params"]
    jax.tree.map(np.testing.assert_array_equal, trace, expected)
    # the pruned state drives an update of the pruned params
    updates, _ = optimizer.update(pruned_vars["params"], pruned_state, pruned_vars["params"])
    assert jax.tree.structure(updates) == jax.tree.structure(pruned_vars["params"])
