"""Selection policies: budgets land, widths are legal, impossible requests are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_in_ulps, pass_ulps, random_variables, tiny_resnet

import jaxprune as jp
from jaxprune import importance as imp
from jaxprune import select


def skewed_scores(arch, seed=0) -> dict[str, np.ndarray]:
    """Random scores whose scale differs by group, so a global ranking prunes unevenly."""
    rng = np.random.default_rng(seed)
    sizes = jp.groups(arch)
    return {g: rng.normal(size=n) + rng.uniform(0, 3) for g, n in sizes.items()}


def widths_of(keep) -> dict[str, int]:
    return {g: len(k) for g, k in keep.items()}


def macs_kept(arch, keep) -> float:
    return jp.count_macs(arch.resize(widths_of(keep))) / jp.count_macs(arch)


@pytest.mark.parametrize("name", ["resnet56", "resnet50"])
@pytest.mark.parametrize("round_to", [1, 8])
def test_adaptive_lands_on_macs_budget_non_uniformly(name, round_to):
    arch = jp.models.create(name)
    sizes = jp.groups(arch)
    keep = select.adaptive(arch, skewed_scores(arch), macs_ratio=0.5, round_to=round_to)
    assert 0.49 <= macs_kept(arch, keep) <= 0.5
    fractions = np.array([len(keep[g]) / n for g, n in sizes.items()])
    assert fractions.std() > 0.05  # non-uniform
    for g, n in sizes.items():
        assert len(keep[g]) == n or len(keep[g]) % round_to == 0
        assert np.all(np.diff(keep[g]) > 0)


def test_adaptive_removes_lowest_scores_first():
    arch = jp.models.create("resnet56")
    scores = skewed_scores(arch, seed=1)
    keep = select.adaptive(arch, scores, filters_ratio=0.6)  # exact: nothing to re-add
    kept = np.concatenate([scores[g][keep[g]] for g in scores])
    removed = np.concatenate([np.delete(scores[g], keep[g]) for g in scores])
    assert removed.max() <= kept.min()


def test_adaptive_skips_a_removal_that_overshoots():
    """LeNet-5: one conv1 channel is 14% of the MACs; the lowest-first prefix lands far under."""
    arch = jp.models.create("lenet5")
    scores = skewed_scores(arch)
    scores["conv1"] = scores["conv1"] - 100.0
    landed = select.adaptive(arch, scores, macs_ratio=0.5)
    assert 0.49 <= macs_kept(arch, landed) <= 0.5
    strict = select.adaptive(arch, scores, macs_ratio=0.5, tolerance=1.0)
    kept = np.concatenate([scores[g][strict[g]] for g in scores])
    removed = np.concatenate([np.delete(scores[g], strict[g]) for g in scores])
    assert removed.max() <= kept.min() and macs_kept(arch, strict) <= 0.5


@pytest.mark.parametrize("budget", ["params_ratio", "filters_ratio"])
def test_adaptive_params_and_filters_budgets(budget):
    arch = jp.models.create("resnet56")
    keep = select.adaptive(arch, skewed_scores(arch), **{budget: 0.4})
    pruned = arch.resize(widths_of(keep))
    if budget == "params_ratio":
        kept = jp.count_params(pruned) / jp.count_params(arch)
    else:
        kept = sum(jp.groups(pruned).values()) / sum(jp.groups(arch).values())
    assert 0.39 <= kept <= 0.4


def test_adaptive_never_empties_a_group_and_honours_min_keep():
    arch = jp.models.create("lenet5")
    scores = skewed_scores(arch)
    scores["conv1"] = scores["conv1"] - 100.0  # conv1 would go first and entirely
    keep = select.adaptive(arch, scores, filters_ratio=0.3, min_keep=2)
    assert len(keep["conv1"]) == 2
    assert all(len(k) >= 2 for k in keep.values())


def test_normalize_options():
    scores = {"a": np.array([1.0, 2.0, 2.0]), "b": np.array([3.0, -4.0])}
    l2 = select.normalize_scores(scores, "l2")
    assert np.linalg.norm(l2["b"]) == pytest.approx(1.0)
    assert np.abs(select.normalize_scores(scores, select.Normalize.MAX)["b"]).max() == 1.0
    np.testing.assert_allclose(select.normalize_scores(scores, "rank")["a"], [1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(select.normalize_scores(scores, None)["b"], scores["b"])
    with pytest.raises(ValueError):
        select.normalize_scores(scores, "softmax")


@pytest.mark.parametrize("round_to", [1, 4])
def test_uniform_widths_are_uniform(round_to):
    arch = jp.models.create("resnet56")
    scores = skewed_scores(arch)
    keep = select.uniform(arch, scores, 0.5, round_to=round_to)
    for g, n in jp.groups(arch).items():
        assert len(keep[g]) == n // 2  # 16, 32, 64 -> 8, 16, 32 (multiples of 4 too)
        assert set(keep[g]) == set(np.argsort(scores[g])[n // 2 :])


def test_impossible_requests_are_refused():
    arch = jp.models.create("resnet56")
    scores = skewed_scores(arch)
    for ratios in ({}, {"macs_ratio": 0.5, "params_ratio": 0.5}):
        with pytest.raises(ValueError, match="exactly one"):
            select.adaptive(arch, scores, **ratios)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            select.adaptive(arch, scores, macs_ratio=bad)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            select.uniform(arch, scores, bad)
    with pytest.raises(ValueError, match="impossible"):
        select.adaptive(arch, scores, macs_ratio=0.05, min_keep=8)
    with pytest.raises(ValueError, match="impossible"):
        select.iterative(arch, None, imp.l1, 2, filters_ratio=0.01, round_to=8)
    with pytest.raises(ValueError, match="unknown"):
        select.adaptive(arch, {**scores, "stage9": np.ones(3)}, macs_ratio=0.5)
    with pytest.raises(ValueError, match="missing"):
        select.adaptive(arch, {g: s for g, s in scores.items() if g != "stage1"}, macs_ratio=0.5)
    with pytest.raises(ValueError, match="shape"):
        select.adaptive(arch, {**scores, "stage1": np.ones(3)}, macs_ratio=0.5)
    with pytest.raises(ValueError, match="round_to"):
        select.adaptive(arch, scores, macs_ratio=0.5, round_to=0)
    with pytest.raises(ValueError, match="NaN"):
        select.adaptive(arch, {**scores, "stage1": np.full(16, np.nan)}, macs_ratio=0.5)
    with pytest.raises(ValueError, match="unknown groups"):
        select.backward(arch, None, imp.l1, lambda a, v: 1.0, 0.1, groups_to_prune=["conv9"])
    with pytest.raises(ValueError, match="rounds"):
        select.iterative(arch, None, imp.l1, 0, macs_ratio=0.5)


@pytest.mark.parametrize("name", ["lenet5", "tiny_resnet"])
def test_masked_network_equals_gated_network(name):
    arch = tiny_resnet() if name == "tiny_resnet" else jp.models.create(name)
    variables = random_variables(arch, seed=2)
    group = "stage1" if name == "tiny_resnet" else "conv2"
    drop = np.array([0, 2])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *arch.input_shape)), jnp.float32)
    gates = {group: jnp.ones(jp.groups(arch)[group]).at[drop].set(0.0)}
    apply = jax.jit(arch.module().apply)
    gated = apply(variables, x, gates=gates)
    masked = apply(select.mask_channels(arch, variables, group, drop), x)
    assert_close_in_ulps(masked, gated, pass_ulps(variables))  # two forward passes


def dead_channel_accuracy(start_arch):
    """A stand-in for accuracy: 1 - 0.01 per channel removed or zeroed since ``start_arch``."""
    start = jp.groups(start_arch)

    def evaluate(arch, variables):
        lost = 0
        for group in ("conv1", "conv2"):
            kernel = np.asarray(variables["params"][group]["kernel"])
            live = int(np.sum(np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0) > 0))
            lost += start[group] - live
        return 1.0 - 0.01 * lost

    return evaluate


@pytest.mark.parametrize(
    ("procedure", "round_to", "expected"),
    [
        (select.backward, 1, [("conv2", 16, 11), ("conv1", 6, 6)]),
        (select.forward, 1, [("conv1", 6, 1), ("conv2", 16, 16)]),
        (select.backward, 4, [("conv2", 16, 12), ("conv1", 6, 6)]),
    ],
)
def test_sequential_bisection_stops_at_the_tolerance(procedure, round_to, expected):
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    calls = []

    def finetune(arch, variables):
        calls.append(jp.groups(arch))
        return variables

    result = procedure(
        arch,
        variables,
        imp.l1,
        dead_channel_accuracy(arch),
        tolerance=0.05 + 1e-9,
        finetune=finetune,
        round_to=round_to,
    )
    assert [(s.group, s.channels_before, s.channels_kept) for s in result.log] == expected
    assert all(s.accuracy >= 0.95 - 1e-6 for s in result.log)
    assert len(calls) == sum(s.channels_kept < s.channels_before for s in result.log)
    l1 = imp.l1(arch, variables)
    for group, n, kept in expected:
        assert set(result.keep[group]) == set(np.argsort(l1[group])[n - kept :])
    same_arch, same_variables = jp.prune(arch, variables, result.keep)
    assert same_arch == result.arch
    jax.tree.map(np.testing.assert_array_equal, same_variables, result.variables)


@functools.partial(jax.jit, static_argnums=0)
def logits_of(arch, variables, images):
    return arch.module().apply(variables, images)


@pytest.mark.slow
def test_backward_fsabp_on_trained_lenet(fashion_lenet):
    arch, variables = fashion_lenet["arch"], fashion_lenet["variables"]
    images, labels = fashion_lenet["eval_batch"]

    def evaluate(arch, variables):
        return float(np.mean(np.argmax(logits_of(arch, variables, images), axis=-1) == labels))

    start = evaluate(arch, variables)
    result = select.backward(arch, variables, imp.fsabp, evaluate, tolerance=0.02)
    final = evaluate(result.arch, result.variables)
    print(f"FSABP backward: {start:.4f} -> {final:.4f}, widths {jp.groups(result.arch)}")
    assert final >= start - 0.02
    # masked == pruned, but rounding may flip one image whose two top logits nearly tie.
    assert final == pytest.approx(result.log[-1].accuracy, abs=1 / len(labels))
    assert [s.group for s in result.log] == ["conv2", "conv1"]
    assert jp.count_macs(result.arch) < jp.count_macs(arch)


def test_iterative_rounds_reach_the_budget():
    arch = jp.models.create("lenet5")
    variables = random_variables(arch)
    rounds = []
    result = select.iterative(
        arch,
        variables,
        imp.l1,
        3,
        macs_ratio=0.5,
        normalize=jp.methods.get("l1").normalize,
        finetune=lambda a, v: rounds.append(a) or v,
    )
    assert len(rounds) == 3 and len(result.log) == 3
    achieved = [s.achieved_ratio for s in result.log]
    assert all(a <= s.target_ratio + 1e-9 for a, s in zip(achieved, result.log, strict=True))
    assert achieved == sorted(achieved, reverse=True)
    assert 0.49 <= jp.count_macs(result.arch) / jp.count_macs(arch) <= 0.5
    same_arch, same_variables = jp.prune(arch, variables, result.keep)
    assert same_arch == result.arch
    jax.tree.map(np.testing.assert_array_equal, same_variables, result.variables)


@pytest.mark.parametrize("name, round_to", [("resnet56", 1), ("vgg16", 8)])
def test_uniform_to_a_macs_budget_is_uniform_and_lands_under_it(name, round_to):
    arch = jp.models.create(name)
    sizes = jp.groups(arch)
    scores = {g: np.arange(n, dtype=np.float32) for g, n in sizes.items()}
    keep = select.uniform(arch, scores, macs_ratio=0.5, round_to=round_to)
    pruned = arch.resize({g: len(k) for g, k in keep.items()})
    kept = jp.count_macs(pruned) / jp.count_macs(arch)
    assert 0.45 < kept <= 0.5
    fractions = {len(keep[g]) / n for g, n in sizes.items() if n >= 64}
    assert max(fractions) - min(fractions) < 2 * round_to / 64
    with pytest.raises(ValueError, match="exactly one"):
        select.uniform(arch, scores, 0.5, macs_ratio=0.5)


# --- width rules: max_pruning_ratio and prunable, for every policy and budget ---------------------

POLICIES = {
    "adaptive": lambda arch, scores, budget, **rules: select.adaptive(
        arch, scores, budget=budget, **rules
    ),
    "adaptive_per_cost": lambda arch, scores, budget, **rules: select.adaptive(
        arch, scores, budget=budget, ranking="score_per_cost", **rules
    ),
    "uniform": lambda arch, scores, budget, **rules: select.uniform(
        arch, scores, budget=budget, **rules
    ),
}


PRUNABLE = {"resnet20": ["*/conv1", "stage1"], "vgg16": ["conv*"]}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("kind", ["macs", "params", "filters"])
@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_width_rules_hold_for_every_policy_and_budget(policy, kind, name):
    arch = jp.models.create(name)
    scores = skewed_scores(arch)
    scores[next(iter(scores))] -= 100.0  # a global ranking would empty the first group
    sizes = jp.groups(arch)
    cut = set(select.budget.matching_groups(list(sizes), PRUNABLE[name]))
    assert cut and len(cut) < len(sizes)
    budget = select.Budget(kind, 0.6)
    keep = POLICIES[policy](arch, scores, budget, max_pruning_ratio=0.6, prunable=PRUNABLE[name])
    cost = select.CostModel.build(arch, budget.kind)
    widths = np.array([len(keep[g]) for g in sizes])
    assert cost(widths) <= budget.ratio * cost(cost.full_widths) * (1 + 1e-12)
    assert any(len(keep[g]) < sizes[g] for g in cut)
    for g, n in sizes.items():
        assert len(keep[g]) >= np.ceil(0.4 * n - 1e-9), (g, len(keep[g]), n)  # loses <= 60%
        if g not in cut:
            assert len(keep[g]) == n, g


def test_unreachable_budget_is_refused_naming_the_binding_groups():
    arch = jp.models.create("resnet20")
    scores = skewed_scores(arch)
    for policy in ("adaptive", "uniform"):
        with pytest.raises(ValueError, match=r"impossible.*binding groups: .*stage3"):
            POLICIES[policy](arch, scores, select.Budget("macs", 0.3), prunable=["*/conv1"],
                             max_pruning_ratio=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="matches no group"):
        select.adaptive(arch, scores, macs_ratio=0.5, prunable=["*/conv9"])
    with pytest.raises(ValueError, match="max_pruning_ratio"):
        select.adaptive(arch, scores, macs_ratio=0.5, max_pruning_ratio=1.0)


def test_binding_names_the_groups_held_at_their_cap():
    arch = jp.models.create("resnet20")
    scores = skewed_scores(arch)
    scores["stage1/block1/conv1"] -= 100.0
    rules = select.WidthRules(max_pruning_ratio=0.5)
    keep = select.adaptive(arch, scores, macs_ratio=0.6, max_pruning_ratio=0.5)
    names = tuple(jp.groups(arch))
    full = np.array(list(jp.groups(arch).values()))
    widths = np.array([len(keep[g]) for g in names])
    bound = rules.binding(names, full, widths)
    assert "stage1/block1/conv1" in bound and len(keep["stage1/block1/conv1"]) == 8
    assert all(
        len(keep[g]) == np.ceil(n / 2) for g, n in zip(names, full, strict=True) if g in bound
    )


@pytest.mark.parametrize("policy", ["adaptive", "uniform", "threshold", "iterative"])
def test_non_finite_scores_are_refused_by_every_policy(policy):
    arch = jp.models.create("lenet5")
    scores = skewed_scores(arch)
    for bad in (np.nan, np.inf):
        broken = {**scores, "conv2": scores["conv2"].copy()}
        broken["conv2"][3] = bad
        with pytest.raises(ValueError, match="NaN or infinite"):
            if policy == "threshold":
                select.threshold(arch, broken, select.Budget("filters", 0.5))
            elif policy == "iterative":
                select.iterative(arch, None, lambda a, v, s=broken: s, 2, macs_ratio=0.5)
            else:
                POLICIES[policy](arch, broken, select.Budget("macs", 0.5))


def test_budget_is_one_validated_value():
    budget = select.Budget("macs", 0.5)
    assert budget.kind is select.BudgetKind.MACS and budget.ratio == 0.5
    assert select.Budget.from_ratios(macs_ratio=0.5) == budget
    assert select.Budget.from_ratios(budget) is budget
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            select.Budget("params", bad)
    with pytest.raises(ValueError, match="valid kinds: macs, params, filters"):
        select.Budget("flops", 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        select.Budget.from_ratios(budget, macs_ratio=0.5)


# --- the authors' threshold rule and the cost-aware ranking ------------------------------------


def test_threshold_is_the_authors_rule_by_hand():
    """T = sorted(scores)[int(p N)]; at or below T removed; an all-below group loses int(g_p n)."""
    arch = jp.models.create("lenet5")  # conv1 6, conv2 16, fc1 120, fc2 84
    rng = np.random.default_rng(0)
    scores = {g: rng.uniform(1, 2, n) for g, n in jp.groups(arch).items()}
    scores["conv1"] = rng.uniform(0, 0.5, 6)  # every channel under any threshold
    p = 0.3
    pooled = np.sort(np.concatenate([scores[g] for g in ("conv1", "conv2")]))
    t = pooled[int(p * pooled.size)]
    keep = select.threshold(arch, scores, select.Budget("filters", 1 - p), prunable=["conv*"])
    g_p = p + (1 - p) / 2
    assert len(keep["conv1"]) == 6 - int(g_p * 6)
    np.testing.assert_array_equal(keep["conv2"], np.flatnonzero(scores["conv2"] > t))
    assert len(keep["fc1"]) == 120 and len(keep["fc2"]) == 84  # not prunable


def test_threshold_reaches_a_macs_budget():
    arch = jp.models.create("resnet20")
    scores = skewed_scores(arch)
    keep = select.threshold(arch, scores, select.Budget("macs", 0.6), prunable=["*/block*/conv1"])
    assert 0.55 <= macs_kept(arch, keep) <= 0.6
    assert all(len(keep[g]) == n for g, n in jp.groups(arch).items() if "/block" not in g)


def test_score_per_cost_removes_cheap_importance_first():
    """Equal scores: the ranking by score per cost removes the costliest channels first."""
    arch = jp.models.create("resnet20")
    sizes = jp.groups(arch)
    flat = {g: np.ones(n) for g, n in sizes.items()}
    cost = select.CostModel.build(arch, "macs")
    per_channel = dict(zip(cost.group_names, cost.channel_costs(), strict=True))
    keep = select.adaptive(arch, flat, macs_ratio=0.97, ranking="score_per_cost", tolerance=1.0)
    cut = [g for g in sizes if len(keep[g]) < sizes[g]]
    assert (
        cut
        and min(per_channel[g] for g in cut)
        >= max(per_channel[g] for g in sizes if g not in cut) - 1e-9
    )
