"""Every importance criterion and selection policy runs on traced networks (linen and NNX).

Criteria: every method of `jaxprune.methods.METHODS` (and the feature/activation variants) gives
finite scores of each traced group's shape; the feature and activation criteria equal a hand
computation; weight criteria read each kernel once. Policies: each one's keep set prunes the
traced network, and the pruned network equals the gated one; the sequential policies go in
program order.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import importance, methods, select
from tests import trace_models as tm

X_SHAPE = (4, 32, 32, 3)  # NFlattenNet's first dense layer is sized for 32x32 inputs
LINEN_TRAIN = {"train": True, "mutable": ["batch_stats"]}
# `gfi_ap_authors` scores in train mode: linen nets are traced with LINEN_TRAIN for it
CRITERIA = {
    **{name: m.score for name, m in methods.METHODS.items()},
    "fsabp_features": functools.partial(importance.fsabp, mode="features"),
    "gfi_activation_eval": functools.partial(importance.gfi, signal="activation"),
}
# The fast tier runs the criteria and policies on one traced net (linen, with a concat); the nnx
# frontend and the other net are the slow tier's (test_trace covers nnx tracing in the fast tier).
CASES = [
    ("linen", "inception"),
    pytest.param(("nnx", "inception"), marks=pytest.mark.slow),
    pytest.param(("linen", "flatten"), marks=pytest.mark.slow),
    pytest.param(("nnx", "flatten"), marks=pytest.mark.slow),
]


def _x(seed=1, shape=X_SHAPE):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _traced(kind, name, x):
    """(net, variables as the criteria take them, runnable model) with random variables."""
    if kind == "linen":
        model = tm.LINEN[name]()
        variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
        net = jp.trace(model.apply, variables, x, train_kwargs=LINEN_TRAIN)
        return net, variables, functools.partial(model.apply, variables)
    module = tm.NNX[name](nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    module = nnx.merge(graphdef, tm.random_variables(state))
    module.eval()
    net = jp.trace(module, x)
    return net, net.variables(module), module


@pytest.fixture(scope="module", params=CASES, ids="-".join)
def case(request):
    x = _x()
    net, variables, _ = _traced(*request.param, x)
    return net, variables, [(x, jnp.arange(X_SHAPE[0]) % 10)]


def _gates(groups, keep):
    return {g: jnp.zeros(n).at[np.asarray(keep[g])].set(1.0) for g, n in groups.items()}


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# -------------------------------------------------------------------------------- criteria


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_criterion_scores_every_traced_group(case, criterion):
    net, variables, batches = case
    scores = CRITERIA[criterion](net, variables, batches=batches)
    assert list(scores) == list(net.groups)
    for g, n in net.groups.items():
        assert np.shape(scores[g]) == (n,), g
        finite = np.isfinite(np.asarray(scores[g]))
        # FSABP's nearest-other-filter distance is +inf for a group of one channel only
        assert finite.all() or (criterion.startswith("fsabp") and n == 1), (g, scores[g])


@pytest.mark.slow
def test_weight_criteria_read_each_kernel_once():
    """L1 of a traced group = the summed |kernel| of its one producer, also for a conv that
    reads a concatenation (its layer is described once per input segment)."""
    model, x = tm.Inception(), _x(shape=(2, 16, 16, 3))
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net = jp.trace(model.apply, variables, x)
    scores = importance.l1(net, variables)
    for g in net.groups:  # Inception's groups are named after their one conv
        kernel = np.asarray(variables["params"][g]["kernel"], np.float64)
        # float32 sums of <= 90 terms of O(1): ~1e-6 relative
        np.testing.assert_allclose(scores[g], np.abs(kernel).sum(axis=(0, 1, 2)), rtol=1e-5)


class _TwoConvs(nn.Module):
    """conv (bias) -> BN -> relu -> conv (bias) -> BN -> relu -> mean -> dense."""

    @nn.compact
    def __call__(self, x, train=False):
        for i, features in enumerate((5, 6)):
            x = nn.Conv(features, (3, 3), name=f"conv{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x))
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def _conv_outputs(model, variables, x, train):
    """Each conv's output (bias included) for the batch, by flax's own capture: f64[N, H*W, C]."""
    _, state = model.apply(
        variables,
        x,
        train=train,
        capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
        mutable=["intermediates", "batch_stats"],
    )
    out = {}
    for name in ("conv0", "conv1"):
        y = np.asarray(state["intermediates"][name]["__call__"][0], np.float64)
        out[name] = y.reshape(y.shape[0], -1, y.shape[-1])
    return out


# The fast tier: the traced signal equals the zoo's (test_trace_zoo), checked by hand there
# (test_importance).
@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_gfi_activation_equals_hand_computation(train):
    """GFI-AP's activation signal on a traced net: max over classes of the spatial mean of the
    |class mean| of each conv's output, BatchNorm in eval or train mode."""
    model, x = _TwoConvs(), _x(shape=(6, 8, 8, 3))
    labels = jnp.array([0, 2, 2, 5, 0, 2])
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net = jp.trace(model.apply, variables, x, train_kwargs=LINEN_TRAIN)
    mode = "train" if train else "eval"
    scores = importance.gfi(net, variables, [(x, labels)], signal="activation", batch_norm=mode)
    for group, y in _conv_outputs(model, variables, x, train).items():
        means = [y[np.asarray(labels) == k].mean(axis=0) for k in (0, 2, 5)]  # [H*W, C] each
        expected = np.max([np.abs(m).mean(axis=0) for m in means], axis=0)
        # float32 convs (27-54 products of O(1)) and means: ~1e-6 relative; 1e-5 leaves margin
        np.testing.assert_allclose(scores[group], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_fsabp_features_finds_duplicate_filters(kind):
    """Two identical filters make identical feature maps: their distance is 0, the lowest."""
    x = _x(shape=(2, 32, 32, 3))
    net, variables, _ = _traced(kind, "flatten", x)
    group = next(iter(net.groups))  # the first conv: its input is the image, same for both
    conv = variables["params"][group]
    kernel = conv["kernel"].at[..., 1].set(conv["kernel"][..., 0])
    bias = conv["bias"].at[1].set(conv["bias"][0])
    params = {**variables["params"], group: {**conv, "kernel": kernel, "bias": bias}}
    variables = {**variables, "params": params}
    scores = np.asarray(
        importance.fsabp(net, variables, [(x, jnp.zeros(2, jnp.int32))], mode="features")[group]
    )
    assert set(np.argsort(scores)[:2]) == {0, 1}
    # root-mean-square difference of maps of O(1) computed alike: only rounding, < 1e-3
    assert scores[0] < 1e-3 and scores[1] < 1e-3 and scores[2:].min() > 0.05, scores


def test_train_mode_needs_train_kwargs():
    model, x = _TwoConvs(), _x(shape=(2, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    net = jp.trace(model.apply, variables, x)
    with pytest.raises(ValueError, match="train_kwargs"):
        methods.METHODS["gfi_ap_authors"].score(net, variables, [(x, jnp.zeros(2, int))])


@pytest.mark.slow  # one forward pass per channel
def test_oracle_is_the_pruned_loss_increase():
    """The gate at a channel removes it exactly: oracle's score = loss of the pruned network."""
    model, x = tm.Inception(), _x(shape=(4, 16, 16, 3))
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net, y = jp.trace(model.apply, variables, x), jnp.arange(4) % 10
    scores = importance.oracle(net, variables, [(x, y)])
    group = next(iter(net.groups))
    apply2, variables2 = net.prune(variables, {group: np.arange(1, net.groups[group])})

    def loss(logits):
        return importance.cross_entropy(logits, y)

    increase = loss(apply2(variables2, x)) - loss(jax.jit(net.apply)(variables, x))
    np.testing.assert_allclose(scores[group][0], increase, rtol=1e-3, atol=1e-5)


# -------------------------------------------------------------------------------- policies


def test_mask_equals_gated(case):
    """Channels masked in the parameters compute what their gates at zero compute."""
    net, variables, batches = case
    x = batches[0][0]
    apply = jax.jit(lambda v, g: net.apply(v, x, gates=g))
    for g, n in net.groups.items():
        channels = np.arange(0, n, 2)
        gates = {g: jnp.ones(n).at[channels].set(0.0)}
        masked = net.mask(variables, g, channels)
        # float32 sums of O(100) terms either way: ~1e-6 relative
        assert _rel_err(apply(masked, {}), apply(variables, gates)) < 1e-5, g


def _evaluate(batches):
    """Agreement with the starting network's predictions (its accuracy is 1 by definition)."""
    x = batches[0][0]
    reference = None

    def evaluate(arch, variables):
        nonlocal reference
        predictions = jnp.argmax(arch.apply(variables, x), axis=-1)
        if reference is None:
            reference = predictions
        return float(jnp.mean(predictions == reference))

    return evaluate


def _keep_sets(policy, net, variables, batches):
    """(keep set on the starting network, PruneResult or None) for one policy."""
    scores = importance.l1(net, variables)
    budget = select.Budget("macs", 0.5)
    if policy in ("adaptive", "uniform", "threshold"):
        budget = select.Budget("filters", 0.6) if policy == "threshold" else budget
        return methods.METHODS["l1"].select(net, scores, budget, policy=policy), None
    if policy == "iterative":
        result = select.iterative(net, variables, importance.l1, 2, budget=budget)
    else:  # tolerance 1: any accuracy goes, so every conv group ends at one channel
        procedure = select.backward if policy == "backward" else select.forward
        result = procedure(net, variables, importance.l1, _evaluate(batches), 1.0)
    return result.keep, result


POLICIES = [
    "adaptive",
    "uniform",
    "threshold",
    "backward",
    pytest.param("forward", marks=pytest.mark.slow),  # backward's procedure, in the other order
    "iterative",
]


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_keep_set_prunes_and_pruned_equals_gated(case, policy):
    net, variables, batches = case
    x = batches[0][0]
    keep, result = _keep_sets(policy, net, variables, batches)
    full = net.full_keep(keep)
    assert any(len(full[g]) < n for g, n in net.groups.items())
    gated = jax.jit(lambda v, g: net.apply(v, x, gates=g))(variables, _gates(net.groups, full))
    if net.kind == "nnx":
        pruned = net.prune(variables, keep)(x)  # a narrower nnx.Module
    else:
        apply2, variables2 = net.prune(variables, keep)
        pruned = jax.jit(apply2)(variables2, x)
    assert _rel_err(pruned, gated) < 1e-4  # float32, O(100)-term sums: ~1e-6
    if result is None:
        return
    assert list(result.arch.groups) == list(net.groups)
    assert result.arch.groups == {g: len(k) for g, k in full.items()}
    assert _rel_err(result.arch.apply(result.variables, x), gated) < 1e-4
    if policy == "iterative":
        ratio = jp.count_macs(result.arch) / jp.count_macs(net)
        assert 0.35 < ratio <= 0.5 + 1e-9, ratio
    else:
        order = select.conv_groups(net)
        assert [step.group for step in result.log] == (
            order[::-1] if policy == "backward" else order
        )
        assert all(step.channels_kept == 1 for step in result.log)


@pytest.mark.slow  # the fast tier checks the order in the backward policy test above
def test_backward_order_is_reverse_program_order():
    """Inception's convs in the order its code runs them; backward goes from `mix` to `stem`."""
    model, x = tm.Inception(), _x(shape=(2, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    net = jp.trace(model.apply, variables, x)
    code_order = ["stem", "branch1x1", "branch3x3_reduce", "branch3x3", "branch_pool", "mix"]
    assert select.conv_groups(net) == [f"{b}_conv" for b in code_order]


@pytest.mark.slow
def test_criteria_run_on_traced_nnx_mobilenet():
    module = tm.NMobileNetV2(nnx.Rngs(0))  # depthwise convs: a group spans them
    module.eval()
    x = _x(shape=(4, 16, 16, 3))
    net = jp.trace(module, x)
    variables = net.variables(module)
    batches = [(x, jnp.arange(4) % 10)]
    for criterion in CRITERIA:
        scores = CRITERIA[criterion](net, variables, batches=batches)
        assert {g: np.shape(s) for g, s in scores.items()} == {
            g: (n,) for g, n in net.groups.items()
        }
    keep = select.adaptive(net, importance.l1(net, variables), params_ratio=0.6, normalize="mean")
    small = net.prune(module, keep)
    assert jp.count_params(jp.trace(small, x)) <= 0.6 * jp.count_params(net) * 1.02


@pytest.mark.slow
def test_second_order_gfi_runs_on_a_traced_net():
    """GFI's order=2 differentiates the gated program twice (forward over reverse, vmapped)."""
    model = tm.FlattenNet()
    x = _x(shape=(4, 32, 32, 3))
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net = jp.trace(model.apply, variables, x)
    scores = importance.gfi(net, variables, [(x, jnp.arange(4) % 10)], order=2)
    assert {g: s.shape for g, s in scores.items()} == {g: (n,) for g, n in net.groups.items()}
