"""Every importance criterion and the adaptive/uniform selection run on traced networks (linen and
NNX): scores have the groups' structure, and the selected keep sets prune to the budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import importance, select
from tests import trace_models as tm

X_SHAPE = (4, 16, 16, 3)


@pytest.fixture(scope="module")
def linen_net():
    model = tm.Inception()  # concat of branches: weight criteria read each branch's kernel
    x = jax.random.normal(jax.random.key(1), X_SHAPE)
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    batches = [(x, jnp.arange(X_SHAPE[0]) % 10)]
    return jp.trace(model.apply, variables, x), variables, batches


# fsabp features mode and gfi's activation signal read producer outputs through flax's
# capture_intermediates of the zoo's modules: not available on a traced network.
CRITERIA = ["gfi", "taylor_fo_bn", "l1", "l2", "fpgm", "random", "fsabp", "oracle"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criterion_runs_on_traced_linen(linen_net, criterion):
    net, variables, batches = linen_net
    scores = importance.CRITERIA[criterion](net, variables, batches)
    assert list(scores) == list(net.groups)
    for g, n in net.groups.items():
        assert np.shape(scores[g]) == (n,) and np.all(np.isfinite(np.asarray(scores[g])))


def test_oracle_is_the_pruned_loss_increase(linen_net):
    """The gate at a channel removes it exactly: oracle's score = loss of the pruned network."""
    net, variables, batches = linen_net
    scores = importance.oracle(net, variables, batches)
    group, (x, y) = next(iter(net.groups)), batches[0]
    keep = {group: np.arange(1, net.groups[group])}
    apply2, variables2 = net.prune(variables, keep)

    def loss(logits):
        return importance.cross_entropy(logits, y)

    increase = loss(apply2(variables2, x)) - loss(jax.jit(net.apply)(variables, x))
    np.testing.assert_allclose(scores[group][0], increase, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("policy", ["adaptive", "uniform"])
def test_selection_prunes_to_the_budget(linen_net, policy):
    net, variables, batches = linen_net
    scores = importance.l1(net, variables)
    if policy == "adaptive":
        keep = select.adaptive(net, scores, macs_ratio=0.5, normalize="mean")
    else:
        keep = select.uniform(net, scores, macs_ratio=0.5)
    apply2, variables2 = net.prune(variables, keep)
    x = batches[0][0]
    ratio = jp.count_macs(jp.trace(apply2, variables2, x)) / jp.count_macs(net)
    assert 0.4 < ratio <= 0.5 + 1e-9


@pytest.mark.slow
def test_criteria_run_on_traced_nnx():
    module = tm.NMobileNetV2(nnx.Rngs(0))  # depthwise convs: a group spans them
    module.eval()
    x = jax.random.normal(jax.random.key(1), X_SHAPE)
    net = jp.trace(module, x)
    variables = net.variables(module)
    batches = [(x, jnp.arange(X_SHAPE[0]) % 10)]
    for criterion in ("gfi", "taylor_fo_bn", "l1", "fpgm"):
        scores = importance.CRITERIA[criterion](net, variables, batches)
        assert {g: np.shape(s) for g, s in scores.items()} == {
            g: (n,) for g, n in net.groups.items()
        }
    keep = select.adaptive(net, scores, params_ratio=0.6, normalize="mean")
    small = net.prune(module, keep)
    assert jp.count_params(jp.trace(small, x)) <= 0.6 * jp.count_params(net) * 1.02


@pytest.mark.slow
def test_second_order_gfi_runs_on_a_traced_net():
    """GFI's order=2 differentiates the gated program twice (forward over reverse, vmapped)."""
    model = tm.FlattenNet()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = tm.random_variables(jax.jit(model.init)(jax.random.key(0), x))
    net = jp.trace(model.apply, variables, x)
    scores = importance.gfi(net, variables, [(x, jnp.arange(4) % 10)], order=2)
    assert {g: s.shape for g, s in scores.items()} == {g: (n,) for g, n in net.groups.items()}
