"""jp.trace on user-style linen and NNX models: groups, pruned == gated, narrower XLA programs,
one fine-tuning step of the pruned model, and clear errors on bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from tests import trace_models as tm

# Each frontend traces every test model in the slow tier; the fast tier traces each of the smaller
# nets once (the linen mixer, the nnx flatten net; the concat net is test_trace_criteria's).
FAST = {"linen": {"mixer"}, "nnx": {"flatten"}}


def _models(kind):
    return [m if m in FAST[kind] else pytest.param(m, marks=pytest.mark.slow) for m in tm.LINEN]


X_SHAPE = (2, 32, 32, 3)


def _x(seed=1, shape=X_SHAPE):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _random_keep(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {g: np.sort(rng.choice(n, max(1, n // 2), replace=False)) for g, n in groups.items()}


def _gates(groups, keep):
    return {g: jnp.zeros(n).at[keep[g]].set(1.0) for g, n in groups.items()}


def _gated(net, variables, x, gates=None):
    """net.apply under jit (eager evaluation compiles every primitive on its own)."""
    return jax.jit(lambda v, x, g: net.apply(v, x, gates=g))(variables, x, gates)


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


@pytest.fixture(scope="module", params=_models("linen"))
def linen_case(request):
    model = tm.LINEN[request.param]()
    x = _x()
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net = jp.trace(model.apply, variables, x)
    return request.param, model, variables, net


@pytest.fixture(scope="module", params=_models("nnx"))
def nnx_case(request):
    module = tm.NNX[request.param](nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    module = nnx.merge(graphdef, tm.random_variables(state))
    module.eval()
    net = jp.trace(module, _x())
    return request.param, module, net


def test_linen_groups(linen_case):
    name, _, _, net = linen_case
    assert sorted(net.groups.values()) == tm.EXPECTED[name], net.groups


def test_nnx_groups(nnx_case):
    name, _, net = nnx_case
    assert sorted(net.groups.values()) == tm.EXPECTED[name], net.groups


def test_linen_group_names_are_variable_paths(linen_case):
    name, _, _, net = linen_case
    if name == "resnet18":
        assert "layer1_0/conv1" in net.groups and "conv1" in net.groups  # stem names its stream
    if name == "inception":
        assert set(net.groups) == {
            f"{b}_conv"
            for b in ("stem", "branch1x1", "branch3x3_reduce", "branch3x3", "branch_pool", "mix")
        }


def test_linen_pruned_equals_gated(linen_case):
    _, model, variables, net = linen_case
    x = _x(2)
    assert _rel_err(_gated(net, variables, x), jax.jit(model.apply)(variables, x)) < 1e-6
    for seed in range(2):
        keep = _random_keep(net.groups, seed)
        gated = _gated(net, variables, x, _gates(net.groups, keep))
        apply2, variables2 = net.prune(variables, keep)
        # float32, sums of O(100) terms per output: ~1e-6 relative; 1e-4 leaves margin
        assert _rel_err(jax.jit(apply2)(variables2, x), gated) < 1e-4


def test_nnx_pruned_equals_gated(nnx_case):
    _, module, net = nnx_case
    x = _x(2)
    state = nnx.state(module)
    assert _rel_err(_gated(net, state, x), nnx.jit(lambda m, x: m(x))(module, x)) < 1e-6
    keep = _random_keep(net.groups, 3)
    gated = _gated(net, state, x, _gates(net.groups, keep))
    small = net.prune(module, keep)
    assert isinstance(small, nnx.Module)
    assert _rel_err(nnx.jit(lambda m, x: m(x))(small, x), gated) < 1e-4
    assert jax.tree.leaves(nnx.state(module))[0].shape == jax.tree.leaves(state)[0].shape


def test_linen_pruned_program_is_narrower(linen_case):
    _, model, variables, net = linen_case
    x = _x()
    apply2, variables2 = net.prune(variables, _random_keep(net.groups))
    full, small = _flops(model.apply, variables, x), _flops(apply2, variables2, x)
    assert small < 0.8 * full, (full, small)
    net2 = jp.trace(apply2, variables2, x)
    assert jp.count_macs(net2) < jp.count_macs(net)
    assert jp.count_params(net2) < jp.count_params(net)


def test_nnx_pruned_module_is_narrower(nnx_case):
    _, module, net = nnx_case
    x = _x()
    small = net.prune(module, _random_keep(net.groups))
    full = _flops(lambda s, x: nnx.merge(nnx.graphdef(module), s)(x), nnx.state(module), x)
    pruned = _flops(lambda s, x: nnx.merge(nnx.graphdef(small), s)(x), nnx.state(small), x)
    assert pruned < 0.8 * full, (full, pruned)
    assert jp.count_macs(jp.trace(small, x)) < jp.count_macs(net)


def test_linen_fine_tuning_step(linen_case):
    _, _, variables, net = linen_case
    x, y = _x(4), jnp.arange(2) % 10
    apply2, variables2 = net.prune(variables, _random_keep(net.groups))
    params, stats = variables2["params"], {k: v for k, v in variables2.items() if k != "params"}

    def loss_fn(params):
        logits, updates = apply2(
            {"params": params, **stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    opt = optax.sgd(0.1)
    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    new_params = optax.apply_updates(params, opt.update(grads, opt.init(params), params)[0])
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert float(jax.jit(loss_fn)(new_params)[0]) < float(loss)
    for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(updates), strict=False):
        assert old.shape == new.shape and not np.allclose(old, new)  # BatchNorm trained


def test_nnx_fine_tuning_step(nnx_case):
    _, module, net = nnx_case
    x, y = _x(4), jnp.arange(2) % 10
    small = net.prune(module, _random_keep(net.groups))
    small.train()
    stats_before = [a.copy() for a in jax.tree.leaves(nnx.state(small, nnx.BatchStat))]

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    optimizer = nnx.Optimizer(small, optax.sgd(0.1), wrt=nnx.Param)
    loss = step(small, optimizer)
    assert float(nnx.jit(loss_fn)(small)) < float(loss)
    for old, new in zip(
        stats_before, jax.tree.leaves(nnx.state(small, nnx.BatchStat)), strict=False
    ):
        assert not np.allclose(old, new)  # BatchNorm trained


# ------------------------------------------------------------------------------- bad input


def test_untraceable_function_is_a_type_error():
    def bad(variables, x):
        return np.asarray(x) * variables["w"]  # numpy on a tracer

    with pytest.raises(TypeError, match="could not trace"):
        jp.trace(bad, {"w": jnp.ones(3)}, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="function or an nnx.Module"):
        jp.trace(42, {}, jnp.ones(3))


def test_no_prunable_group_is_a_value_error():
    def linear(variables, x):
        return x @ variables["w"]

    with pytest.raises(ValueError, match="no prunable channel group"):
        jp.trace(linear, {"w": jnp.ones((3, 4))}, jnp.ones((2, 3)))


def test_unknown_group_and_foreign_keep_name_the_problem(linen_case):
    _, _, variables, net = linen_case
    first, n = next(iter(net.groups.items()))
    with pytest.raises(ValueError, match="unknown groups \\['nope'\\]; valid groups"):
        net.prune(variables, {"nope": [0]})
    with pytest.raises(ValueError, match="unknown groups \\['nope'\\]; valid groups"):
        net.apply(variables, _x(), gates={"nope": jnp.ones(3)})
    with pytest.raises(ValueError, match=f"group '{first}': keep indices must lie in"):
        net.prune(variables, {first: np.arange(n + 1)})
    with pytest.raises(ValueError, match="has shape"):
        net.apply(variables, _x(), gates={first: jnp.ones(n + 1)})
    with pytest.raises(ValueError, match="another network"):
        net.prune(jax.tree.map(lambda a: a[..., :1], variables), {})
