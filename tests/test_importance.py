"""Importance criteria: structure, jit, exact definitions, ranking quality against the oracle."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import F32_EPS, assert_close_in_ulps, pass_ulps, random_variables, tiny_resnet

import jaxprune as jp
from jaxprune import importance as imp
from jaxprune.importance import filters as filter_module
from jaxprune.importance import gates

gfi_module = importlib.import_module("jaxprune.importance.gfi")  # `importance.gfi` is the function

ARCHS = {"lenet5": lambda: jp.models.create("lenet5"), "tiny_resnet": tiny_resnet}


# Terms of a gate's gradient sum: a batch's images x positions (tiny_resnet's stage 1 is 8x8).
TINY_GATE_TERMS = 4 * 8 * 8


def batches_for(arch, count=2, size=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(size, *arch.input_shape)), jnp.float32),
            jnp.asarray(rng.integers(0, arch.num_classes, size), jnp.int32),
        )
        for _ in range(count)
    ]


VARIANTS = {
    "gfi": imp.gfi,
    "gfi_batch": functools.partial(imp.gfi, accumulate="batch"),
    "gfi_order2": functools.partial(imp.gfi, order=2),
    "gfi_activation": functools.partial(imp.gfi, signal="activation"),
    "taylor_fo_bn": imp.taylor_fo_bn,
    "l1": imp.l1,
    "l2": imp.l2,
    "fpgm": imp.fpgm,
    "fpgm_sum": functools.partial(imp.fpgm, center="sum_of_distances"),
    "random": imp.random,
    "fsabp": imp.fsabp,
    "fsabp_features_cosine": functools.partial(imp.fsabp, mode="features", distance="cosine"),
    "oracle": imp.oracle,
}


def test_registry_names_every_criterion():
    """Every criterion is reachable as a method; every method's criterion is a criterion."""
    registered = {m.criterion for m in jp.methods.METHODS.values()}
    assert set(imp.CRITERIA.values()) <= registered
    assert set(imp.CRITERIA) <= set(jp.methods.METHODS)
    with pytest.raises(ValueError, match="valid methods: gfi, gfi_ap_authors"):
        jp.methods.get("gfi-ap")


def _slow(names, slow):
    """``names`` as parameters, those in ``slow`` for the slow tier only (variants of a criterion
    the fast tier runs, or criteria it runs elsewhere)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


@pytest.mark.parametrize("variant", _slow(VARIANTS, {"gfi_order2", "gfi_batch", "fpgm_sum"}))
def test_structure_under_jit(variant):
    """Every criterion runs under an outer jax.jit and returns the groups' structure."""
    arch = jp.models.create("lenet5")
    criterion = VARIANTS[variant]
    images, labels = batches_for(arch, count=1)[0]
    scores = jax.jit(lambda v, x, y: criterion(arch, v, [(x, y)]))(
        random_variables(arch), images, labels
    )
    assert set(scores) == set(jp.groups(arch))
    for group, n in jp.groups(arch).items():
        assert scores[group].shape == (n,) and scores[group].dtype == jnp.float32
        assert np.all(np.isfinite(scores[group]))


@pytest.mark.parametrize("name", _slow(imp.CRITERIA, {"random", "l2", "fsabp"}))
def test_structure_on_residual_groups(name):
    """Eagerly, on every kind of residual group; keys in the groups' forward order."""
    arch = tiny_resnet()
    scores = imp.CRITERIA[name](arch, random_variables(arch), batches_for(arch))
    assert {g: s.shape for g, s in scores.items()} == {g: (n,) for g, n in jp.groups(arch).items()}
    assert list(scores) == list(jp.groups(arch))


@pytest.mark.parametrize("name", list(ARCHS))
def test_oracle_equals_python_loop(name):
    arch = ARCHS[name]()
    variables = random_variables(arch, seed=3)
    batches = batches_for(arch, count=2)
    model = arch.module()

    @jax.jit
    def loss(gates, images, labels):
        logits = model.apply(variables, images, train=False, gates=gates)
        return imp.cross_entropy(logits, labels)

    expected = {}
    for group, n in jp.groups(arch).items():
        increases = np.zeros(n)
        for c in range(n):
            for images, labels in batches:
                ones = gates.ones_gates(arch)
                removed = {**ones, group: ones[group].at[c].set(0.0)}
                increases[c] += float(loss(removed, images, labels) - loss(ones, images, labels))
        expected[group] = increases / len(batches)
    got = imp.oracle(arch, variables, batches)  # LeNet: 226 channels, chunks of 32 and a rest
    # Each entry is a difference of two float32 losses (~2.3) computed by differently fused
    # programs: each loss carries rounding of a few ulps of its magnitude whatever the CPU's
    # kernels, so the bound is in ulps of the loss, not an absolute 1e-6 (which an AVX-512 CPU
    # exceeded by 2x). 32 ulps of the largest loss covers reductions over the batch and logits.
    loss_scale = max(float(loss(gates.ones_gates(arch), x, y)) for x, y in batches)
    atol = 32 * np.finfo(np.float32).eps * loss_scale
    for group in expected:
        np.testing.assert_allclose(got[group], expected[group], rtol=1e-4, atol=atol)


@pytest.mark.slow  # compiles second-order programs
def test_second_order_structured_equals_forward_over_reverse():
    """The fast diagonal (Gauss-Newton + forward-over-forward on repeated gates) is exact."""
    arch = tiny_resnet()
    variables = random_variables(arch, seed=4)
    batches = batches_for(arch)
    fast = imp.gfi(arch, variables, batches, order=2)
    reference = imp.gfi(arch, variables, batches, order=2, diagonal="forward_over_reverse")
    for group in fast:
        # Forward, backward and a forward-mode pass over them, then the sum over the gate's terms.
        ulps = 3 * pass_ulps(variables) + np.sqrt(TINY_GATE_TERMS)
        assert_close_in_ulps(fast[group], reference[group], ulps)


def test_gfi_gradient_definitions():
    """batch: mean_b |dL_b/dg|; example: the same over one-example batches."""
    arch = tiny_resnet()
    variables = random_variables(arch, seed=5)
    batches = batches_for(arch)
    grads = [gates.gate_gradients(arch, variables, x, y, imp.cross_entropy) for x, y in batches]
    per_batch = imp.gfi(arch, variables, batches, accumulate="batch")
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(4)]
    per_example = imp.gfi(arch, variables, batches, accumulate="example")
    single_batches = imp.gfi(arch, variables, singles, accumulate="batch")
    ulps = 2 * pass_ulps(variables) + np.sqrt(TINY_GATE_TERMS)  # forward, backward, the sum
    for group in per_batch:
        expected = np.mean([np.abs(g[group]) for g in grads], axis=0)
        assert_close_in_ulps(per_batch[group], expected, ulps)
        assert_close_in_ulps(per_example[group], single_batches[group], ulps)


def test_taylor_fo_bn_equals_batchnorm_parameter_form():
    """(gamma dL/dgamma + beta dL/dbeta)^2 for a group with one BatchNorm (Molchanov et al.)."""
    arch = tiny_resnet()
    variables = random_variables(arch, seed=6)
    batches = batches_for(arch)
    group = "stage2/block1/conv1"

    @jax.jit
    def bn_taylor(images, labels):
        def loss(params):
            logits = arch.module().apply({**variables, "params": params}, images, train=False)
            return imp.cross_entropy(logits, labels)

        grads = jax.grad(loss)(variables["params"])["stage2"]["block1"]["bn1"]
        bn = variables["params"]["stage2"]["block1"]["bn1"]
        return (bn["scale"] * grads["scale"] + bn["bias"] * grads["bias"]) ** 2

    expected = np.mean([bn_taylor(x, y) for x, y in batches], axis=0)
    got = imp.taylor_fo_bn(arch, variables, batches)[group]
    # A gradient (forward, backward, the sum over positions), squared: twice its relative error.
    assert_close_in_ulps(got, expected, 2 * (2 * pass_ulps(variables) + np.sqrt(TINY_GATE_TERMS)))


def test_accumulator_reuses_the_train_step_backward_pass():
    """Gate gradients from a (params, gates) backward pass accumulate to gfi(accumulate=batch)."""
    arch = tiny_resnet()
    variables = random_variables(arch, seed=7)
    batches = batches_for(arch)
    model = arch.module()

    @jax.jit
    def train_step(params, state, images, labels):
        def loss_fn(p, gates):
            logits = model.apply({**variables, "params": p}, images, train=False, gates=gates)
            return imp.cross_entropy(logits, labels)

        _, (param_grads, gate_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
            params, gates.ones_gates(arch)
        )
        del param_grads  # an optimizer would use these
        return gfi_module.gfi_accumulator_update(state, gate_grads)

    state = gfi_module.gfi_accumulator_init(arch)
    for images, labels in batches:
        state = train_step(variables["params"], state, images, labels)
    assert int(state.num_steps) == 2
    got = gfi_module.gfi_accumulator_scores(state)
    expected = imp.gfi(arch, variables, batches, accumulate="batch")
    ulps = 2 * pass_ulps(variables) + np.sqrt(TINY_GATE_TERMS)  # forward, backward, the sum
    for group in expected:
        assert_close_in_ulps(got[group], expected[group], ulps)
    with pytest.raises(ValueError, match="groups"):
        gfi_module.gfi_accumulator_update(state, {"conv1": jnp.ones(6)})


def test_activation_signal_is_the_authors_class_max():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch, seed=8)
    batches = batches_for(arch, count=2, size=10)
    images = jnp.concatenate([x for x, _ in batches])
    labels = np.concatenate([np.asarray(y) for _, y in batches])
    _, state = arch.module().apply(
        variables, images, capture_intermediates=True, mutable=["intermediates"]
    )
    got = imp.gfi(arch, variables, batches, signal="activation")
    for group in ("conv1", "conv2", "fc1"):
        y = np.asarray(state["intermediates"][group]["__call__"][0])  # conv + bias, pre-gate
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        per_class = [np.abs(y[labels == k].mean(axis=0)).mean(axis=0) for k in np.unique(labels)]
        # A forward pass, then class means over at most 20 images x 28x28 positions.
        ulps = pass_ulps(variables) + np.sqrt(20 * 28 * 28)
        assert_close_in_ulps(got[group], np.max(per_class, axis=0), ulps)


@pytest.mark.parametrize("mode", ["weights", "features"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("group", ["conv2", "fc1"])
def test_fsabp_planted_duplicate_scores_lowest(mode, distance, group):
    arch = jp.models.create("lenet5")
    variables = random_variables(arch, seed=9)
    layer = variables["params"][group]
    a, b = 3, 11
    kernel = layer["kernel"].at[..., b].set(layer["kernel"][..., a])
    bias = layer["bias"].at[b].set(layer["bias"][a])
    planted = {"params": {**variables["params"], group: {"kernel": kernel, "bias": bias}}}
    scores = np.asarray(
        imp.fsabp(arch, planted, batches_for(arch), mode=mode, distance=distance)[group]
    )
    assert set(np.argsort(scores)[:2]) == {a, b}
    # Distances come from a Gram matrix (|f|^2 + |g|^2 - 2 f.g), which cancels for equal filters:
    # a few ulps of |f|^2 are left, so about sqrt(ulps) of the distances' scale.
    assert np.all(np.abs(scores[[a, b]]) <= np.sqrt(64 * F32_EPS) * scores.max())
    assert np.sort(scores)[2] > 10 * max(scores[a], scores[b], 1e-6)


def test_norms_concatenate_the_producers_of_a_stage_group():
    arch = tiny_resnet()
    variables = random_variables(arch, seed=10)
    p = variables["params"]
    kernels = [p["stem_conv"]["kernel"], p["stage1"]["block1"]["conv2"]["kernel"]]
    flat = np.concatenate([np.asarray(k).reshape(-1, k.shape[-1]) for k in kernels], axis=0)
    # Sums of len(flat) positive float32 terms: at most len(flat) roundings, relative to the sum.
    rtol = len(flat) * F32_EPS
    np.testing.assert_allclose(imp.l1(arch, variables)["stage1"], np.abs(flat).sum(0), rtol=rtol)
    np.testing.assert_allclose(
        imp.l2(arch, variables)["stage1"], np.linalg.norm(flat, axis=0), rtol=rtol
    )


def test_fpgm_geometric_median_and_sum_of_distances():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch, seed=11)
    filters = np.asarray(filter_module.filter_matrix(arch, variables, "conv2"), np.float64)
    distances = np.linalg.norm(filters[:, None] - filters[None], axis=-1)
    summed = imp.fpgm(arch, variables, center="sum_of_distances")["conv2"]
    # The Gram matrix (sums of a filter's weights), then each filter's sum over the others.
    num_filters, filter_size = filters.shape
    assert_close_in_ulps(summed, distances.sum(1), np.sqrt(filter_size) + np.sqrt(num_filters))
    to_median = np.asarray(imp.fpgm(arch, variables)["conv2"], np.float64)
    # The geometric median minimises the summed distance: no filter or the mean does better.
    mean_sum = np.linalg.norm(filters - filters.mean(0), axis=1).sum()
    rounding = (np.sqrt(filter_size) + np.sqrt(num_filters)) * F32_EPS  # as above, relative
    assert to_median.sum() <= min(distances.sum(1).min(), mean_sum) * (1 + rounding)


def test_random_is_seeded():
    arch = jp.models.create("lenet5")
    a, b, c = imp.random(arch, seed=1), imp.random(arch, seed=1), imp.random(arch, seed=2)
    assert all(np.array_equal(a[g], b[g]) for g in a)
    assert not np.array_equal(a["fc1"], c["fc1"])


def test_agreement_and_spearman():
    rng = np.random.default_rng(0)
    reference = {"a": rng.normal(size=8), "b": rng.normal(size=5)}
    same = imp.agreement({g: np.exp(s) for g, s in reference.items()}, reference)
    assert same.pooled == pytest.approx(1.0) and all(
        v == pytest.approx(1.0) for v in same.per_group.values()
    )
    reversed_ = imp.agreement({g: -s for g, s in reference.items()}, reference)
    assert reversed_.pooled == pytest.approx(-1.0)
    assert np.isnan(imp.spearman(np.ones(4), np.arange(4)))
    with pytest.raises(ValueError, match="groups differ"):
        imp.agreement({"a": reference["a"]}, reference)


def test_bad_requests_raise():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    with pytest.raises(ValueError, match="batches"):
        imp.gfi(arch, variables)
    with pytest.raises(ValueError, match="empty"):
        imp.oracle(arch, variables, [])
    with pytest.raises(ValueError):
        imp.gfi(arch, variables, batches_for(arch), signal="hessian")
    with pytest.raises(ValueError, match="order"):
        imp.gfi(arch, variables, batches_for(arch), order=3)
    with pytest.raises(ValueError, match="order=2"):
        imp.gfi(arch, variables, batches_for(arch), order=2, signal="activation")
    with pytest.raises(ValueError):
        imp.fsabp(arch, variables, mode="gradients")


@pytest.mark.slow
def test_lenet_fashion_mnist_ranking_against_the_oracle(fashion_lenet):
    """Briefly trained LeNet-5: GFI ranks like |oracle|, second-order GFI like the signed oracle."""
    arch, variables = fashion_lenet["arch"], fashion_lenet["variables"]
    batches = fashion_lenet["score_batches"]
    oracle = imp.oracle(arch, variables, batches)
    magnitude = {g: jnp.abs(o) for g, o in oracle.items()}
    results = {}
    for name, criterion in VARIANTS.items():
        if name in ("oracle", "fpgm_sum", "fsabp_features_cosine"):
            continue
        scores = criterion(arch, variables, batches)
        signed = imp.agreement(scores, oracle)
        absolute = imp.agreement(scores, magnitude)
        results[name] = (absolute.pooled, signed.pooled)
        per_group = ", ".join(f"{g} {r:+.2f}" for g, r in absolute.per_group.items())
        print(
            f"spearman {name:22s} pooled vs |oracle| {absolute.pooled:+.3f}, vs oracle "
            f"{signed.pooled:+.3f}; per group vs |oracle|: {per_group}"
        )
    assert results["gfi"][0] >= 0.75
    assert results["gfi_order2"][1] >= 0.9
    assert results["random"][0] < results["gfi"][0]


def _conv3x3_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """f64 3x3 stride-1 convolution with padding 1: [N, H, W, I] x [3, 3, I, O] -> [N, H, W, O]."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwi,io->nhwo", padded[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
    return out


def test_gfi_ap_authors_score_is_their_formula_by_hand():
    """Conv output before BatchNorm (BN in train mode upstream), class means over all images,
    |class mean| averaged over space, maximum over classes: ``pruning_API.py``'s score."""
    arch = jp.models.VGGArch(
        stages=((3,), (4,)), dense_width=5, num_classes=3, input_shape=(6, 6, 2), name="tiny_vgg"
    )
    variables = random_variables(arch, seed=7)
    rng = np.random.default_rng(0)
    batches = [
        (rng.normal(size=(9, 6, 6, 2)).astype(np.float32), rng.integers(0, 3, 9)) for _ in range(2)
    ]
    got = jp.methods.get("gfi_ap_authors").score(arch, variables, batches)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    outputs = {"conv1": [], "conv2": []}
    for images, _ in batches:
        y1 = _conv3x3_same(images.astype(np.float64), p["conv1"]["kernel"])
        mean, var = y1.mean(axis=(0, 1, 2)), y1.var(axis=(0, 1, 2))  # this batch's statistics
        z = (y1 - mean) / np.sqrt(var + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
        z = np.maximum(z, 0).reshape(9, 3, 2, 3, 2, 3).max(axis=(2, 4))  # 2x2 max-pool
        outputs["conv1"].append(y1)
        outputs["conv2"].append(_conv3x3_same(z, p["conv2"]["kernel"]))
    labels = np.concatenate([y for _, y in batches])
    for group, maps in outputs.items():
        y = np.concatenate(maps)
        class_means = np.stack([y[labels == k].mean(axis=0) for k in range(3)])  # [K, H, W, C]
        expected = np.abs(class_means).mean(axis=(1, 2)).max(axis=0)
        # f32 convolutions of O(20) terms, then means: a few ulps of the activations' scale.
        np.testing.assert_allclose(got[group], expected, rtol=1e-5, atol=1e-6 * np.abs(y).max())
    assert set(got) == {"conv1", "conv2", "fc1"}
