"""Tests of jaxprune.train: optimizers, the data-parallel step (1 vs 8 devices), compile-once."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import F32_EPS, assert_close_in_ulps, pass_ulps

import jaxprune as jp
from jaxprune import checkpoint, data, importance, train
from jaxprune.importance import gates

# ---------------------------------------------------------------- optimizers and losses

# optax computes a schedule's value in float32: a few roundings of it.
SCHEDULE_RTOL = 8 * F32_EPS


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = train.OptimizerConfig(learning_rate=0.4, warmup_steps=10)
    schedule = train.make_schedule(config, total_steps=110)
    np.testing.assert_allclose(
        [schedule(0), schedule(5), schedule(10)], [0.0, 0.2, 0.4], rtol=SCHEDULE_RTOL
    )
    np.testing.assert_allclose(schedule(60), 0.2, rtol=SCHEDULE_RTOL)  # half way through the cosine
    assert float(schedule(110)) == pytest.approx(0.0, abs=F32_EPS * config.learning_rate)


def test_default_warm_up_is_five_percent_of_the_run():
    schedule = train.make_schedule(train.OptimizerConfig(learning_rate=1.0), total_steps=200)
    np.testing.assert_allclose(
        [schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], rtol=SCHEDULE_RTOL
    )


def test_step_schedule_compounds_its_factor_at_each_boundary():
    config = train.OptimizerConfig(
        learning_rate=1.0, schedule="step", step_boundaries=(0.5, 0.75), warmup_steps=0
    )
    schedule = train.make_schedule(config, total_steps=100)
    np.testing.assert_allclose(
        [schedule(49), schedule(50), schedule(74), schedule(75)],
        [1.0, 0.1, 0.1, 0.01],
        rtol=SCHEDULE_RTOL,
    )


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_weight_decay_is_decoupled_and_spares_biases(name):
    config = train.OptimizerConfig(name=name, weight_decay=0.01)
    tx = train.make_optimizer(config)
    params = {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    direction, state = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(direction["dense"]["kernel"], 0.02)
    np.testing.assert_allclose(direction["dense"]["bias"], 0.0)
    # The decay never enters the momentum (or Adam's moments).
    for leaf in jax.tree.leaves(state):
        if leaf.ndim:
            np.testing.assert_array_equal(leaf, 0.0)


def test_label_smoothing_matches_its_definition():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = jnp.array([0, 2])
    smoothed = (1 - 0.3) * jax.nn.one_hot(labels, 3) + 0.3 / 3
    expected = -jnp.sum(smoothed * jax.nn.log_softmax(logits), axis=-1)
    # log-softmax rounds relative to the largest logit: a few ulps of it.
    atol = 8 * F32_EPS * float(jnp.abs(logits).max())
    np.testing.assert_allclose(train.cross_entropy(logits, labels, 0.3), expected, atol=atol)
    np.testing.assert_allclose(
        train.cross_entropy(logits, labels),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        atol=atol,
    )


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def lenet_setup():
    dataset = data.synthetic_dataset(data.SyntheticOptions((16, 16, 1), 10, 128, 32))
    arch = jp.models.create("lenet5", 10, dataset.input_shape)
    mesh = train.make_mesh()
    config = train.OptimizerConfig(learning_rate=0.05, warmup_steps=0)
    return dataset, arch, mesh, config


def _batches(mesh, dataset, num_steps, start_step=0):
    local = data.train_batches(
        dataset, global_batch_size=32, seed=0, start_step=start_step, num_steps=num_steps
    )
    for images, labels in local:
        images, labels = train.global_batch(mesh, images, labels)
        yield data.normalize(images, dataset.mean, dataset.std), labels


def test_train_step_compiles_once_across_steps_and_a_checkpoint_restore(lenet_setup, tmp_path):
    dataset, arch, mesh, config = lenet_setup
    tx = train.make_optimizer(config)
    step = train.make_train_step(arch, tx, train.make_schedule(config, 8), mesh)
    state = train.create_train_state(arch, tx, 0, mesh)
    batches = _batches(mesh, dataset, 8)
    for _ in range(4):
        state, _ = step(state, *next(batches))
    with checkpoint.Writer(tmp_path) as writer:
        writer.save(4, state, {"note": "test"})
    state = checkpoint.restore(tmp_path, 4, train.abstract_train_state(arch, tx, mesh))
    for _ in range(4):
        state, metrics = step(state, *next(batches))
    assert int(state.step) == 8 and np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_gate_gradients_come_from_the_same_backward_pass_and_accumulate(lenet_setup):
    dataset, arch, mesh, config = lenet_setup
    tx = train.make_optimizer(config)
    accumulator = importance.GFIAccumulation()
    options = train.StepOptions(collect_gate_grads=True, accumulator=accumulator)
    step = train.make_train_step(arch, tx, train.make_schedule(config, 3), mesh, options)
    state = train.create_train_state(arch, tx, 0, mesh, accumulator=accumulator)
    abs_sum = {g: 0.0 for g in jp.groups(arch)}
    for images, labels in _batches(mesh, dataset, 3):
        variables = state.variables
        expected = gates.gate_gradients(arch, variables, images, labels, importance.cross_entropy)
        # Forward and backward passes, then each gate's sum over 32 images x 16x16 positions.
        ulps = 2 * pass_ulps(variables) + np.sqrt(32 * 16 * 16)
        state, _, gate_grads = step(state, images, labels)
        assert {g: v.shape for g, v in gate_grads.items()} == {
            g: (n,) for g, n in jp.groups(arch).items()
        }
        for g in expected:  # LeNet has no BatchNorm: train and eval mode agree.
            assert_close_in_ulps(gate_grads[g], expected[g], ulps)
            abs_sum[g] = abs_sum[g] + np.abs(np.asarray(gate_grads[g]))
    assert accumulator.steps(state.aux) == 3
    scores = accumulator.scores(state.aux)
    for g in abs_sum:
        # Means of 3 positive float32 terms on both sides: at most 4 roundings each.
        np.testing.assert_allclose(scores[g], abs_sum[g] / 3, rtol=8 * F32_EPS)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(lenet_setup):
    dataset, arch, mesh, config = lenet_setup
    tx = train.make_optimizer(config)
    losses = {}
    for dtype in train.ComputeDtype:
        options = train.StepOptions(compute_dtype=dtype)
        step = train.make_train_step(arch, tx, train.make_schedule(config, 1), mesh, options)
        state = train.create_train_state(arch, tx, 0, mesh)
        state, metrics = step(state, *next(_batches(mesh, dataset, 1)))
        losses[dtype] = float(metrics["loss"])
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    # bfloat16 keeps 8 significant bits (one ulp is 2**-7 = 7.8e-3): a few of its ulps.
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_closing_prefetch_closes_its_source_before_returning():
    """The source (grain's workers, in a run) is closed by the time `close` returns, so nothing
    is left to race interpreter exit."""
    closed = []

    def source():
        try:
            yield from itertools.count()
        finally:
            closed.append(True)

    batches = train.prefetch(source())
    assert [next(batches), next(batches)] == [0, 1]
    batches.close()
    assert closed == [True]


# ---------------------------------------------------------------- 1 device vs 8 devices

_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import jaxprune as jp
    from jaxprune import data, train

    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, shape in [("lenet5", (16, 16, 1)), ("resnet20", (16, 16, 3))]:
        dataset = data.synthetic_dataset(data.SyntheticOptions(shape, 10, 256, 32))
        arch = jp.models.create(name, 10, shape)
        # A small learning rate: with BatchNorm on tiny random data the dynamics are chaotic.
        config = train.OptimizerConfig(learning_rate=0.01, warmup_steps=2)
        steps = 24
        for n in (1, 8):
            mesh = train.make_mesh(jax.devices()[:n])
            tx = train.make_optimizer(config)
            state = train.create_train_state(arch, tx, 0, mesh)
            step = train.make_train_step(arch, tx, train.make_schedule(config, steps), mesh)
            losses = []
            for images, labels in data.train_batches(
                dataset, global_batch_size=32, seed=0, num_steps=steps
            ):
                images, labels = train.global_batch(mesh, images, labels)
                batch = data.normalize(images, dataset.mean, dataset.std), labels
                state, metrics = step(state, *batch)
                losses.append(float(metrics["loss"]))
                if len(losses) == 1:  # BatchNorm's running statistics after one update.
                    stats = [float(x) for s in jax.tree.leaves(state.batch_stats) for x in s]
            out[f"{name}/{n}"] = {
                "losses": losses,
                "devices": len(jax.tree.leaves(state.params)[0].sharding.device_set),
                "batch_sharded": len(batch[0].addressable_shards),
                "first_stats": stats,
            }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def device_runs():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-c", _DEVICES_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two subprocesses train two models on 1 and 8 devices
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_one_device_and_eight_devices_give_the_same_losses(device_runs, name):
    one, eight = device_runs[f"{name}/1"], device_runs[f"{name}/8"]
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert (one["batch_sharded"], eight["batch_sharded"]) == (1, 8)
    losses_1, losses_8 = np.array(one["losses"]), np.array(eight["losses"])
    assert len(losses_1) >= 20
    # Step 1's loss is the first one computed after an update.
    # A mean of 32 losses summed in another order (sqrt(32) ulps) after forward passes blocked
    # otherwise per device (`pass_ulps`: tens of ulps for these networks): 64 ulps of the loss.
    assert_close_in_ulps(losses_8[:2], losses_1[:2], ulps=64)
    # Rounding differences (sums in another order) grow chaotically: compare later steps loosely.
    np.testing.assert_allclose(losses_8, losses_1, rtol=5e-2)
    assert np.mean(losses_8) == pytest.approx(np.mean(losses_1), rel=1e-2)
    # Running statistics are those of the global batch, not of each device's part of it.
    # 0.9 x the start + 0.1 x a batch statistic: a mean over 32 x 16x16 positions (sqrt(8192) ulps)
    # of ResNet-20's activations (20 layers of <= sqrt(576) = 24 ulps): 0.1 x 571 ~ 60 ulps, twice
    # that for the variances (squares).
    assert_close_in_ulps(eight["first_stats"], one["first_stats"], ulps=128)


@pytest.mark.parametrize("name", ["tiny_resnet", pytest.param("tiny_vgg", marks=pytest.mark.slow)])
def test_recalibrated_batch_norm_is_the_batch_statistics(name):
    """Re-estimated on one batch, the eval-mode network computes what train mode does on it."""
    from conftest import random_variables, tiny_resnet

    if name == "tiny_resnet":
        arch = tiny_resnet()
    else:
        arch = jp.models.VGGArch(stages=((4,), (6,), (8,)), dense_width=5, input_shape=(8, 8, 3))
    variables = random_variables(arch, seed=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, *arch.input_shape)), jnp.float32)
    recalibrated = train.recalibrate_batch_norm(arch, variables, [x])
    model = arch.module()
    eval_mode = model.apply(recalibrated, x, False)
    train_mode, _ = model.apply(variables, x, True, mutable=["batch_stats"])
    # The statistics pass through m and 1 - m = 0.1 (x10 of their rounding) and the variance's
    # square root: a few hundred ulps of the logits' scale in float32.
    assert_close_in_ulps(eval_mode, train_mode, ulps=512)
    assert jax.tree.map(jnp.shape, recalibrated) == jax.tree.map(jnp.shape, variables)
    np.testing.assert_array_equal(
        jax.tree.leaves(recalibrated["params"])[0], jax.tree.leaves(variables["params"])[0]
    )
    # Two batches: the mean of the batches' statistics.
    y = x[::-1] * 2.0 + 1.0
    both = train.recalibrate_batch_norm(arch, variables, [x, y])
    one_y = train.recalibrate_batch_norm(arch, variables, [y])
    mean = jax.tree.map(lambda a, b: (a + b) / 2, recalibrated["batch_stats"], one_y["batch_stats"])
    for got, want in zip(jax.tree.leaves(both["batch_stats"]), jax.tree.leaves(mean), strict=True):
        assert_close_in_ulps(got, want, ulps=4)  # (a + b) / 2 vs a running mean: 2 roundings each


def test_the_trainer_knows_no_pruning_method():
    """The train package imports no criterion, selection or method: gate gradients reach a
    caller's accumulator through `StepOptions.accumulator` (GFI-AP is one user)."""
    import ast
    import pathlib

    package = pathlib.Path(train.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(
                    ("jaxprune.importance", "jaxprune.select", "jaxprune.methods")
                ), (source.name, node.module)
